r"""A portable inference artifact: the segmenter and the text tower as
serialized `jax.export` modules (StableHLO + calling convention), with the
parameters inside, so the file alone serves the model.

  python -m lseg_jax.export --checkpoint models/lseg_demo --out lseg.jaxexport
  python -m lseg_jax.predict --exported lseg.jaxexport --labels "dog,grass,other" --out out/ photo.jpg
  python eval.py --exported lseg.jaxexport --config configs/ade20k_lseg_vitl16.py --protocol multiscale

The file is a zip of
  segment.bin      (images [b, S, S, 3] float32, normalised; text [b, N, D] float32;
                    label_mask [b, N] bool) -> logits [b, S, S, N] float32
  pixel_features.bin  images [b, S, S, 3] -> head1's output [b, S/2, S/2, D] float32
                    (`LSeg.pixel_features`, before the L2 normalisation that
                    gives the dense features; the recipes that resize first
                    start from it)
  encode_text.bin  (token_ids [N, 77] int32, CLIP BPE) -> text embeddings [N, D] float32
  meta.json        window S, size_multiple, normalisation mean/std, the run's input
                   settings (`input`: eval_mode, base_size, crop_size, normalization,
                   as lseg_jax.geometry reads them), context_length, embed_dim,
                   platforms, and the model config
b and N are symbolic: any batch and any number of labels, chosen at run
time. S is fixed (--window, default the checkpoint run's crop size or 480):
the ViT resizes its position embedding for the token grid while tracing, so
the window cannot be symbolic; multi-scale inference slides S x S windows
anyway. Lowered for CPU, CUDA and TPU (`--platforms`).

Serving with JAX alone (no lseg_jax):

  import json, zipfile, jax, numpy as np
  z = zipfile.ZipFile("lseg.jaxexport")
  segment, encode_text = (jax.export.deserialize(z.read(f)) for f in ("segment.bin", "encode_text.bin"))
  meta = json.loads(z.read("meta.json"))
  ids = ...  # [N, 77] int32: clip.tokenize / open_clip.tokenize of the labels (0-padded)
  text = encode_text.call(ids)                                           # [N, D]
  x = (image / 255.0 - np.array(meta["mean"])) / np.array(meta["std"])   # [S, S, 3]
  logits = segment.call(x[None].astype(np.float32), text[None], np.ones((1, len(ids)), bool))
  head1 = jax.export.deserialize(z.read("pixel_features.bin")).call(x[None].astype(np.float32))
  features = head1 / np.linalg.norm(head1, axis=-1, keepdims=True)  # [1, S/2, S/2, D]: Segmenter.embed's
  # in PyTorch, without a copy: torch.from_dlpack(features)

Serialisation needs the `flatbuffers` package (jax's own optional dependency).
"""

import argparse
import dataclasses
import json
from pathlib import Path
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lseg_jax import checkpoint, cli, files, geometry
from lseg_jax.data import transforms
from lseg_jax.models import LSeg, build_model
from lseg_jax.models.layers import upsample2x

PLATFORMS = ("cpu", "cuda", "tpu")
FILES = ("segment.bin", "pixel_features.bin", "encode_text.bin", "meta.json")


def export_model(model: LSeg, variables: dict, window: int, platforms=PLATFORMS) -> dict[str, jax.export.Exported]:
  """{'segment', 'pixel_features', 'encode_text'}: `model` with `variables` (text tower
  included) closed over, b and N symbolic (see the module docstring)."""
  params = {k: v for k, v in variables["params"].items() if k != "text_encoder"}
  image_vars = {"params": params, "batch_stats": variables.get("batch_stats", {})}
  text_vars = {"params": {"text_encoder": variables["params"]["text_encoder"]}}
  b, n = jax.export.symbolic_shape("b, n")
  dim = model.head.embed_dim
  segment = jax.jit(lambda x, t, m: model.apply(image_vars, x, t, m))
  encode = jax.jit(lambda ids: model.apply(text_vars, ids, method=LSeg.encode_text))
  spec = jax.ShapeDtypeStruct
  pixel_features = jax.jit(lambda x: model.apply(image_vars, x, method=LSeg.pixel_features))
  return {
      "segment": jax.export.export(segment, platforms=platforms)(
          spec((b, window, window, 3), jnp.float32), spec((b, n, dim), jnp.float32), spec((b, n), jnp.bool_)),
      "pixel_features": jax.export.export(pixel_features, platforms=platforms)(spec((b, window, window, 3), jnp.float32)),
      "encode_text": jax.export.export(encode, platforms=platforms)(
          spec((n, model.text_encoder.context_length), jnp.int32)),
  }


