"""Single-scale evaluation over a sharded mesh: a confusion matrix summed on
device over the batch and on host over batches (the same numbers on any
device count), then the official pixAcc / mIoU (`lseg_jax.metrics`).

Targets and predictions are label positions within each image's label set;
both are mapped through `label_ids` to the dataset's label table, so fixed
label sets (ADE20K) and per-image ones share one code path.
"""

from collections.abc import Callable, Iterable, Iterator
import math

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import losses, metrics, sharding


def padded_batches(batches: Iterable[dict], num_batches: int, batch_size: int) -> Iterator[dict]:
  """Exactly `num_batches` batches of `batch_size`: short or missing batches are
  filled with ignored pixels, so every host runs the same number of steps."""
  it = iter(batches)
  template = None
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is None:
      batch = {k: v[:0] for k, v in template.items()}
    template = template or batch
    n = len(batch["image"])
    if n < batch_size:
      fill = {k: np.repeat(template[k][:1], batch_size - n, axis=0) for k in batch}
      fill["mask"] = np.full_like(fill["mask"], losses.IGNORE)
      batch = {k: np.concatenate([batch[k], fill[k]]) for k in batch}
    yield batch


def confusion(logits: jax.Array, mask: jax.Array, label_ids: jax.Array, label_mask: jax.Array,
              num_classes: int) -> jax.Array:
  """[C, C] (target, prediction) counts of logits [B, H, W, N] against mask
  [B, H, W] (label positions, IGNORE), both mapped through label_ids [B, N]."""
  pred = jnp.argmax(losses.mask_padded_labels(logits, label_mask), axis=-1)  # [B, H, W]
  to_class = lambda pos: jnp.take_along_axis(label_ids, pos.reshape(len(pos), -1), axis=1).reshape(pos.shape)
  target = jnp.where(mask != losses.IGNORE, to_class(jnp.maximum(mask, 0)), losses.IGNORE)
  return metrics.confusion_matrix(to_class(pred), target, num_classes)


def make_eval_step(model, num_classes: int, activations: sharding.Layout | None = None) -> Callable:
  """(variables, batch, text_table) -> (confusion [C, C], loss sums);
  `activations` = (mesh, rules) as `training.make_train_step`'s."""

  def eval_step(variables, batch, text_table):
    text = text_table[batch["label_ids"]]  # [B, N, D]
    logits = model.apply(variables, batch["image"], text, batch["label_mask"], train=False)
    _, sums = losses.pixel_cross_entropy(logits, batch["mask"], batch["label_mask"])
    return confusion(logits, batch["mask"], batch["label_ids"], batch["label_mask"], num_classes), sums

  return sharding.laid_out(eval_step, activations)


def make_fewshot_step(model, num_classes: int, activations: sharding.Layout | None = None) -> Callable:
  """(variables, batch, text_table) -> (intersection, union) [C, 2] int32 of
  (others, class) per episode class, summed over the batch (HSNet's areas,
  `metrics.fewshot_areas`; ignored and padding pixels count nowhere);
  `activations` = (mesh, rules) as `training.make_train_step`'s."""

  def fewshot_step(variables, batch, text_table):
    logits = model.apply(variables, batch["image"], text_table[batch["label_ids"]], batch["label_mask"])
    pred = jnp.argmax(losses.mask_padded_labels(logits, batch["label_mask"]), axis=-1)  # [B, H, W] in {0, 1}
    target, valid = batch["mask"], batch["mask"] != losses.IGNORE
    areas = lambda hit: jnp.stack([(hit(c) & valid).sum((1, 2)) for c in (0, 1)], -1)  # [B, 2]
    inter = areas(lambda c: (pred == c) & (target == c))
    union = areas(lambda c: (pred == c) | (target == c))
    episode_class = jax.nn.one_hot(batch["label_ids"][:, 1] - 1, num_classes, dtype=jnp.int32)  # [B, C]
    return episode_class.T @ inter, episode_class.T @ union

  return sharding.laid_out(fewshot_step, activations)


def evaluate(eval_step: Callable, variables, text_table, batches: Iterable[dict], num_examples: int,
             global_batch_size: int, to_global: Callable[[dict], dict]) -> dict:
  """Runs `eval_step` (jitted) over the split; returns pixAcc, mIoU, IoU, loss."""
  num_batches = math.ceil(num_examples / global_batch_size)
  local_batch = global_batch_size // jax.process_count()
  confusion, loss_sum, valid = 0, 0.0, 0
  for batch in padded_batches(batches, num_batches, local_batch):
    conf, sums = eval_step(variables, to_global(batch), text_table)
    confusion = confusion + np.asarray(conf, np.int64)
    loss_sum += float(sums["loss_sum"])
    valid += int(sums["valid"])
  scores = metrics.segmentation_scores(confusion)
  scores["loss"] = loss_sum / max(valid, 1)
  return scores
