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
  `example_fn(record) -> {"image", "mask", "label_ids"}` doing it all.

Examples:
  register("lseg_shapes", source=tfds_source("lseg_shapes"), labels=shapes.LABELS)
  register("ade20k", source=tfds_source("ade20k_lseg"), labels=ADE20K_LABELS,
           mask_fn=ade20k_mask_map)  # raw 0 -> -1, k -> k-1

Registered functions run inside grain worker processes, which get them through
cloudpickle: module-level functions are the safe choice.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import difflib
from typing import Any

import numpy as np

IGNORE_INDEX = -1
Record = Mapping[str, Any]
Source = Callable[[Any, str], Sequence[Record]]  # (input_config, split) -> records


def identity_mask(mask: np.ndarray) -> np.ndarray:
  """Raw mask values already are label-table ids (lseg_shapes)."""
  return mask.astype(np.int32)


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

  def label_names(self) -> tuple[str, ...]:
    labels = self.labels() if callable(self.labels) else self.labels
    return tuple(labels)

  def to_example(self, record: Record) -> dict[str, Any]:
    """Raw record -> {"image": [H, W, C] uint8, "mask": int32 [H, W] of
    label-table ids (-1 = ignore), "label_ids": int32 [N] or None (all)}."""
    if self.example_fn is not None:
      ex = dict(self.example_fn(record))
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
             overwrite: bool = False) -> DatasetSpec:
  """Registers a dataset under `name` and returns its spec."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"Dataset {name!r} is already registered (pass overwrite=True to replace it).")
  spec = DatasetSpec(name=name, source=source, labels=labels, mask_fn=mask_fn,
                     label_set_fn=label_set_fn, image_key=image_key, mask_key=mask_key,
                     example_fn=example_fn)
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


def tfds_source(tfds_name: str, *, builder_config: str | None = None) -> Source:
  """A `source` reading a TFDS dataset through `tfds.data_source` (ArrayRecord,
  no TensorFlow needed).

  Reads from the input config: `data_dir` (None = the TFDS default),
  `manual_dir`, `prepare` (download_and_prepare when missing) and
  `builder_config` (a TFDS builder config name; overrides the one given here).
  """
  def source(input_config: Any, split: str) -> Sequence[Record]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    config = input_config.get("builder_config") or builder_config
    builder_kwargs: dict[str, Any] = {"file_format": "array_record"}
    if config is not None:
      builder_kwargs["config"] = config
    dl_kwargs = {}
    if input_config.get("manual_dir"):
      dl_kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=input_config.manual_dir)
    return tfds.data_source(tfds_name, split=split, data_dir=input_config.get("data_dir"),
                            download=bool(input_config.get("prepare", True)),
                            builder_kwargs=builder_kwargs,
                            download_and_prepare_kwargs=dl_kwargs or None)
  return source
