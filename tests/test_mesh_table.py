"""Every mesh gives the one-device numbers.

On 8 simulated CPU devices laid out as each mesh of MESHES (batch over
`data` x `fsdp`, kernels over `fsdp` x `tensor` by config_lib.SHARDING_RULES;
a dimension the mesh axes do not divide replicates), against one device, in
float32 at matmul precision "highest":
- the training step as train.py jits it (TRAINING: every mesh; the tiny ViT
  and the tiny ResNet, gradient accumulation 1 and 2, remat full and
  dots_saveable, bf16): the loss of two steps, every parameter's gradient,
  the parameters and BatchNorm statistics after the two steps, within TOL
  of their layer's norm (bf16: BF16_TOL). data2xfsdp2xtensor2 is the mesh
  XLA's partitioner gets wrong without `sharding.param_at_use`
  (tests/test_xla_partitioner_canary.py);
- the evaluation step (confusion matrix equal, loss within TOL) and the
  few-shot step (areas equal) of the Flax model and of its `lseg_jax.export`
  artifact;
- multi-scale inference (`inference.MultiScaleSegmenter`): summed logits
  within TOL per image, label maps equal;
- dense features (`Segmenter.embed`): native and a windowed, multi-scale,
  flipped preset, within TOL per image.

Weight decay is 0, so the momentum buffer after the first step is that
step's gradient. Compiling is what this file spends its time on, so every
compile in it runs with XLA:CPU's backend optimisations off, on one device
and on the meshes alike.
"""

import dataclasses
import functools

import flax
import jax
import numpy as np
import pytest

from helpers import random_variables
from lseg_jax import config_lib, evaluate, export, features, inference, optim, sharding, training
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs
from lseg_jax.segmenter import Segmenter

MESHES = {
    "data8": (("data", 8),),
    "fsdp8": (("fsdp", 8),),
    "tensor8": (("tensor", 8),),
    "data2xfsdp4": (("data", 2), ("fsdp", 4)),
    "data4xtensor2": (("data", 4), ("tensor", 2)),
    "fsdp4xtensor2": (("fsdp", 4), ("tensor", 2)),
    "data2xfsdp2xtensor2": (("data", 2), ("fsdp", 2), ("tensor", 2)),
    "fsdp2xtensor4": (("fsdp", 2), ("tensor", 4)),
}
RULES = config_lib.SHARDING_RULES
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}  # with jax_disable_most_optimizations: 4x faster to compile
BATCH, SIZE, LABELS, TABLE = 16, 32, 3, 5  # images of SIZE px, LABELS per image out of a TABLE of labels
TOL = 2e-5  # float32 summation order: 1.3e-5 measured (a ResNet decoder 3x3 conv on tensor8), 1e-2..1 for the bug
# bf16: the step-1 loss and every kernel's gradient within 0.15 of its layer's
# norm (measured: 8e-2 on data8, where no parameter is split). The biases'
# gradients are bf16 sums over B x H x W whose rounding follows the reduction
# order: head1's differs by 97% between 1 and 8 devices on data8 (README
# "Known issues"), so they are not compared.
BF16_TOL = 0.15


@dataclasses.dataclass(frozen=True)
class Case:
  backbone: str
  accum: int = 1
  model: tuple[tuple[str, str], ...] = ()  # model config overrides

  def __str__(self) -> str:
    return "-".join([self.backbone, f"accum{self.accum}", *(v for _, v in self.model)])


FULL, DOTS, BF16 = (("remat_policy", "full"),), (("remat_policy", "dots_saveable"),), (("dtype", "bfloat16"),)
# (mesh, case): every mesh trains; each (backbone, accumulation) runs on two
# meshes or more, data2xfsdp2xtensor2 runs both backbones and bf16. A
# compiled step costs ~20 CPU-seconds, hence not the full product.
TRAINING = [
    ("data8", Case("tiny_resnet", 2)),
    ("fsdp8", Case("tiny", 2)),
    ("tensor8", Case("tiny_resnet", 1)),
    ("data2xfsdp4", Case("tiny", 1, DOTS)),
    ("data4xtensor2", Case("tiny", 2)),
    ("fsdp4xtensor2", Case("tiny", 1, FULL)),
    ("data2xfsdp2xtensor2", Case("tiny", 1)),
    ("data2xfsdp2xtensor2", Case("tiny_resnet", 2)),
    ("data2xfsdp2xtensor2", Case("tiny", 1, BF16)),
    ("fsdp2xtensor4", Case("tiny_resnet", 1)),
]


