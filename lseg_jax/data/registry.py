"""Dataset registry: what the input pipeline needs to know about a dataset.

A dataset is registered once, at import, with `register(name, ...)`:
- `source(input_config, split)`: a random-access source (`len`, `[i]`) of raw
  records (e.g. `tfds.data_source`), one process reading it may see it all;
- `labels`: the label table, the names LSeg embeds with CLIP (a tuple, or a
  zero-argument function for tables read lazily from files);
- how a raw record becomes a standard example: by default the image is
  `record[image_key]`, the mask `mask_fn(record[mask_key])` (label-table ids,
  -1 = ignore) and the example's label list `label_set_fn(record)` (label-table
  ids; None = the whole table); or, for anything else (few-shot episodes),
  `example_fn(record) -> {"image", "mask", "label_ids"}` doing it all;
  `train_example_fn` replaces it in training where the two differ (the
  zero-shot training folds PASCAL boundaries into "others");
- `train_pairs`: train on (support, query) episodes as the official
  zero-shot data module does: every training record, the query, follows a
  support record of its class (`TrainPairs`, assembled by `pairs.py`).

Examples:
  register("lseg_shapes", source=tfds_source("lseg_shapes"), labels=shapes.LABELS)
  register("ade20k", source=tfds_source("ade20k_lseg"), labels=ADE20K_LABELS,
           mask_fn=ade20k_mask_map)  # raw 0 -> -1, k -> k-1

Registered functions run inside grain worker processes, which get them through
cloudpickle: module-level functions are the safe choice.

A source may also offer `columns(input_config, split, keys) -> {key: array}`
(`TfdsSource` does): a few small fields of every record without decoding the
images, which `read_columns` uses to index training pairs by class.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import difflib
from typing import Any

import numpy as np

Record = Mapping[str, Any]
Source = Callable[[Any, str], Sequence[Record]]  # (input_config, split) -> records


def identity_mask(mask: np.ndarray) -> np.ndarray:
  """Raw mask values already are label-table ids (lseg_shapes)."""
  return mask.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TrainPairs:
  """Training on (support, query) episodes: HSNet's FSSDataset with shot=1, as
  the official zero-shot `training_step` concatenates them.

  Every training record is the query of one episode; its support is another
  record with the same `class_key` and a different `name_key` (another
  image of the class, never the query's own), drawn at random. A batch of B
  images holds B / 2 episodes, support then query.
  """
  class_key: str = "class_id"
  name_key: str = "file_name"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One registered dataset (see the module docstring for the fields)."""
  name: str
  source: Source
  labels: Sequence[str] | Callable[[], Sequence[str]]
  mask_fn: Callable[[np.ndarray], np.ndarray] = identity_mask
  label_set_fn: Callable[[Record], Sequence[int]] | None = None
  image_key: str = "image"
  mask_key: str = "mask"
  example_fn: Callable[[Record], Mapping[str, Any]] | None = None
  train_example_fn: Callable[[Record], Mapping[str, Any]] | None = None
  train_pairs: TrainPairs | None = None

  def label_names(self) -> tuple[str, ...]:
    labels = self.labels() if callable(self.labels) else self.labels
    return tuple(labels)

  def to_example(self, record: Record, train: bool = False) -> dict[str, Any]:
    """Raw record -> {"image": [H, W, C] uint8, "mask": int32 [H, W] of
    label-table ids (-1 = ignore), "label_ids": int32 [N] or None (all)};
    `train` picks `train_example_fn` where there is one."""
    example_fn = self.train_example_fn if train and self.train_example_fn is not None else self.example_fn
    if example_fn is not None:
      ex = dict(example_fn(record))
      ex.setdefault("label_ids", None)
      return ex
    mask = np.asarray(record[self.mask_key])
    if mask.ndim == 3:  # TFDS decodes PNG masks as [H, W, 1] or [H, W, 3]
      mask = mask[..., 0]
    label_ids = None if self.label_set_fn is None else self.label_set_fn(record)
    return {"image": record[self.image_key], "mask": self.mask_fn(mask), "label_ids": label_ids}


_REGISTRY: dict[str, DatasetSpec] = {}


def register(name: str, *, source: Source, labels: Sequence[str] | Callable[[], Sequence[str]],
             mask_fn: Callable[[np.ndarray], np.ndarray] = identity_mask,
             label_set_fn: Callable[[Record], Sequence[int]] | None = None,
             image_key: str = "image", mask_key: str = "mask",
             example_fn: Callable[[Record], Mapping[str, Any]] | None = None,
             train_example_fn: Callable[[Record], Mapping[str, Any]] | None = None,
             train_pairs: TrainPairs | None = None, overwrite: bool = False) -> DatasetSpec:
  """Registers a dataset under `name` and returns its spec."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"Dataset {name!r} is already registered (pass overwrite=True to replace it).")
  spec = DatasetSpec(name=name, source=source, labels=labels, mask_fn=mask_fn,
                     label_set_fn=label_set_fn, image_key=image_key, mask_key=mask_key,
                     example_fn=example_fn, train_example_fn=train_example_fn, train_pairs=train_pairs)
  _REGISTRY[name] = spec
  return spec


def unregister(name: str) -> None:
  """Removes a dataset (tests register throw-away datasets)."""
  _REGISTRY.pop(name, None)


def registered() -> tuple[str, ...]:
  """The names of all registered datasets."""
  return tuple(sorted(_REGISTRY))


def get(name: str) -> DatasetSpec:
  """The spec of a registered dataset; a ValueError naming it otherwise."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} Registered: {list(registered())}.")
  return _REGISTRY[name]


