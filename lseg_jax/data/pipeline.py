"""The input pipeline: a registered dataset -> per-host numpy batches (grain).

`make_loader(config.input, "train", global_batch_size=..., seed=..., train=True)`
returns a grain `IterDataset`; `it = iter(loader)` yields per-process batches.
A training loader resumes by its global batch index (`start_batch`): the
position is the same on every process, so no per-process iterator state is
saved and a run resumes on any number of processes. Batches:
  image       float32 [B, H, W, 3]  normalised ((x/255 - mean) / std)
  mask        int32   [B, H, W]     position in the example's label list, -1 = ignore
  label_ids   int32   [B, N]        label-table ids of that list, N = max_labels
  label_mask  bool    [B, N]        False = padding
B = global_batch_size / shard_count, on every process and in every batch
(evaluation pads the last ones with examples whose mask is all -1, i.e.
ignored by the loss and the metrics). With all labels on every image (ADE20K,
lseg_shapes) mask values are label-table ids and `label_ids[b] = arange(N)`.

Stages (each process reads only its rows of every global batch in training,
its shard of the source in evaluation):
  source -> shuffle(seed, reshuffled every epoch) -> repeat            (train)
    (datasets with `train_pairs`: each query preceded by a support of its
    class, `pairs.episode_order`: B images = B / 2 episodes)
  -> to_example (mask mapping, label positions, RGB) -> transform
  -> this process's rows -> batch -> read threads
  -> worker processes (worker_count > 0)
Batches are formed before the worker processes, so they are identical for any
worker_count; all randomness derives from (seed, shard_index) and the example
position, so a pipeline is reproducible and resumable.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import difflib
import functools
from typing import Any

from absl import flags
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
from ml_collections import config_dict
import numpy as np

from lseg_jax import sharding
from lseg_jax.data import pairs
from lseg_jax.data import registry
from lseg_jax.data import transforms
from lseg_jax.losses import IGNORE


def default_input_config() -> ml_collections.ConfigDict:
  """Every key `make_loader` understands, with its default."""
  c = ml_collections.ConfigDict()
  c.dataset = "lseg_shapes"  # a registered name (lseg_jax.data.registered())
  c.builder_config = config_dict.placeholder(str)  # TFDS builder config name; None = the dataset's default
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.manual_dir = config_dict.placeholder(str)  # for TFDS datasets with manual downloads
  c.prepare = True  # download_and_prepare when the data is missing
  c.crop_size = 480
  c.base_size = 520  # training long side in [0.5, 2.0] * base_size
  c.normalization = "clip"  # "clip" (0.5/0.5, ViT models) | "imagenet" (ResNet)
  c.train_mode = "scale_crop"  # "scale_crop" (official ADE20K augmentation) | "resize" (zero-shot)
  c.eval_mode = "val"  # "val" (short side -> crop, centre crop) | "resize" | "none"
  c.max_labels = config_dict.placeholder(int)  # labels per example after padding; None = size of the label table
  c.worker_count = 0  # grain worker processes (0 = in this process)
  c.num_threads = 4  # read/transform threads per process, each on one batch
  c.prefetch_batches = 4  # batches buffered per process
  # Read by the training script, not by make_loader (its arguments rule there).
  c.split = "train"
  c.batch_size = config_dict.placeholder(int)  # global batch size
  return c


def resolve_input_config(input_config: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with `input_config` (a ConfigDict, dict or None).

  Unknown keys (typos) raise a ValueError naming them: a misspelt key would
  otherwise be ignored silently.
  """
  cfg = default_input_config()
  if input_config is None:
    return cfg
  given = input_config.to_dict() if hasattr(input_config, "to_dict") else dict(input_config)
  for key, value in given.items():
    if key not in cfg:
      close = difflib.get_close_matches(key, list(cfg.keys()), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown input config key {key!r}.{hint} Known keys: {sorted(cfg.keys())}.")
    cfg[key] = value
  transforms.normalization_stats(cfg.normalization)  # validates the name
  if cfg.eval_mode not in transforms.EVAL_MODES:
    raise ValueError(f"Unknown input config eval_mode {cfg.eval_mode!r}; known: {transforms.EVAL_MODES}.")
  for key in ("crop_size", "base_size", "num_threads", "prefetch_batches"):
    if int(cfg[key]) <= 0:
      raise ValueError(f"Input config {key} must be positive, got {cfg[key]}.")
  return cfg


_PADDING_KEY = "_lseg_padding"


class _PaddedShard(Sequence):
  """Records [start, start + valid) of `source`, then padding up to `length`.

  Evaluation must see every example exactly once while every process yields
  the same number of full batches (one jitted shape, no host waiting for
  another): shards are ceil(n / shard_count) long and filled up to whole
  batches with copies of a real record flagged as padding, whose mask becomes
  all -1 (ignored by the loss and the metrics).
  """

  def __init__(self, source: Sequence[Any], *, start: int, valid: int, length: int):
    self._source, self._start, self._valid, self._length = source, start, valid, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self._length:
      raise IndexError(index)
    if index < self._valid:
      return self._source[self._start + index]
    real = self._start if self._valid else 0  # an empty shard pads with record 0
    return {**self._source[real], _PADDING_KEY: True}


def mask_to_positions(mask: np.ndarray, label_ids: np.ndarray, num_labels: int,
                      dataset: str = "") -> np.ndarray:
  """Label-table ids -> positions in `label_ids`, int32 [H, W]; -1 stays -1.

  Raises a ValueError naming the offending value when the mask holds an id
  outside the label table or outside this example's label list: a silently
  wrong target would only show up as a bad mIoU much later.
  """
  mask = np.asarray(mask)
  if mask.size:
    lo, hi = int(mask.min()), int(mask.max())
    if lo < IGNORE or hi >= num_labels:
      bad = lo if lo < IGNORE else hi
      raise ValueError(f"{dataset}: mask value {bad} is outside the label table "
                       f"[0, {num_labels}) and is not the ignore value {IGNORE}.")
  if len(label_ids) == num_labels and np.array_equal(label_ids, np.arange(num_labels)):
    return mask.astype(np.int32)
  lut = np.full(num_labels + 1, -2, np.int32)  # index = id + 1; -2 = not in the list
  lut[0] = IGNORE
  lut[label_ids + 1] = np.arange(len(label_ids), dtype=np.int32)
  positions = lut[mask.astype(np.int64) + 1]
  if (positions == -2).any():
    bad = int(mask[positions == -2][0])
    raise ValueError(f"{dataset}: mask value {bad} is not in this example's label list "
                     f"{label_ids.tolist()}.")
  return positions


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of `parent`: positions
  [b * G + i * L, b * G + (i + 1) * L) for batch b, process i, global batch G
  and local batch L."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int, shard_index: int):
    super().__init__(parent)
    self._global, self._local, self._offset = global_batch, local_batch, shard_index * local_batch

  def __len__(self) -> int:
    return len(self._parents[0]) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    return self._parents[0][batch * self._global + self._offset + row]


@dataclasses.dataclass(frozen=True)
class ToExample(grain.transforms.Map):
  """Raw record -> {"image" uint8 [H, W, 3], "mask" int32 [H, W] positions,
  "label_ids" int32 [max_labels], "label_mask" bool [max_labels]}; `train`
  reads the record as the dataset's training does (`train_example_fn`)."""
  spec: registry.DatasetSpec
  num_labels: int
  max_labels: int
  train: bool = False

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    name = self.spec.name
    ex = self.spec.to_example(record, self.train)
    image = transforms.ensure_rgb(ex["image"])
    mask = np.asarray(ex["mask"])
    if mask.shape != image.shape[:2]:
      raise ValueError(f"{name}: mask shape {mask.shape} does not match image shape {image.shape}.")
    if ex["label_ids"] is None:
      label_ids = np.arange(self.num_labels, dtype=np.int32)
    else:
      label_ids = np.asarray(ex["label_ids"], np.int32).reshape(-1)
      if label_ids.size and (label_ids.min() < 0 or label_ids.max() >= self.num_labels):
        raise ValueError(f"{name}: label ids {label_ids.tolist()} are outside the label table "
                         f"[0, {self.num_labels}).")
      if len(np.unique(label_ids)) != len(label_ids):
        raise ValueError(f"{name}: repeated label ids {label_ids.tolist()}.")
    if isinstance(record, Mapping) and record.get(_PADDING_KEY, False):
      mask = np.full(mask.shape, IGNORE, np.int32)
    n = len(label_ids)
    if n > self.max_labels:
      raise ValueError(f"{name}: an example has {n} labels, more than max_labels={self.max_labels}.")
    padded = np.zeros(self.max_labels, np.int32)
    padded[:n] = label_ids
    return {
        "image": image,
        "mask": mask_to_positions(mask, label_ids, self.num_labels, name),
        "label_ids": padded,
        "label_mask": np.arange(self.max_labels) < n,
    }


def collate(examples: Sequence[Mapping[str, np.ndarray]], *, image_pad: np.ndarray) -> dict[str, np.ndarray]:
  """Stacks examples; images of different sizes (eval_mode "none") are padded
  bottom/right to the largest, with `image_pad` (the normalised value of pixel
  0, as the official evaluation pads) and mask -1."""
  h = max(e["image"].shape[0] for e in examples)
  w = max(e["image"].shape[1] for e in examples)
  images, masks = [], []
  for e in examples:
    image, mask = e["image"], e["mask"]
    if image.shape[:2] != (h, w):
      pad = ((0, h - image.shape[0]), (0, w - image.shape[1]))
      canvas = np.empty((h, w, 3), np.float32)
      canvas[...] = image_pad
      canvas[:image.shape[0], :image.shape[1]] = image
      image = canvas
      mask = np.pad(mask, pad, constant_values=IGNORE)
    images.append(image)
    masks.append(mask)
  return {
      "image": np.stack(images).astype(np.float32, copy=False),  # [B, H, W, 3]
      "mask": np.stack(masks).astype(np.int32, copy=False),  # [B, H, W]
      "label_ids": np.stack([e["label_ids"] for e in examples]),  # [B, N]
      "label_mask": np.stack([e["label_mask"] for e in examples]),  # [B, N]
  }


def _mark_flags_parsed(*unused_args: Any) -> None:
  """Grain's multiprocessing reads absl flags (in this process and in the
  spawned workers); outside `absl.app.run` they are unparsed and reading them
  raises. Marking them parsed keeps every flag at its default."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def num_examples(input_config: Any, split: str, train: bool = False) -> int:
  """Number of examples in a split (all shards); prepares the data if needed.

  train=True: the images one training epoch yields, twice the records for a
  dataset trained on (support, query) episodes (`train_pairs`), so that
  `num_examples // batch_size` is the official steps per epoch.
  """
  cfg = resolve_input_config(input_config)
  spec = registry.get(cfg.dataset)
  n = len(spec.source(cfg, split))
  return 2 * n if train and spec.train_pairs is not None else n


dataset_size = num_examples


def label_names(dataset_or_config: Any) -> tuple[str, ...]:
  """The label table (mask value / label id -> name) of a dataset, given by
  its registered name or by an input config naming it."""
  if isinstance(dataset_or_config, str):
    return registry.label_names(dataset_or_config)
  return registry.label_names(resolve_input_config(dataset_or_config).dataset)


def _train_order(spec: registry.DatasetSpec, cfg: ml_collections.ConfigDict, split: str, source: Sequence[Any],
                 global_batch_size: int, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """The global training order of raw records, the same on every process:
  shuffled whole global batches, reshuffled every epoch; for `train_pairs`
  datasets each query record preceded by a support of its class."""
  name = f"{cfg.dataset}/{split}"
  if spec.train_pairs is not None:
    keys = (spec.train_pairs.class_key, spec.train_pairs.name_key)
    columns = registry.read_columns(spec, cfg, split, source, keys)
    pools = pairs.SupportPools(columns[keys[0]], columns[keys[1]], name)
    return pairs.episode_order(source, pools, global_batch_size=global_batch_size, seed=seed,
                               num_epochs=num_epochs, dataset=name)
  n = len(source)
  if n < global_batch_size:
    raise ValueError(f"{name}: {n} examples cannot fill a batch of {global_batch_size}.")
  ds = grain.MapDataset.source(source)[:n // global_batch_size * global_batch_size]
  return ds.shuffle(seed=seed).repeat(num_epochs)


def make_loader(input_config: Any, split: str, *, global_batch_size: int, seed: int, train: bool,
                shard_index: int | None = None, shard_count: int | None = None,
                num_epochs: int | None = None, worker_count: int | None = None,
                start_batch: int = 0) -> grain.IterDataset:
  """A grain pipeline yielding this process's batches of `split`.

  Args:
    input_config: a ConfigDict/dict of `default_input_config()` keys (others
      raise), missing keys take their defaults.
    split: a split of the dataset, TFDS slicing allowed ("train[:10%]").
    global_batch_size: batch over all processes; each yields
      global_batch_size // shard_count examples per batch.
    seed: shuffling and augmentation seed (mixed with shard_index).
    train: shuffle, official random augmentation, repeat (datasets with
      `train_pairs`: batches of (support, query) episodes, global_batch_size
      images = global_batch_size / 2 episodes, so it must be even);
      otherwise the eval transform (`eval_mode`), in order.
    shard_index, shard_count: this process's shard (default: JAX process
      index / count). Training: its contiguous rows of every global batch
      (the global batches do not depend on shard_count); the records that
      do not fill a last global batch are dropped each epoch. Evaluation: a
      disjoint, contiguous slice of the source, every example exactly once;
      each process yields the same number of FULL batches, the missing
      examples being padding whose mask is all -1.
    num_epochs: None = forever for training, 1 for evaluation.
    worker_count: grain worker processes; None = `input_config.worker_count`.
    start_batch: training starts at this global batch (a run resumed after
      step s starts at batch s). The position is global, so a run saved by
      any number of processes resumes on any other number.

  Returns:
    An IterDataset.
  """
  cfg = resolve_input_config(input_config)
  spec = registry.get(cfg.dataset)
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  worker_count = cfg.worker_count if worker_count is None else worker_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count}).")
  if global_batch_size % shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by shard_count {shard_count}.")
  local_batch = global_batch_size // shard_count

  source = spec.source(cfg, split)
  n = len(source)
  num_labels = len(spec.label_names())
  max_labels = int(cfg.max_labels or num_labels)
  if train:
    # One global order (shuffle, epochs, supports, augmentation keyed by
    # global position), identical on every process; each process then reads
    # only its rows of every global batch. The global batches, and so
    # training, are the same for any number of processes.
    ds = _train_order(spec, cfg, split, source, global_batch_size, seed, num_epochs)
    ds = ds.map(ToExample(spec, num_labels, max_labels, train=True))
    ds = ds.random_map(transforms.TrainTransform(cfg.base_size, cfg.crop_size, cfg.normalization,
                                                 cfg.train_mode), seed=seed)
    ds = _ProcessRows(ds, global_batch_size, local_batch, shard_index)
  else:
    if n == 0:
      raise ValueError(f"{cfg.dataset}/{split} is empty.")
    per_shard = -(-n // shard_count)  # ceil: every example is evaluated once
    start = shard_index * per_shard
    ds = grain.MapDataset.source(_PaddedShard(
        source, start=start, valid=max(min(per_shard, n - start), 0),
        length=-(-per_shard // local_batch) * local_batch))
    ds = ds.repeat(num_epochs or 1).map(ToExample(spec, num_labels, max_labels))
    ds = ds.map(transforms.EvalTransform(cfg.eval_mode, cfg.crop_size, cfg.normalization))
  mean, std = transforms.normalization_stats(cfg.normalization)
  ds = ds.batch(local_batch, drop_remainder=True,  # evaluation shards are whole batches
                batch_fn=functools.partial(collate, image_pad=(0.0 - mean) / std))
  if start_batch:
    ds = ds[start_batch:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                            prefetch_buffer_size=cfg.prefetch_batches))
  if worker_count > 0:
    _mark_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                        worker_init_fn=_mark_flags_parsed)
  return ds


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                      partition_spec: PartitionSpec | Mapping[str, PartitionSpec] | None = None, *,
                      rules: Sequence[tuple[str, Any]] | None = None) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax Arrays sharded over `mesh`.

  `partition_spec` applies to every entry (its first axis names the batch
  mesh axes, e.g. P("data")) or is given per key. Without it, `rules`
  (logical -> mesh axis rules) shard the leading axis as the logical axis
  "batch" and replicate the others. The global batch is the concatenation of
  all processes' local batches along axis 0.
  """
  if partition_spec is None and rules is None:
    raise ValueError("make_global_batch needs partition_spec or rules.")

  def one(key: str, x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    if partition_spec is None:
      return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, rules), x)
    spec = partition_spec[key] if isinstance(partition_spec, Mapping) else partition_spec
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return {k: one(k, v) for k, v in local_batch.items()}