@functools.cache
def setup(backbone: str, model: tuple = ()) -> dict:
  """What every run of a model shares: config, module, the logical layout
  (boxed shapes), host weights (text tower dropped), a batch, a text table."""
  config = config_lib.base_config()
  config.model = get_model_config(backbone, **dict(model))
  config.update(lr=1e-2, wd=0.0, total_steps=10)
  module = build_model(config.model)
  boxed = jax.eval_shape(lambda r: module.init(r, *init_inputs(config.model), method=LSeg.segment),
                         jax.random.key(0))
  boxed["params"].pop("text_encoder")
  variables = random_variables(config.model, 0)
  text_params = variables["params"].pop("text_encoder")
  rng = np.random.default_rng(1)
  batch = {"image": rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32),
           "mask": rng.integers(-1, LABELS, (BATCH, SIZE, SIZE)).astype(np.int32),  # -1: ignored
           "label_ids": np.stack([rng.permutation(TABLE)[:LABELS] for _ in range(BATCH)]).astype(np.int32),
           "label_mask": np.ones((BATCH, LABELS), bool)}
  text = rng.normal(size=(TABLE, config.model.text.embed_dim)).astype(np.float32)
  return dict(config=config, model=module, boxed=boxed, variables=variables, text_params=text_params,
              batch=batch, text=text)


def make_mesh(name: str) -> jax.sharding.Mesh:
  return sharding.make_mesh(MESHES[name]) if name != "one" else sharding.make_mesh([("data", 1)])


def placed(s: dict, mesh):
  """(variables as train.py lays them out, the batch, the text table) on `mesh`."""
  variables = jax.device_put(s["variables"], sharding.logical_shardings(s["boxed"], mesh, RULES))
  return (variables, jax.device_put(s["batch"], sharding.batch_sharding(mesh, RULES)),
          jax.device_put(s["text"], sharding.replicated(mesh)))


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(map(str, k)): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def train_two_steps(case: Case, mesh_name: str) -> dict[str, dict[str, np.ndarray]]:
  """Two training steps as train.py runs them on the mesh (one device: no layout)."""
  s = setup(case.backbone, case.model)
  mesh = make_mesh(mesh_name)
  variables, batch, text = placed(s, mesh)
  tx, sched = optim.make_optimizer(s["config"], variables["params"], 10)
  state = training.init_state(variables["params"], variables["batch_stats"], tx, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step = training.make_train_step(s["model"], tx, sched, accum=case.accum,
                                  activations=None if mesh_name == "one" else (mesh, RULES))
  step = jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh, RULES), sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), compiler_options=FAST_COMPILE)
  with jax.default_matmul_precision("highest"):
    state1, m1 = step(state, batch, text)
    state2, m2 = step(state1, batch, text)
  grads = {"/".join(map(str, k)): np.asarray(v) for k, v in training.momentum_buffers(state1["opt"]).items()}
  return {"loss": {"step1": np.asarray(m1["loss"]), "step2": np.asarray(m2["loss"])}, "gradient": grads,
          "params after 2 steps": flat(state2["params"]), "batch_stats after 2 steps": flat(state2["batch_stats"])}


def relative_errors(got: dict, want: dict) -> dict[str, float]:
  """||got - want|| per tensor over the norm of its layer's (the tensors
  sharing its parent: a conv's kernel and bias, a BatchNorm's scale and
  bias), for every group of `want`. Per layer, because a BatchNorm bias's
  gradient is a sum that cancels: its own norm can lie 30x below the
  rounding of its layer (1e-7 absolute), where the layer's cannot."""
  out = {}
  for group, tensors in want.items():
    assert got[group].keys() == tensors.keys(), group
    layer = {name: name.rpartition("/")[0] if np.ndim(w) else name for name, w in tensors.items()}  # a scalar: itself
    norm = {}
    for name, w in tensors.items():
      norm[layer[name]] = np.hypot(norm.get(layer[name], 0.0), np.linalg.norm(w))
    for name, w in tensors.items():
      diff = np.linalg.norm(np.asarray(got[group][name], np.float64) - w)
      out[f"{group} {name}"] = float(diff / max(norm[layer[name]], 1e-30))
  return out


