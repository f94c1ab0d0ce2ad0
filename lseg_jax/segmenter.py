"""One inference object for every front end (predict, eval of an artifact,
the web demo): loaded once from a model directory, a training workdir or an
`lseg_jax.export` artifact, it encodes labels and segments images of any
size and count on the devices.

  seg = Segmenter.load("models/lseg_demo")          # or a workdir, or lseg.jaxexport
  text = seg.encode_labels(["dog", "grass", "other"])  # [N, D]
  (ids, logits), = seg.segment([image], text, return_logits=True)

The same inputs give the same outputs whatever the source: an artifact
records the run's input settings (`lseg_jax.geometry.RECORDED`), so it sees
an image as the checkpoint does. Compiles are bounded: image sides are
bucketed (`inference.size_bucket`), the label count padded to a multiple of
labels.LABEL_BUCKET (padded labels masked out of every result), windows run in
fixed batches.
"""

from collections.abc import Sequence
import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lseg_jax import checkpoint, data, export, features as features_lib, geometry as geometry_lib, inference
from lseg_jax import labels as labels_lib, sharding
from lseg_jax.data import transforms
from lseg_jax.models import LSeg, build_model, presets
from lseg_jax.models.layers import upsample2x

WINDOWS_PER_DEVICE = 4  # windows each device runs per step
# Bytes of window feature maps one device step may hold before folding them
# into the image's map: a 480 px dff or vlmaps map is 472 MB and openscene's
# 640 px one 210 MB, so those run one window per step (measured on the CPU
# when the maps still went to the host: two in one step were 0.69x as fast
# as two steps of one for vlmaps with ViT-B/32, 0.83x for openscene with
# ViT-L/16).
WINDOW_MAPS_PER_STEP = 256e6


def logits_gb(h: int, w: int, num_labels: int, geometry: geometry_lib.Geometry, ms: inference.MultiScale) -> float:
  """Peak device memory, in GB, of one image's float32 logits: the summed
  [H, W, N] map on the bucketed size, one window's share of it being added
  (and, square, the map resized back), the window logits of a step and
  their row resample; the image's copies count as 3 more labels."""
  src_h, src_w = (geometry.base_size, geometry.base_size) if geometry.square else (h, w)
  src = inference.size_bucket(src_h) * inference.size_bucket(src_w)
  full = inference.size_bucket(h) * inference.size_bucket(w) if geometry.square else 0
  crop = ms.crop_size
  windows = WINDOWS_PER_DEVICE * crop * crop + inference.size_bucket(src_h) * crop
  return 4 * (labels_lib.padded_label_count(num_labels) + 3) * (2 * src + 2 * full + windows) / 1e9


def size_problem(h: int, w: int, num_labels: int, geometry: geometry_lib.Geometry, ms: inference.MultiScale,
                 max_gb: float) -> str | None:
  """Why an h x w image cannot be segmented (too thin for the scales, logits
  over `max_gb` of device memory), or None."""
  scaled = [inference.scaled_size(h, w, math.ceil(ms.base_size * s)) for s in ms.scales]
  if not geometry.square and min(min(hw) for hw in scaled) < 1:
    return (f"a {w}x{h} image is too thin for --base_size {ms.base_size} at scale {min(ms.scales):g} "
            "(its short side would be 0 px): use a larger --base_size or --square")
  need = logits_gb(h, w, num_labels, geometry, ms)
  if need > max_gb:
    return (f"its logits ({w}x{h} pixels x {num_labels} labels) need about {need:.1f} GB of device memory, over "
            f"--max_logits_gb {max_gb:g}: use fewer labels or a smaller image, or raise --max_logits_gb")
  return None


