"""Input data: dataset registry, official transforms and the grain pipeline.

  from lseg_jax import data
  loader = data.make_loader(config.input, "train", global_batch_size=16, seed=0, train=True)
  names = data.label_names("lseg_shapes")  # or label_names(config.input)

Every dataset of this package is registered here (`registry.register`);
others can register their own the same way.
"""

from lseg_jax.data import shapes
from lseg_jax.data.pipeline import collate
from lseg_jax.data.pipeline import dataset_size
from lseg_jax.data.pipeline import default_input_config
from lseg_jax.data.pipeline import label_names
from lseg_jax.data.pipeline import make_global_batch
from lseg_jax.data.pipeline import make_loader
from lseg_jax.data.pipeline import num_examples
from lseg_jax.data.pipeline import resolve_input_config
from lseg_jax.data.registry import DatasetSpec
from lseg_jax.data.registry import get
from lseg_jax.data.registry import identity_mask
from lseg_jax.data.registry import register
from lseg_jax.data.registry import registered
from lseg_jax.data.registry import tfds_source
from lseg_jax.data.registry import TrainPairs
from lseg_jax.data.registry import unregister

from lseg_jax.data import ade20k, coco20i, fewshot, fss1000, pascal5i  # noqa: E402

register("lseg_shapes", source=tfds_source("lseg_shapes"), labels=shapes.LABELS)
register("ade20k", source=tfds_source("ade20k_lseg"), labels=ade20k.ADE20K_LABELS, mask_fn=ade20k.ade20k_mask_map)
# Zero-shot episodes: the label table is ("others", *classes); each example's
# label set is ["others", its class] (input.builder_config picks the fold).
# Training, as the official zero-shot module: (support, query) pairs of one
# class, PASCAL boundaries folded into "others"; evaluation: the queries,
# boundaries ignored.
for _name, _builder, _labels in (("pascal5i", "pascal5i_lseg", pascal5i.PASCAL_LABELS),
                                 ("coco20i", "coco20i_lseg", coco20i.COCO_LABELS),
                                 ("fss1000", "fss1000_lseg", fss1000.FSS_LABELS)):
  register(_name, source=tfds_source(_builder), labels=fewshot.episode_label_table(_labels),
           example_fn=fewshot.episode_example, train_example_fn=fewshot.episode_train_example,
           train_pairs=TrainPairs(class_key="class_id", name_key="file_name"))
