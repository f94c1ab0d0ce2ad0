r"""Dense LSeg features of frames, one `.npy` per frame, resumable.

  python -m lseg_jax.embed --checkpoint models/lseg --out feats/ frames/
  python -m lseg_jax.embed --exported lseg.jaxexport --preset native --dtype float32 --out feats/ a.jpg b.jpg
  python -m lseg_jax.embed --checkpoint models/lseg --vis pca --out feats/ video.mp4   # pip install 'lseg-jax[video]'

For each frame NAME (the file name, suffix kept; a video's frames are
VIDEO_000000, VIDEO_000001, ...): NAME.npy, [H', W', 512] unit vectors
(`Segmenter.embed`), float16 unless --dtype float32. Sizes: at the model's
native resolution H' = ceil(H/2), W' = ceil(W/2) (a 640x480 frame: 79 MB in
float16), with --full_size the frame's own H x W (315 MB); the features are
those of --preset (README "Dense features"). manifest.json records the
model, the preset and every option, the dtype and each frame's source,
image size and feature shape.

Resumable and safe: each .npy is written to a temporary name and renamed,
so a kill -9 or a full disk never leaves a half-written file under a final
name; a rerun with the same options skips the frames already written. A
folder holding another configuration's features is refused. A frame that
cannot be read is reported and skipped (exit 1 at the end).

--vis pca writes NAME_pca.png: the features projected on three principal
directions fitted once, on the first frame, and stored in the manifest, so
that colours are consistent across a sequence.

Exit codes: 0 every frame written; 1 some frames failed; 2 a usage error
(one `error:` line, before the model is loaded) or no frame usable.
"""

import argparse
from collections.abc import Iterator
import dataclasses
import importlib.util
import json
from pathlib import Path
import sys
import time

import numpy as np
from PIL import Image

from lseg_jax import cli, features, files, images as images_lib, pictures
from lseg_jax.segmenter import Segmenter

MANIFEST = "manifest.json"
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser("python -m lseg_jax.embed", __doc__)
  p.add_argument("inputs", nargs="+", help="image files, folders of images, videos")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="model directory or training workdir")
  model.add_argument("--exported", help="an artifact of python -m lseg_jax.export")
  p.add_argument("--out", required=True, help="output folder (NAME.npy per frame, manifest.json)")
  p.add_argument("--preset", default="native", choices=list(features.PRESETS),
                 help="extraction recipe (README 'Dense features', lseg_jax.features)")
  p.add_argument("--full_size", action="store_true",
                 help="native preset: features at the frame's own size (4x the bytes: a 640x480 frame is 315 MB "
                 "in float16, 79 MB at the native H/2 x W/2)")
  p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage dtype")
  p.add_argument("--vis", choices=("pca",), help="also write NAME_pca.png")
  return p.parse_args(argv)


def frames(paths: list[Path]) -> Iterator[tuple[str, str, np.ndarray | images_lib.ImageError]]:
  """(name, source, uint8 RGB frame or the ImageError) of every input in order."""
  names = images_lib.output_names(paths)
  for path, name in zip(paths, names):
    if path.suffix.lower() in VIDEO_SUFFIXES:
      yield from video_frames(path, name)
      continue
    try:
      yield name, str(path), images_lib.read_image(path)
    except images_lib.ImageError as e:
      yield name, str(path), e


def video_frames(path: Path, name: str) -> Iterator[tuple[str, str, np.ndarray | images_lib.ImageError]]:
  """The frames of a video file, decoded by PyAV (the `video` extra)."""
  import av  # pylint: disable=g-import-not-at-top  # optional: the `video` extra
  try:
    with av.open(str(path)) as container:
      for i, frame in enumerate(container.decode(video=0)):
        yield f"{name}_{i:06d}", f"{path}#{i}", frame.to_ndarray(format="rgb24")
  except av.error.FFmpegError as e:
    yield name, str(path), images_lib.ImageError(f"cannot read video {path}: {e}")


def expand(inputs: list[str]) -> list[Path]:
  """Image files, the images of folders, and video files; ValueError if none
  or if one does not exist."""
  paths = []
  for item in map(Path, inputs):
    if not item.exists():
      raise ValueError(f"input {item} does not exist")
    paths += [item] if item.suffix.lower() in VIDEO_SUFFIXES else images_lib.expand_inputs([str(item)])
  if any(p.suffix.lower() in VIDEO_SUFFIXES for p in paths) and importlib.util.find_spec("av") is None:
    raise ValueError("video input needs PyAV: pip install 'lseg-jax[video]' (or give a folder of frames)")
  return paths