def label_names(name: str) -> tuple[str, ...]:
  """The label table of a registered dataset: mask value / label id -> name."""
  return get(name).label_names()


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A `source` reading a TFDS dataset through `tfds.data_source` (ArrayRecord,
  no TensorFlow needed).

  Reads from the input config: `data_dir` (None = the TFDS default),
  `manual_dir`, `prepare` (download_and_prepare when missing) and
  `builder_config` (a TFDS builder config name; overrides the one given here).
  """
  tfds_name: str
  builder_config: str | None = None

  def __call__(self, input_config: Any, split: str, decoders: Mapping[str, Any] | None = None
               ) -> Sequence[Record]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    config = input_config.get("builder_config") or self.builder_config
    builder_kwargs: dict[str, Any] = {"file_format": "array_record"}
    if config is not None:
      builder_kwargs["config"] = config
    dl_kwargs = {}
    if input_config.get("manual_dir"):
      dl_kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=input_config.manual_dir)
    return tfds.data_source(self.tfds_name, split=split, data_dir=input_config.get("data_dir"),
                            download=bool(input_config.get("prepare", True)), decoders=decoders,
                            builder_kwargs=builder_kwargs, download_and_prepare_kwargs=dl_kwargs or None)

  def columns(self, input_config: Any, split: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """{key: [n] array} over all records; the other features stay undecoded
    bytes (`tfds.decode.SkipDecoding`), so no image is decoded. Still one
    read of the split (~1 GB for PASCAL-5i train, ~15 GB for a COCO-20i
    fold), once per training loader."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    features = self(input_config, split).dataset_info.features
    records = self(input_config, split, decoders={k: tfds.decode.SkipDecoding() for k in features if k not in keys})
    values: dict[str, list[Any]] = {k: [] for k in keys}
    for start in range(0, len(records), 1024):  # chunks: the undecoded images are dropped as we go
      for r in records.__getitems__(range(start, min(start + 1024, len(records)))):
        for k in keys:
          values[k].append(r[k])
    return {k: np.asarray(v) for k, v in values.items()}


def tfds_source(tfds_name: str, *, builder_config: str | None = None) -> TfdsSource:
  """The `source` of a TFDS dataset (see `TfdsSource`)."""
  return TfdsSource(tfds_name, builder_config)


def read_columns(spec: DatasetSpec, input_config: Any, split: str, records: Sequence[Record],
                 keys: Sequence[str]) -> dict[str, np.ndarray]:
  """{key: [len(records)] array} of a few small fields of every record of
  `split`: through the source's `columns` when it has one (no image decoded),
  else by reading `records` (in-memory sources)."""
  columns = getattr(spec.source, "columns", None)
  if columns is not None:
    return columns(input_config, split, keys)
  return {k: np.asarray([records[i][k] for i in range(len(records))]) for k in keys}