def text_tower_note(model_config: ml_collections.ConfigDict, run: ml_collections.ConfigDict | None) -> str | None:
  """One `note:` line when the label embeddings do not come from CLIP (a test
  tower, or a run that initialised its text tower at random): then only the
  labels the model was trained on mean anything."""
  official = [t for name, t in presets.CLIP_TEXT.items() if name != "tiny"]
  init = run.get("init", {}) if run is not None else {}
  if model_config.text.to_dict() not in official:
    why = f"a {model_config.text.width}-wide test tower"
  elif run is not None and not init.get("clip_text") and not init.get("model_dir"):
    why = "initialised at random: the run set neither init.clip_text nor init.model_dir"
  else:
    return None
  trained = ""
  dataset = run.get("input", {}).get("dataset") if run is not None else None
  if dataset:
    names = data.label_names(dataset)
    trained = f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
  return (f"note: this model's text tower is not CLIP ({why}): only the labels it was trained on{trained} are "
          "meaningful; other words give arbitrary maps")


@functools.partial(jax.jit, static_argnums=1)
def _resize_back(sums: jax.Array, out_hw: tuple[int, int], rows: tuple, cols: tuple) -> jax.Array:
  """[G, S, S, N] square logits -> [G, *out_hw, N], per-image taps."""
  del out_hw  # in the taps' shapes; static for the cache key only
  return jax.vmap(inference.resample)(sums, rows[0], rows[1], cols[0], cols[1])