def assert_within(errors: dict[str, float], tol: float, what: str) -> None:
  worst = sorted(errors, key=errors.get, reverse=True)[:3]
  assert errors[worst[0]] <= tol, f"{what}: worst relative errors " + ", ".join(
      f"{k}: {errors[k]:.2e}" for k in worst) + f" (tolerance {tol:g}, {len(errors)} tensors)"


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA:CPU's backend optimisations off for every compile of this module
  (the product's own jits included), on one device and on the meshes alike."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def one_device():
  """case -> its two training steps on one device, run once per module.
  A remat policy is compared with the plain model's: it must not change the numbers."""
  run = functools.cache(lambda case: train_two_steps(case, "one"))
  return lambda case: run(dataclasses.replace(case, model=tuple(kv for kv in case.model if kv[0] != "remat_policy")))


@pytest.mark.parametrize("mesh, case", TRAINING, ids=[f"{m}-{c}" for m, c in TRAINING])
def test_training_steps_equal_one_device(mesh, case, one_device):
  want, got = one_device(case), train_two_steps(case, mesh)
  assert len(want["gradient"]) > 50 and min(np.abs(g).max() for g in want["gradient"].values()) > 0
  errors = relative_errors(got, want)
  if case.model == BF16:  # the loss and every kernel's gradient, see BF16_TOL
    errors = {k: v for k, v in errors.items()
              if k == "loss step1" or (k.startswith("gradient") and not k.endswith("/bias"))}
  assert_within(errors, BF16_TOL if case.model == BF16 else TOL, f"{mesh}, {case}")


# ------------------------------------------------------------------ forward paths

def eval_scores(model, variables, batch, text, mesh_name: str) -> dict[str, np.ndarray]:
  """evaluate.make_eval_step as train.py and eval.py jit it, on the mesh."""
  mesh = make_mesh(mesh_name)
  step = evaluate.make_eval_step(model, TABLE, activations=None if mesh_name == "one" else (mesh, RULES))
  with jax.default_matmul_precision("highest"):
    conf, sums = jax.jit(step, compiler_options=FAST_COMPILE)(variables, batch, text)
  return {"confusion": np.asarray(conf), "loss_sum": np.asarray(sums["loss_sum"]), "valid": np.asarray(sums["valid"])}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> export.ExportedModel:
  """The tiny ViT's `lseg_jax.export` artifact (CPU), written and read back."""
  s = setup("tiny")
  variables = {"params": {**s["variables"]["params"], "text_encoder": s["text_params"]},
               "batch_stats": s["variables"]["batch_stats"]}
  path = tmp_path_factory.mktemp("artifact") / "tiny.jaxexport"
  exported = export.export_model(s["model"], variables, SIZE, platforms=("cpu",))
  export.write_artifact(path, exported, export.artifact_meta(s["config"].model, {"normalization": "clip"}, SIZE, ("cpu",)))
  return export.load(path)


def fewshot_areas(model, variables, text, mesh_name: str) -> dict[str, np.ndarray]:
  """evaluate.make_fewshot_step as eval.py runs it (weights replicated, the
  episodes split by the rules) on BATCH episodes ("others", class c)."""
  mesh = make_mesh(mesh_name)
  rng = np.random.default_rng(3)
  episodes = {"image": setup("tiny")["batch"]["image"], "mask": rng.integers(-1, 2, (BATCH, SIZE, SIZE)).astype(np.int32),
              "label_ids": np.stack([np.zeros(BATCH, np.int32), rng.integers(1, TABLE, BATCH, np.int32)], -1),
              "label_mask": np.ones((BATCH, 2), bool)}
  variables, text = inference.replicate((variables, text), mesh)
  step = jax.jit(evaluate.make_fewshot_step(model, TABLE - 1), compiler_options=FAST_COMPILE)
  with jax.default_matmul_precision("highest"):
    inter, union = step(variables, jax.device_put(episodes, sharding.batch_sharding(mesh, RULES)), text)
  return {"intersection": np.asarray(inter), "union": np.asarray(union)}


def eval_both(mesh_name: str, artifact) -> dict[str, dict]:
  """Eval-step scores and few-shot areas of the Flax model (its weights laid
  out by the rules) and of the artifact (weights inside) on the mesh."""
  s = setup("tiny")
  variables, batch, text = placed(s, make_mesh(mesh_name))
  return {"flax": eval_scores(s["model"], variables, batch, text, mesh_name),
          "artifact": eval_scores(artifact, {}, batch, text, mesh_name),
          "flax fewshot": fewshot_areas(s["model"], s["variables"], s["text"], mesh_name),
          "artifact fewshot": fewshot_areas(artifact, {}, s["text"], mesh_name)}


@pytest.fixture(scope="module")
def one_device_scores(artifact) -> dict[str, dict]:
  return eval_both("one", artifact)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_eval_step_and_artifact_score_as_one_device(mesh, artifact, one_device_scores):
  got = eval_both(mesh, artifact)
  for model in ("flax fewshot", "artifact fewshot"):
    want = one_device_scores[model]
    for key in want:
      np.testing.assert_array_equal(got[model][key], want[key], err_msg=f"{mesh} {model} {key}")
    assert 0 < want["intersection"].sum() < want["union"].sum()
  for model in ("flax", "artifact"):
    want = one_device_scores[model]
    np.testing.assert_array_equal(got[model]["confusion"], want["confusion"], err_msg=f"{mesh} {model}")
    assert got[model]["valid"] == want["valid"]
    error = abs(float(got[model]["loss_sum"]) / float(want["loss_sum"]) - 1)
    assert error <= TOL, f"{mesh} {model}: loss relative error {error:.2e}"
  assert 0 < want["confusion"].trace() < want["confusion"].sum()  # predictions vary: the comparison means something


MULTISCALE = inference.MultiScale(scales=(0.75, 1.25), flip=True, base_size=40, crop_size=SIZE)


def multiscale(mesh_name: str) -> dict[str, np.ndarray]:
  """Summed logits and label maps of 8 images of different sizes, in one
  group: one image per device on the mesh, all 8 on one device."""
  s = setup("tiny")
  mesh = make_mesh(mesh_name)
  segmenter = inference.MultiScaleSegmenter(inference.model_forward(s["model"]), s["variables"], mesh, MULTISCALE,
                                            np.zeros(3, np.float32), windows_per_device=4,
                                            images_per_device=8 // mesh.devices.size)
  rng = np.random.default_rng(2)
  images = [rng.uniform(-1, 1, (*rng.integers(28, 49, 2), 3)).astype(np.float32) for _ in range(8)]
  label_ids, label_mask = s["batch"]["label_ids"][:8], s["batch"]["label_mask"][:8]
  with jax.default_matmul_precision("highest"):
    sums, _ = segmenter.logit_sums(images, s["text"][label_ids], label_mask)
    labels = segmenter.positions(sums, label_mask)
  return {"logits": np.asarray(sums), "labels": np.asarray(labels)}


@pytest.fixture(scope="module")
def one_device_multiscale() -> dict[str, np.ndarray]:
  return multiscale("one")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_multiscale_inference_equals_one_device(mesh, one_device_multiscale):
  got, want = multiscale(mesh), one_device_multiscale
  errors = {f"image {i}": float(np.linalg.norm(g - w) / np.linalg.norm(w))
            for i, (g, w) in enumerate(zip(got["logits"], want["logits"]))}
  assert_within(errors, TOL, f"{mesh} multi-scale logits")
  np.testing.assert_array_equal(got["labels"], want["labels"], err_msg=mesh)
  assert len(np.unique(want["labels"])) > 1


# a windowed preset at the tiny model's size: two scales, flipped, resized back, renormalised
WINDOWED = features.Preset("windowed", feature="dff", base_size=40, crop_size=SIZE, scales=(0.75, 1.25), flip="mean",
                           resize_back=True, renormalize=True)


def embedded(mesh_name: str) -> list[np.ndarray]:
  """`Segmenter.embed` on the mesh: native features of 8 images of different
  sizes (one per device on 8 devices), the windowed preset of two."""
  s = setup("tiny")
  seg = Segmenter(s["model"], s["variables"], s["text_params"], s["config"].model, {}, mesh=make_mesh(mesh_name))
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 255, (*rng.integers(28, 49, 2), 3), np.uint8) for _ in range(8)]
  with jax.default_matmul_precision("highest"):
    return seg.embed(images) + seg.embed(images[:2], preset=WINDOWED)


@pytest.fixture(scope="module")
def one_device_embedded() -> list[np.ndarray]:
  return embedded("one")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_embed_equals_one_device(mesh, one_device_embedded):
  got, want = embedded(mesh), one_device_embedded
  assert [g.shape for g in got] == [w.shape for w in want]
  assert_within({f"map {i}": float(np.linalg.norm(g - w) / np.linalg.norm(w)) for i, (g, w) in enumerate(zip(got, want))},
                TOL, f"{mesh} embed")
