r"""The web demo: type any labels, see an image segmented by them.

  python train.py && python -m lseg_jax.serve --checkpoint <the printed workdir>
  python -m lseg_jax.serve --exported lseg.jaxexport --port 8080
  python -m lseg_jax.serve --checkpoint models/lseg_vitl16 --host 0.0.0.0   # reachable from other machines

Then open the printed address. The page (one static file, `lseg_jax/web/`)
uploads an image (file picker or drag and drop), takes comma-separated
labels (or a vocabulary: the model's training labels, ADE20K-150, PASCAL VOC,
COCO) and a prompt template, and shows the overlay with a legend of the
labels present, the colour label map, or one label's probability heatmap;
multi-scale + flip on request; the dense features in PCA colours for a
checkpoint. It offers the label ids (PNG, NPY) and the overlay for download:
the ids equal `lseg_jax.predict`'s for the same image, labels and options.

The server is the standard library's threaded HTTP server over one
`lseg_jax.segmenter.Segmenter`, loaded once at start. Model calls run one at
a time (a compile never races another); at most --queue requests wait for
it, later ones get 503 "busy" at once; the page and its status stay served
meanwhile. Images whose long side is over --max_side are resized to it (the
page says so); a body over --max_upload_mb gets 413. Every bad request gets
one line in its JSON `error` and the server goes on. It binds 127.0.0.1
unless --host says otherwise, serves only its own static files, and writes
no file.
"""

import argparse
import base64
import dataclasses
import http.server
import importlib.resources
import io
import json
import sys
import threading
import time

import numpy as np
from PIL import Image, UnidentifiedImageError

from lseg_jax import cli, data, images as images_lib, inference, labels as labels_lib, pictures
from lseg_jax.data import ade20k, coco20i, pascal5i
from lseg_jax.segmenter import Segmenter, size_problem

STATIC = {"/": ("index.html", "text/html; charset=utf-8")}  # path -> (file in lseg_jax/web, type): all it serves
TEMPLATES = ("{}", "a photo of a {}.", "a picture of a {}.", "an image of a {}.")
MAX_PIXELS = 50_000_000  # an upload's header over this is refused before decoding (a decompression bomb)