def complete(path: Path, shape: tuple[int, ...], dtype: str) -> bool:
  """Whether `path` is a finished .npy of this shape and dtype (header and size checked)."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      got_shape, _, got_dtype = read_header(f)
      data_start = f.tell()
  except (OSError, ValueError):
    return False
  expected = data_start + int(np.prod(shape)) * np.dtype(dtype).itemsize
  return tuple(got_shape) == tuple(shape) and got_dtype == np.dtype(dtype) and path.stat().st_size == expected


def read_manifest(out: Path, settings: dict) -> dict:
  """The folder's manifest if its settings are `settings`, a new one if there is
  none; ValueError if it holds another configuration's features."""
  path = out / MANIFEST
  if not path.exists():
    return {**settings, "frames": {}}
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"--out {out}: unreadable {MANIFEST} ({e})") from None
  differ = sorted(k for k in settings if manifest.get(k) != settings[k] and k != "pca")
  if differ:
    raise ValueError(f"--out {out} holds features of another configuration ({', '.join(differ)} differ): "
                     "use another --out")
  return manifest


def write_manifest(out: Path, manifest: dict) -> None:
  files.write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))


def main(argv: list[str] | None = None) -> int:
  cli.quiet_libraries()
  try:
    args = parse_args(argv)
    out, source = Path(args.out), args.checkpoint or args.exported
    settings = {"model": str(Path(source).absolute()), "preset": args.preset, "dtype": args.dtype,
                "options": {"full_size": args.full_size, **dataclasses.asdict(features.PRESETS[args.preset])},
                "layout": "[H', W', D] per frame, C order"}
    settings = json.loads(json.dumps(settings))  # as the manifest stores it (tuples as lists)
    if args.full_size and args.preset != "native":
      raise ValueError(f"--full_size is the native preset's option: {args.preset} has its own output size")
    paths = expand(args.inputs)
    Segmenter.peek(source)  # a model at all
    images_lib.prepare_out_dir(out)
    manifest = read_manifest(out, settings)
    seg = Segmenter.load(source)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dim, preset = int(seg.model_config.text.embed_dim), features.PRESETS[args.preset]
  failed = written = skipped = 0
  started, done = time.time(), 0
  pending: list[tuple[str, str, np.ndarray]] = []
  group = len(seg.mesh.devices.flat)

  total = None if any(p.suffix.lower() in VIDEO_SUFFIXES for p in paths) else len(paths)

  def handle(name: str, src: str, frame: np.ndarray | images_lib.ImageError) -> None:
    """Skips a finished frame, queues the others (flushing full groups)."""
    nonlocal failed, skipped
    if isinstance(frame, images_lib.ImageError):
      print(f"error: {frame}", file=sys.stderr)
      failed += 1
      return
    record = {"source": src, "image_size": list(frame.shape[:2]),
              "shape": [*features.output_size(*frame.shape[:2], preset, args.full_size), dim]}
    if manifest["frames"].get(name, record) == record and complete(out / f"{name}.npy", record["shape"], args.dtype) \
        and (args.vis != "pca" or (out / f"{name}_pca.png").exists()):
      manifest["frames"][name] = record  # a kill may have come between the file and the manifest
      skipped += 1
      return
    pending.append((name, src, frame))
    if len(pending) == group:
      flush()

  def flush() -> None:
    nonlocal written, failed, done
    try:
      maps = seg.embed([frame for *_, frame in pending], preset=args.preset, full_size=args.full_size)
    except ValueError as e:  # an artifact's fixed window
      print(f"error: {', '.join(name for name, *_ in pending)}: {e}", file=sys.stderr)
      failed += len(pending)
      pending.clear()
      return
    for (name, src, frame), f in zip(pending, maps):
      files.write_atomic(out / f"{name}.npy", lambda file: np.save(file, f.astype(args.dtype)))
      if args.vis == "pca":
        manifest.setdefault("pca", pictures.fit_pca(f))
        picture = Image.fromarray(pictures.pca_picture(f, manifest["pca"]))
        files.write_atomic(out / f"{name}_pca.png", lambda file: picture.save(file, format="PNG"))
      manifest["frames"][name] = {"source": src, "image_size": list(frame.shape[:2]), "shape": list(f.shape)}
      written += 1
    done += len(pending)
    pending.clear()
    write_manifest(out, manifest)
    rate = done / max(time.time() - started, 1e-9)
    seen = written + skipped + failed
    eta = f" eta={(total - seen) / rate:.0f}s" if total else ""
    print(f"[{seen}/{total or '?'} frames] {rate:.2f} frames/s{eta}", flush=True)

  try:
    for name, src, frame in frames(paths):
      handle(name, src, frame)
    if pending:
      flush()
    write_manifest(out, manifest)
  except OSError as e:  # a full disk, a lost mount: what was renamed into place is complete
    print(f"error: cannot write to {out}: {e.strerror or e}; rerun to finish (finished frames are kept)",
          file=sys.stderr)
    return 1
  print(f"wrote {written} frames to {out} ({skipped} already there, {failed} failed)")
  return 0 if not failed else 1 if written + skipped else 2


if __name__ == "__main__":
  sys.exit(main())