@dataclasses.dataclass
class Segmenter:
  """A loaded model and how it sees images. Build with `Segmenter.load`.

  `model` is the Flax LSeg or an export artifact (both answer
  `.apply(variables, images, text, label_mask)` and `.apply(variables,
  token_ids, method=LSeg.encode_text)`), `params` its variables without the
  text tower (an artifact: {}), `recorded` the run's input settings
  (`geometry.RECORDED`, {} for a converted model), `step` the training
  step of the checkpoint read (None for a model directory or an artifact).
  """
  model: object
  params: dict
  text_params: dict | None
  model_config: ml_collections.ConfigDict
  recorded: dict
  run: ml_collections.ConfigDict | None = None
  mesh: jax.sharding.Mesh | None = None
  window: int | None = None  # an artifact's fixed window side
  step: int | None = None
  forward: inference.DeviceForward | None = None  # default: the model's
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # MultiScale -> its MultiScaleSegmenter

  def __post_init__(self):
    self.forward = self.forward or inference.model_forward(self.model)
    self.params = inference.replicate(self.params, self.mesh)  # one copy, shared by every compiled path

  @classmethod
  def load(cls, source: str | Path, mesh: jax.sharding.Mesh | None = None) -> "Segmenter":
    """From a model directory or training workdir (a folder) or an export
    artifact (a file). FileNotFoundError / ValueError naming the source."""
    source = Path(source)
    mesh = mesh or sharding.make_mesh([("data", -1)])
    if source.is_file():
      model = export.load(source)
      return cls(model, {}, None, ml_collections.ConfigDict(model.meta["model"]), export.recorded_input(model.meta),
                 mesh=mesh, window=model.window)
    run = checkpoint.read_run_config(source)
    config, variables, step = checkpoint.load_model_step(source)
    params = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
              "batch_stats": variables["batch_stats"]}
    return cls(build_model(config), params, variables["params"]["text_encoder"], config,
               geometry_lib.recorded_input(run), run, mesh, step=step)

  @staticmethod
  def peek(source: str | Path) -> tuple[dict, int | None]:
    """(the recorded input settings, an artifact's window) of `source`,
    without reading any weights: for checks before the heavy work."""
    source = Path(source)
    if source.is_file():
      model = export.load(source)
      return export.recorded_input(model.meta), model.window
    checkpoint.read_model_config(source)  # a model directory at all
    return geometry_lib.recorded_input(checkpoint.read_run_config(source)), None

  # ---------------------------------------------------------------- how images are seen

  def geometry(self, square: bool | None = None, base_size: int | None = None,
               crop_size: int | None = None) -> geometry_lib.Geometry:
    """The run's geometry, with the given values overriding it."""
    if self.window is not None and crop_size not in (None, self.window):
      raise ValueError(f"--crop_size {crop_size}: this artifact runs {self.window} px windows")
    return geometry_lib.input_geometry(self.recorded, square, base_size, self.window if crop_size is None else crop_size)

  @property
  def normalization(self) -> str:
    return geometry_lib.input_normalization(self.recorded, self.model_config)

  @property
  def note(self) -> str | None:
    """A line to show a user when the label embeddings are not CLIP's."""
    return text_tower_note(self.model_config, self.run)

  # ---------------------------------------------------------------- labels

  def encode_labels(self, names: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """[N, D] label embeddings (prompt templates averaged, `labels.encode_labels`)."""
    return np.asarray(labels_lib.encode_labels(self.model, self.text_params, list(names), tuple(templates)))

  # ---------------------------------------------------------------- embed

  def embed(self, images: Sequence[np.ndarray], *, preset: "str | features_lib.Preset" = "native", full_size: bool = False
            ) -> list[np.ndarray]:
    """Dense features [h', w', D] float32 of each uint8 RGB image [h, w, 3]
    by a recipe of `features.PRESETS`, by name, or a `features.Preset` of
    one's own (the module docstring says exactly how each one sizes,
    windows, flips, merges and normalises).

    native: the unit pixel embeddings (`LSeg.embed`: head1's output,
    L2-normalised) of one forward of the whole image padded bottom/right to
    the model's multiple of 32 with the normalised black lang-seg pads with:
    [ceil(h/2), ceil(w/2), D] (the model's own resolution, the padding's
    share cropped), or with `full_size` [h, w, D]: the map resized x2 as the
    head resizes its logits (bilinear, align_corners=True), cropped to the
    image and renormalised to unit length. Images of one padded size run
    together, split over the devices; the other presets run their windows in
    fixed batches on the devices, each device folding its image's windows
    into that image's map (`features.merge_rule`)."""
    if isinstance(preset, str):
      if preset not in features_lib.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(features_lib.PRESETS)}")
      preset = features_lib.PRESETS[preset]
    if preset.name != "native":
      if full_size:
        raise ValueError(f"full_size is the native preset's option: {preset.name} has its own output size")
      return self._embed_preset(images, preset)
    mean, std = transforms.normalization_stats(self.normalization)
    multiple = LSeg.size_multiple
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
      by_size.setdefault(tuple(-(-n // multiple) * multiple for n in im.shape[:2]), []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    devices = len(self.mesh.devices.flat)
    for (ph, pw), members in by_size.items():
      if self.window is not None and (ph, pw) != (self.window, self.window):
        raise ValueError(f"this artifact embeds {self.window}x{self.window} inputs; a {images[members[0]].shape[1]}x"
                         f"{images[members[0]].shape[0]} image pads to {pw}x{ph}: embed it from the checkpoint")
      for start in range(0, len(members), devices):
        chunk = members[start:start + devices]
        batch = np.empty((devices, ph, pw, 3), np.float32)
        batch[:] = -mean / std  # the normalised black of the padding (and of the empty slots)
        for j, i in enumerate(chunk):
          h, w = images[i].shape[:2]
          batch[j, :h, :w] = transforms.normalize(images[i], mean, std)
        features = self._embed_fn(full_size)(self.params, batch)  # [devices, H', W', D]
        for j, i in enumerate(chunk):
          h, w = images[i].shape[:2]
          hh, ww = (h, w) if full_size else (-(-h // 2), -(-w // 2))
          out[i] = np.asarray(features[j, :hh, :ww])
    return out

  def score(self, features: np.ndarray, image_size: tuple[int, int], text: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """(label ids [h, w], logits [h, w, N]) of an image of `image_size` from its
    native `embed` features [ceil(h/2), ceil(w/2), D] (float16 or 32) and text
    [N, D]: the rest of the head (`LSeg.score`) on the map padded back to the
    model's multiple, cropped to the image: what `segment` gives for the one
    forward `embed` ran (no resize, no windows) when the image's sides are
    multiples of 32; otherwise the last rows and columns interpolate towards
    the padding's features, which native features crop, and repeating their
    edge there changes a pixel in a few thousand (measured: 1 in 3200)."""
    h, w = image_size
    ph, pw = (-(-n // LSeg.size_multiple) * LSeg.size_multiple for n in (h, w))
    if features.shape[:2] != (-(-h // 2), -(-w // 2)):
      raise ValueError(f"features of shape {features.shape} are not the native features of a {w}x{h} image")
    fh, fw = features.shape[:2]  # the padding's share was cropped: its edge is repeated in its place
    padded = np.pad(np.asarray(features, np.float32), ((0, ph // 2 - fh), (0, pw // 2 - fw), (0, 0)), mode="edge")[None]
    key = ("score", len(text))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(lambda params, f, t: self.model.apply(params, f, t, method=LSeg.score))
    logits = np.asarray(self._compiled[key](self.params, padded, np.asarray(text, np.float32))[0, :h, :w])
    return np.argmax(logits, -1).astype(np.int32), logits

  def _embed_preset(self, images: Sequence[np.ndarray], preset: features_lib.Preset) -> list[np.ndarray]:
    """`embed` by a windowed recipe: each image's windows run, and are folded
    into its map, on the devices (`features.merge_rule`), `slots` images at a
    time; only the finished map of each reaches the host."""
    mean, std = transforms.normalization_stats(self.normalization)
    inputs = [features_lib.pre_resize(transforms.normalize(im, mean, std), preset) for im in images]
    groups: dict[inference.MultiScale, list[int]] = {}
    for i, x in enumerate(inputs):
      groups.setdefault(features_lib.merge_rule(*x.shape[:2], preset), []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    key = ("finish", preset)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(functools.partial(features_lib.finish, preset=preset))
    for ms, members in groups.items():
      if self.window is not None and ms.crop_size != self.window:
        h, w = images[members[0]].shape[:2]
        raise ValueError(f"this artifact runs {self.window} px windows; preset {preset.name} needs {ms.crop_size} px "
                         f"ones for a {w}x{h} image: export with --window {ms.crop_size}")
      windows = self._feature_windows(preset.feature, ms)
      for start in range(0, len(members), windows.slots):
        group = members[start:start + windows.slots]
        targets = [inference.target_size(*inputs[i].shape[:2], ms) for i in group]
        empty = [None] * (windows.slots - len(group))
        sums, _ = windows.window_sums([inputs[i] for i in group] + empty, (), self.model_config.text.embed_dim,
                                      targets + empty)  # [slots, H, W, D]
        for j, (i, (th, tw)) in enumerate(zip(group, targets)):
          out[i] = np.asarray(self._compiled[key](sums[j, :th, :tw]))
    return out

  def windows_per_step(self, feature: str, crop: int) -> int:
    """Windows per device step: WINDOWS_PER_DEVICE, or as many of their
    WINDOW_FEATURES[feature] maps as fit WINDOW_MAPS_PER_STEP (at least 1)."""
    head1 = jax.ShapeDtypeStruct((1, crop // 2, crop // 2, self.model_config.text.embed_dim), jnp.float32)
    out = jax.eval_shape(features_lib.WINDOW_FEATURES[feature], head1)
    return int(max(1, min(WINDOWS_PER_DEVICE, WINDOW_MAPS_PER_STEP // (out.size * out.dtype.itemsize))))

  def _feature_windows(self, feature: str, ms: inference.MultiScale) -> inference.MultiScaleSegmenter:
    """The multi-scale segmenter of WINDOW_FEATURES[feature] maps merged by `ms`."""
    key = ("windows", feature, ms)
    if key not in self._compiled:
      mean, std = transforms.normalization_stats(self.normalization)
      fn = features_lib.WINDOW_FEATURES[feature]
      forward = lambda params, windows: fn(self.model.apply(params, windows, method=LSeg.pixel_features))
      self._compiled[key] = inference.MultiScaleSegmenter(
          forward, self.params, self.mesh, ms, -mean / std,
          windows_per_device=self.windows_per_step(feature, ms.crop_size))
    return self._compiled[key]

  def _embed_fn(self, full_size: bool):
    """jit of (params, images [B, H, W, 3]) -> embeddings, the batch split over the mesh."""
    key = ("embed", full_size)
    if key not in self._compiled:
      split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh.axis_names))

      def embed(params, x):
        features = self.model.apply(params, x, method=LSeg.embed)  # [B, H/2, W/2, D]
        if full_size:
          features = upsample2x(features)
          features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
        return features

      self._compiled[key] = jax.jit(embed, in_shardings=(sharding.replicated(self.mesh), split), out_shardings=split)
    return self._compiled[key]

  # ---------------------------------------------------------------- segment

  def _multiscale(self, ms: inference.MultiScale) -> inference.MultiScaleSegmenter:
    if ms not in self._compiled:
      mean, std = transforms.normalization_stats(self.normalization)
      self._compiled[ms] = inference.MultiScaleSegmenter(self.forward, self.params, self.mesh, ms, -mean / std,
                                                         windows_per_device=WINDOWS_PER_DEVICE)
    return self._compiled[ms]

  def multiscale(self, geometry: geometry_lib.Geometry, scales: Sequence[float] = (1.0,),
                 flip: bool = False) -> inference.MultiScale:
    return inference.MultiScale(scales=tuple(scales), flip=flip, base_size=geometry.base_size,
                                crop_size=geometry.crop_size)

  def segment(self, images: Sequence[np.ndarray], text: np.ndarray, *, geometry: geometry_lib.Geometry | None = None,
              scales: Sequence[float] = (1.0,), flip: bool = False, return_logits: bool = False
              ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(label ids [h, w] int32, logits [h, w, N] float32 if return_logits else
    None) of each uint8 RGB image [h, w, 3] against text [N, D], by
    `geometry` (default: the run's), summed over `scales` (and flips) as the
    official multi-scale evaluation does. The logits are summed, resized
    back and reduced to labels on the devices: only the label map (and the
    logits, when asked) reach the host."""
    geometry = geometry or self.geometry()
    segmenter = self._multiscale(self.multiscale(geometry, scales, flip))
    n = len(text)
    if n == 0:
      raise ValueError("the label set is empty: LSeg needs at least one label to segment against")
    padded = np.concatenate([text, np.repeat(text[:1], labels_lib.padded_label_count(n) - n, 0)])  # [N', D], finite
    label_mask = np.broadcast_to(np.arange(len(padded)) < n, (segmenter.slots, len(padded)))
    out = []
    for start in range(0, len(images), segmenter.slots):
      group = images[start:start + segmenter.slots]
      out += self._segment_group(segmenter, group, padded, label_mask, geometry, n, return_logits)
    return out

  def _segment_group(self, segmenter: inference.MultiScaleSegmenter, images: Sequence[np.ndarray],
                     text: np.ndarray, label_mask: np.ndarray, geometry: geometry_lib.Geometry, n: int,
                     return_logits: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`segment` of up to `segmenter.slots` images."""
    mean, std = transforms.normalization_stats(self.normalization)
    inputs = [geometry_lib.square_input(im, geometry.base_size) if geometry.square else im for im in images]
    slots = [transforms.normalize(x, mean, std) for x in inputs] + [None] * (segmenter.slots - len(images))
    sums, _ = segmenter.logit_sums(slots, np.broadcast_to(text, (segmenter.slots, *text.shape)), label_mask)
    if geometry.square:
      out_hw = segmenter.out_size([im.shape[:2] for im in images])
      sizes = [im.shape[:2] for im in images] + [(1, 1)] * (segmenter.slots - len(images))
      taps = lambda axis: tuple(np.stack(t) for t in zip(*[inference.resample_taps(geometry.base_size, hw[axis],
                                                                                   out_hw[axis]) for hw in sizes]))
      sums = _resize_back(sums, out_hw, taps(0), taps(1))  # [G, H, W, N']
    ids = np.asarray(segmenter.positions(sums, label_mask)).astype(np.int32)
    logits = np.asarray(sums[..., :n]) if return_logits else None  # the only [H, W, N] copy to the host, when asked
    return [(ids[i, :h, :w], None if logits is None else logits[i, :h, :w])
            for i, (h, w) in enumerate(im.shape[:2] for im in images)]