def write_artifact(out: Path, exported: dict[str, jax.export.Exported], meta: dict) -> None:
  """The zip of the module docstring, written whole or not at all."""

  def write(f):
    with zipfile.ZipFile(f, "w") as z:
      for name, module in exported.items():
        z.writestr(f"{name}.bin", bytes(module.serialize()))
      z.writestr("meta.json", json.dumps(meta, indent=2))

  files.write_atomic(out, write)


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A deserialized artifact that stands in for the Flax model where the
  project calls `model.apply(variables, images, text, label_mask)` or
  `model.apply(variables, token_ids, method=LSeg.encode_text)` (variables are
  ignored: the parameters are inside)."""
  segment: jax.export.Exported
  pixel_features: jax.export.Exported
  encode_text: jax.export.Exported
  meta: dict

  def apply(self, variables, x: jax.Array, text: jax.Array | None = None, label_mask: jax.Array | None = None,
            train: bool = False, method=None) -> jax.Array:
    del variables, train
    if method is LSeg.pixel_features:  # images [b, S, S, 3] -> head1's output [b, S/2, S/2, D]
      return self.pixel_features.call(x)
    if method is LSeg.embed:
      pixels = self.pixel_features.call(x)
      return pixels / jnp.linalg.norm(pixels, axis=-1, keepdims=True)
    if method is LSeg.score:  # unit pixel embeddings [b, h, w, D], text -> logits [b, 2h, 2w, N]
      return self.score(x, text)
    if method is not None:  # token ids [..., 77] -> [..., D]
      ids = jnp.asarray(x, jnp.int32)
      return self.encode_text.call(ids.reshape(-1, ids.shape[-1])).reshape(*ids.shape[:-1], -1)
    text = jnp.broadcast_to(text, (x.shape[0], *text.shape[-2:]))  # [b, N, D]
    mask = jnp.ones(text.shape[:2], bool) if label_mask is None else jnp.broadcast_to(label_mask, text.shape[:2])
    return self.segment.call(x, text, mask)

  def score(self, pixels: jax.Array, text: jax.Array) -> jax.Array:
    """`LSeg.score` without model code, for a head with no spatial
    regularisation blocks (their parameters are not in the artifact)."""
    model = self.meta["model"]
    if model.get("arch_option"):
      raise ValueError(f"this artifact's head has spatial regularisation blocks (arch_option "
                       f"{model['arch_option']}): score its features with the checkpoint")
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    spec = "bhwd,nd->bhwn" if text.ndim == 2 else "bhwd,bnd->bhwn"
    return upsample2x(model["logit_scale"] * jnp.einsum(spec, pixels, text))

  @property
  def window(self) -> int:
    return int(self.meta["window"])

  @property
  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(self.meta["mean"], np.float32), np.asarray(self.meta["std"], np.float32)


def load(path: str | Path) -> ExportedModel:
  """An artifact written by `write_artifact`; ValueError naming the file if it is not one."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--exported {path} does not exist or is not a file")
  try:
    with zipfile.ZipFile(path) as z:
      blobs = {name: z.read(name) for name in FILES}
  except (zipfile.BadZipFile, KeyError) as e:
    raise ValueError(f"--exported {path} is not an lseg_jax.export artifact ({e})") from None
  return ExportedModel(*(jax.export.deserialize(bytearray(blobs[f"{name}.bin"]))
                         for name in ("segment", "pixel_features", "encode_text")), json.loads(blobs["meta.json"]))


def artifact_meta(model_config: ml_collections.ConfigDict, recorded: dict, window: int, platforms) -> dict:
  """meta.json: the window, normalisation and the run's input settings
  (`geometry.RECORDED`, the crop size being the window), so that the
  artifact sees an image as the checkpoint does."""
  normalization = geometry.input_normalization(recorded, model_config)
  mean, std = transforms.normalization_stats(normalization)
  return {"window": window, "size_multiple": LSeg.size_multiple, "normalization": normalization, "mean": mean.tolist(),
          "std": std.tolist(), "input": {**recorded, "crop_size": window, "normalization": normalization},
          "context_length": model_config.text.context_length, "embed_dim": model_config.text.embed_dim,
          "platforms": list(platforms), "model": model_config.to_dict()}


def recorded_input(meta: dict) -> dict:
  """The run's input settings an artifact records (`artifact_meta`)."""
  return dict(meta["input"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser("python -m lseg_jax.export", __doc__)
  p.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  p.add_argument("--out", required=True, help="artifact file to write")
  p.add_argument("--window", type=int, help="window side S, a multiple of 32 (default: the run's crop size, else 480)")
  p.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated: cpu,cuda,tpu")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  cli.quiet_libraries()
  try:
    args = parse_args(argv)
    platforms = tuple(s.strip() for s in args.platforms.split(","))
    if not platforms or set(platforms) - set(PLATFORMS):
      raise ValueError(f"--platforms {args.platforms!r}: choose from {', '.join(PLATFORMS)}")
    recorded = geometry.recorded_input(checkpoint.read_run_config(args.checkpoint))
    window = args.window or geometry.input_geometry(recorded, None, None, None).crop_size
    if window <= 0 or window % 32:
      raise ValueError(f"--window {window} is not a positive multiple of 32")
    out = Path(args.out)
    checkpoint.check_writable(out)
    config, variables = checkpoint.load_model(args.checkpoint)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  exported = export_model(build_model(config), variables, window, platforms)
  write_artifact(out, exported, artifact_meta(config, recorded, window, platforms))
  print(f"wrote {out} (window {window}, platforms {', '.join(platforms)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