class RequestError(Exception):
  """A bad request: its HTTP status and one line for the page."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Options:
  """What a segment request asks for (the page's form, as JSON)."""
  labels: list[str]
  template: str = "{}"
  multiscale: bool = False
  features: bool = False

  @classmethod
  def parse(cls, payload: dict) -> "Options":
    raw = payload.get("labels", "")
    if isinstance(raw, list) and all(isinstance(label, str) for label in raw):  # an API client's JSON list
      if any("," in label for label in raw):
        raise RequestError(400, "a label may not contain a comma")
      raw = ",".join(raw)
    if not isinstance(raw, str):
      raise RequestError(400, "labels must be one comma-separated string or a list of strings")
    try:
      labels = labels_lib.parse_labels(raw)
    except ValueError as e:
      raise RequestError(400, str(e)) from None
    template = str(payload.get("template") or "{}")
    if "{}" not in template:
      raise RequestError(400, f"the prompt template {template!r} has no {{}} for the label")
    return cls(labels, template, bool(payload.get("multiscale")), bool(payload.get("features")))


def png_url(pixels: np.ndarray | Image.Image) -> str:
  buf = io.BytesIO()
  (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buf, "PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def npy_url(array: np.ndarray) -> str:
  buf = io.BytesIO()
  np.save(buf, array)
  return "data:application/octet-stream;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_upload(payload: dict, max_side: int) -> tuple[np.ndarray, str | None]:
  """(uint8 RGB [h, w, 3] no longer than max_side, a note when resized) of the
  payload's base64 `image`; RequestError naming what is wrong with it."""
  name = str(payload.get("name") or "the upload")
  try:
    raw = base64.b64decode(str(payload.get("image", "")), validate=True)
  except ValueError:
    raise RequestError(400, f"{name} is not base64 image data") from None
  if not raw:
    raise RequestError(400, "no image: choose or drop an image file")
  try:
    with Image.open(io.BytesIO(raw)) as im:
      w, h = im.size
  except UnidentifiedImageError:
    raise RequestError(400, f"cannot read image {name}: not an image format Pillow can decode") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise RequestError(400, f"cannot read image {name}: {e}") from None
  if w * h > MAX_PIXELS:
    raise RequestError(413, f"{name} is {w}x{h} pixels, over the limit of {MAX_PIXELS / 1e6:g} megapixels")
  try:
    image = images_lib.read_image(raw, name)
  except images_lib.ImageError as e:
    raise RequestError(400, str(e)) from None
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image, None
  nh, nw = inference.scaled_size(h, w, max_side)
  resized = np.asarray(Image.fromarray(image).resize((max(nw, 1), max(nh, 1)), Image.BILINEAR))
  return resized, f"resized from {w}x{h} to {resized.shape[1]}x{resized.shape[0]} (the server's --max_side {max_side})"


class Demo:
  """The model side of the server: one Segmenter, one model call at a time,
  at most `queue` requests waiting for it."""

  def __init__(self, seg: Segmenter, max_side: int, max_logits_gb: float, queue: int):
    self.seg, self.max_side, self.max_logits_gb = seg, max_side, max_logits_gb
    self._model_lock = threading.Lock()
    self._slots = threading.BoundedSemaphore(queue + 1)  # the running request and the waiting ones
    self.running_since: float | None = None

  def vocabularies(self) -> dict[str, list[str]]:
    vocab = {}
    dataset = self.seg.run.get("input", {}).get("dataset") if self.seg.run is not None else None
    if dataset:
      vocab["this model's training labels"] = list(data.label_names(dataset))
    vocab["ADE20K (150)"] = list(ade20k.ADE20K_LABELS)
    vocab["PASCAL VOC (background + 20)"] = ["background", *pascal5i.PASCAL_LABELS]
    vocab["COCO (background + 80)"] = ["background", *coco20i.COCO_LABELS]
    return vocab

  def info(self) -> dict:
    return {"vocabularies": self.vocabularies(), "templates": list(TEMPLATES), "max_side": self.max_side,
            "features": self.seg.window is None, "note": self.seg.note, "busy": self.running_since is not None}

  def segment(self, payload: dict) -> dict:
    """The page's result for one request (pictures as data URLs)."""
    options = Options.parse(payload)
    if options.features and self.seg.window is not None:
      raise RequestError(400, "dense features need a checkpoint: this server runs an export artifact")
    image, resized = decode_upload(payload, self.max_side)
    h, w = image.shape[:2]
    geometry = self.seg.geometry()
    ms = self.seg.multiscale(geometry, inference.MultiScale.scales if options.multiscale else (1.0,),
                             flip=options.multiscale)
    if problem := size_problem(h, w, len(options.labels), geometry, ms, self.max_logits_gb):
      raise RequestError(413, f"this image cannot be segmented: {problem}")
    if not self._slots.acquire(blocking=False):
      raise RequestError(503, "busy: other requests are waiting for the model; try again in a moment")
    try:
      with self._model_lock:
        self.running_since = time.time()
        try:
          return self._run(image, options, ms, resized)
        finally:
          self.running_since = None
    finally:
      self._slots.release()

  def _run(self, image: np.ndarray, options: Options, ms: inference.MultiScale, resized: str | None) -> dict:
    t = time.time()
    try:
      text = self.seg.encode_labels(options.labels, (options.template,))
    except ValueError as e:  # a label over the text tower's 77 tokens
      raise RequestError(400, str(e)) from None
    (ids, logits), = self.seg.segment([image], text, geometry=self.seg.geometry(), scales=ms.scales, flip=ms.flip,
                                      return_logits=True)
    features = None
    if options.features:
      native, = self.seg.embed([image])
      features = png_url(pictures.pca_picture(native, pictures.fit_pca(native)))
    seconds = time.time() - t
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [h, w, N]
    colours = pictures.palette(len(options.labels))
    drawn, _ = pictures.legend_labels(options.labels)
    present, counts = np.unique(ids, return_counts=True)
    return {
        "width": image.shape[1], "height": image.shape[0], "labels": options.labels, "resized": resized,
        "seconds": round(seconds, 3),
        "present": [{"id": int(i), "name": options.labels[i], "colour": "#%02x%02x%02x" % tuple(colours[i]),
                     "share": round(int(c) / ids.size, 4)} for i, c in zip(present, counts)],
        "overlay": png_url(pictures.blend(image, ids, colours)),
        "label_map": png_url(colours[ids]),
        "heatmaps": {int(i): png_url(pictures.heatmap(probs[..., i])) for i in present},
        "features": features,
        "downloads": {"ids.png": png_url(ids.astype(np.uint8 if len(options.labels) < 256 else np.uint16)),
                      "ids.npy": npy_url(ids.astype(np.int32)),
                      "overlay.png": png_url(pictures.overlay_with_legend(image, ids, drawn, colours))},
    }


class DemoServer(http.server.ThreadingHTTPServer):
  """A thread per connection; connections beyond the queue wait in the
  kernel's backlog (Python's default of 5 resets a burst of 20)."""
  daemon_threads = True
  request_queue_size = 128


def make_handler(demo: Demo, max_upload: int, static: dict[str, bytes]):
  """The request handler class of a server over `demo`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "lseg-jax"
    timeout = 60  # seconds a client may take to send its request (a stalled upload is dropped)

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      pass  # one line per request would bury the server's own lines

    def send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.send_header("X-Content-Type-Options", "nosniff")
      self.end_headers()
      self.wfile.write(body)

    def send_json(self, status: int, obj: dict) -> None:
      self.send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.split("?", 1)[0]
      if path in STATIC:
        self.send(200, static[path], STATIC[path][1])
      elif path == "/api/info":
        self.send_json(200, demo.info())
      elif path == "/api/status":
        since = demo.running_since
        self.send_json(200, {"busy": since is not None, "running_s": None if since is None else time.time() - since})
      else:
        self.send_json(404, {"error": f"no such page: {path}"})

    def do_POST(self):  # pylint: disable=invalid-name
      try:
        if self.path != "/api/segment":
          raise RequestError(404, f"no such endpoint: {self.path}")
        self.send_json(200, demo.segment(self.read_payload()))
      except RequestError as e:
        self.send_json(e.status, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except  # the server outlives any one request
        print(f"error: a request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self.send_json(500, {"error": f"the server failed on this request ({type(e).__name__}: {e})"})

    def read_payload(self) -> dict:
      length = self.headers.get("Content-Length")
      if length is None or not length.isdigit():
        self.close_connection = True
        raise RequestError(411, "the request has no Content-Length")
      if int(length) > max_upload:
        self.close_connection = True  # its body is not read
        raise RequestError(413, f"the upload is {int(length) / 1e6:.1f} MB, over the server's limit of "
                                f"{max_upload / 1e6:g} MB (--max_upload_mb)")
      try:
        body = self.rfile.read(int(length))
      except TimeoutError:
        body = b""
      if len(body) < int(length):
        self.close_connection = True
        raise RequestError(400, f"the upload was cut short ({len(body)} of {length} bytes arrived)")
      try:
        payload = json.loads(body)
      except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not JSON") from None
      if not isinstance(payload, dict):
        raise RequestError(400, "the request body is not a JSON object")
      return payload

  return Handler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser("python -m lseg_jax.serve", __doc__)
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="model directory or training workdir")
  model.add_argument("--exported", help="an artifact of python -m lseg_jax.export")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
  p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
  p.add_argument("--max_side", type=int, default=1024, help="larger images are resized to this long side")
  p.add_argument("--max_upload_mb", type=float, default=20.0, help="largest request body accepted (MB)")
  p.add_argument("--queue", type=int, default=4, help="requests that may wait for the model (more: 503 busy)")
  p.add_argument("--max_logits_gb", type=float, default=4.0, help="refuse images whose logits need more (GB)")
  p.add_argument("--no_warmup", action="store_true", help="start at once; the first request compiles")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  cli.quiet_libraries()
  try:
    args = parse_args(argv)
    source = args.checkpoint or args.exported
    if args.max_side < 32 or args.queue < 0 or not args.max_upload_mb > 0 or not args.max_logits_gb > 0:
      raise ValueError("--max_side must be at least 32, --queue at least 0, --max_upload_mb and --max_logits_gb "
                       "positive")
    Segmenter.peek(source)  # a model at all, before the weights are read
    static = {path: importlib.resources.files("lseg_jax").joinpath("web", file).read_bytes()
              for path, (file, _) in STATIC.items()}
    try:
      server = DemoServer((args.host, args.port), None)
    except OSError as e:
      raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"loading {source}", flush=True)
  seg = Segmenter.load(source)
  if seg.note:
    print(seg.note, flush=True)
  demo = Demo(seg, args.max_side, args.max_logits_gb, args.queue)
  if not args.no_warmup:  # the run's own input size compiles now, not on the first request
    t = time.time()
    side = seg.geometry().crop_size
    seg.segment([np.zeros((side, side, 3), np.uint8)], seg.encode_labels(["other"]), return_logits=True)
    print(f"compiled a {side}x{side} image in {time.time() - t:.0f}s (other sizes and label counts compile on "
          "first use)", flush=True)
  server.RequestHandlerClass = make_handler(demo, int(args.max_upload_mb * 1e6), static)
  host, port = server.server_address[:2]
  print(f"ready: http://{host}:{port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
