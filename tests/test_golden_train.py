"""Training-step parity: our production step against a few official SGD steps.

For every `train_*.json` + `.npz` in $LSEG_GOLDEN_DIR/train (default
`../shared/golden/train`): regenerate and convert the fixture's weights, build
the optimiser from a training config exactly as train.py does
(`optim.make_optimizer`: base_lr / 16 * batch, the 10x `fusion`/`head` group,
coupled weight decay, poly per epoch), run `training.steps` steps of the very
`training.make_train_step` that train.py jits on the fixture's batch, and
compare every quantity of the README's table within its tolerance: losses,
pixel accuracy, lrs, gradient norms (per group, module and tensor), sampled
step-1 gradients, momentum buffers and parameter updates, every BatchNorm
running statistic, and logits before, during and after. The fixture's config
and hyper-parameters are read from its JSON.
"""

import json
from pathlib import Path

import flax
import jax
import numpy as np
import optax
import pytest

from golden_utils import GOLDEN_DIR, check_fixtures_present, fixtures, regenerate_state_dict
from lseg_jax import config_lib, convert, optim, sharding, tokenizer, training
from lseg_jax.convert import rules as rules_lib
from lseg_jax.models import build_model

TRAIN_DIR = GOLDEN_DIR / "train"
FIXTURES = fixtures(TRAIN_DIR, "train_*.json")
GROUPS = {"backbone": "pretrained", "reassemble": "pretrained", "fusion": "scratch", "head": "scratch"}
STEPS_PER_EPOCH = 1000  # > the fixture's steps: the per-epoch poly factor stays 1, as in the fixture


def train_config(fx: dict, model_config) -> "config_lib.ml_collections.ConfigDict":
  """The training config of a fixture: the official recipe's fields."""
  tr = fx["training"]
  config = config_lib.base_config()
  config.model = model_config
  config.input.batch_size = tr["batch_size"]
  config.base_lr = tr["cli_base_lr"]
  config.momentum = tr["momentum"]
  config.wd = tr["weight_decay"]
  config.lr_mults = {"fusion": 10.0, "head": 10.0}
  config.schedule = dict(kind="poly", power=0.9, per_epoch=True, warmup_steps=0,
                         horizon_epochs=float(tr["max_epochs"]))
  config.total_epochs = float(tr["max_epochs"])
  config.total_steps = tr["max_epochs"] * STEPS_PER_EPOCH
  config.mesh = (("data", 1),)
  return config


def nchw_stride4(logits: jax.Array) -> np.ndarray:
  return np.asarray(logits).transpose(0, 3, 1, 2)[:, :, ::4, ::4]


def flat_params(tree: dict) -> dict[str, np.ndarray]:
  return {"params/" + "/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def by_official_name(tree: dict, rules) -> dict[str, np.ndarray]:
  """{official key: array in the official layout} of a params-shaped tree."""
  out = {}
  for path, value in flat_params(tree).items():
    found = rules_lib.official_name(rules, path)
    assert found is not None, f"no official name for {path}"
    out[found[0]] = found[1].to_official(value)
  return out


def group_norms(tree: dict, group_of) -> dict[str, float]:
  sums = {}
  for module, sub in tree.items():
    g = group_of(module)
    sums[g] = sums.get(g, 0.0) + float(optax.tree.norm(sub)) ** 2
  return {g: s ** 0.5 for g, s in sums.items()}


def run_official_steps(fixture_path: Path) -> tuple[dict, dict]:
  """(ours, ref): our version of every quantity of the fixture, and the fixture's."""
  fx = json.loads(fixture_path.read_text())
  with np.load(fixture_path.with_suffix(".npz")) as z:
    ref = dict(z)
  tr = fx["training"]
  model_config = convert.model_config_from_official(**fx["config"])
  variables = convert.convert_lseg(regenerate_state_dict(fx), model_config)
  model = build_model(model_config)
  np.testing.assert_array_equal(tokenizer.tokenize(fx["labels"]), ref["token_ids"])
  mesh = sharding.make_mesh((("data", 1),))
  with jax.default_matmul_precision("highest"):
    text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, ref["token_ids"])
    params = jax.device_put({k: v for k, v in variables["params"].items() if k != "text_encoder"},
                            sharding.replicated(mesh))
    batch_stats = jax.device_put(variables["batch_stats"], sharding.replicated(mesh))
    image = (ref["image_u8"].astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    b, n = image.shape[0], text.shape[0]
    batch = {"image": image, "mask": ref["target"].astype(np.int32),
             "label_ids": np.tile(np.arange(n, dtype=np.int32), (b, 1)), "label_mask": np.ones((b, n), bool)}

    config = train_config(fx, model_config)
    config_lib.validate(config)
    tx, sched = optim.make_optimizer(config, params, STEPS_PER_EPOCH)
    state = training.init_state(params, batch_stats, tx, mesh)
    params0 = jax.tree.map(np.asarray, params)
    train_step = jax.jit(training.make_train_step(model, tx, sched))  # train.py's step
    grad_fn = jax.jit(training.make_grad_fn(model))  # the same loss, for the raw per-tensor gradients
    forward = jax.jit(lambda v, x, t, train: model.apply(v, x, t, train=train, mutable=["batch_stats"])[0],
                      static_argnums=3)

    ours = {"logits_eval_step0_stride4": nchw_stride4(forward({"params": params, "batch_stats": batch_stats},
                                                             image, text, False)),
            "steps": [], "grads": []}
    for step in range(1, tr["steps"] + 1):
      v = {"params": state["params"], "batch_stats": state["batch_stats"]}
      if step == 1:
        ours["logits_train_step1_stride4"] = nchw_stride4(forward(v, image, text, True))
      grads, _, _ = grad_fn(state["params"], state["batch_stats"], batch, text)
      grads = jax.tree.map(np.asarray, grads)
      state, m = train_step(state, batch, text)
      m = jax.device_get(m)
      ours["grads"].append(grads)
      ours["steps"].append({
          "loss": float(m["loss"]), "pixel_acc": float(m["pixel_acc"]),
          "lr": {g: float(sched(step - 1)) * config.lr_mults.get(module, 1.0)
                 for module, g in GROUPS.items()},
          "grad_norm": {**group_norms(grads, GROUPS.get), "total": float(m["grad_norm"])},
          "grad_norm_lseg_jax_modules": {k: float(m[f"grad_norm/{k}"]) for k in GROUPS},
          "grad_norm_per_tensor": {k: float(np.linalg.norm(g)) for k, g in
                                   by_official_name(grads, rules_lib.lseg_rules(model_config)).items()},
      })
    ours["logits_eval_after_stride4"] = nchw_stride4(forward(
        {"params": state["params"], "batch_stats": state["batch_stats"]}, image, text, False))
  ours.update(params0=params0, params=jax.tree.map(np.asarray, state["params"]),
              batch_stats=jax.tree.map(np.asarray, state["batch_stats"]),
              momentum=flax.traverse_util.unflatten_dict(training.momentum_buffers(state["opt"])),
              config=config, fx=fx)
  return ours, ref


def rel(ours, ref) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def errors(ours: dict, ref: dict) -> dict[str, tuple[float, float]]:
  """{name: (error, tolerance)} for every quantity of the README's table."""
  fx = ours["fx"]
  tol = fx["tolerances"]
  rules = rules_lib.lseg_rules(ours["config"].model)
  out = {}
  for name in ("logits_eval_step0_stride4", "logits_train_step1_stride4", "logits_eval_after_stride4"):
    out[name] = (rel(ours[name], ref[name]), tol[name])
  for k, (mine, theirs) in enumerate(zip(ours["steps"], fx["results"]["steps"]), start=1):
    out[f"step{k}/loss"] = (abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"]), tol["loss"])
    out[f"step{k}/pixel_acc"] = (abs(mine["pixel_acc"] - theirs["pixel_acc"]), tol["pixel_acc_abs"])
    for g in ("pretrained", "scratch"):
      out[f"step{k}/lr/{g}"] = (abs(mine["lr"][g] - theirs["lr"][g]) / theirs["lr"][g], 1e-6)
    for quantity in ("grad_norm", "grad_norm_lseg_jax_modules", "grad_norm_per_tensor"):
      for key, value in theirs[quantity].items():
        assert key in mine[quantity], f"step {k}: no {quantity} for {key}"
        out[f"step{k}/{quantity}/{key}"] = (abs(mine[quantity][key] - value) / abs(value), tol[quantity])
  momentum = group_norms(ours["momentum"], GROUPS.get)
  for g, value in fx["results"]["momentum_norm_after"].items():
    out[f"momentum_norm_after/{g}"] = (abs(momentum[g] - value) / value, tol["momentum_norm_after"])

  official = lambda tree: by_official_name(tree, rules)
  grad1, mom = official(ours["grads"][0]), official(ours["momentum"])
  after, before = official(ours["params"]), official(ours["params0"])
  steps = fx["training"]["steps"]
  for key, meta in fx["tracked_parameters"].items():
    sample = lambda x: np.asarray(x).reshape(-1)[::meta["sample_stride"]]
    out[f"grad1/{key}"] = (rel(sample(grad1[key]), ref[f"grad1/{key}"]), tol["grad1"])
    out[f"momentum/{key}"] = (rel(sample(mom[key]), ref[f"momentum/{key}"]), tol["momentum"])
    delta, ref_delta = sample(after[key] - before[key]), ref[f"delta/{key}"].astype(np.float64)
    ulps = steps * np.spacing(np.abs(sample(after[key])).astype(np.float32)).astype(np.float64)
    beyond = np.maximum(0.0, np.abs(delta - ref_delta) - ulps)
    out[f"delta/{key}"] = (float(beyond.max() / np.abs(ref_delta).max()), tol["delta"])
  stats = {"batch_stats/" + "/".join(k): v for k, v in flax.traverse_util.flatten_dict(ours["batch_stats"]).items()}
  bn_rules = list(rules_lib.decoder_rules())
  for path, value in stats.items():
    name, _ = rules_lib.official_name(bn_rules, path) or (None, None)
    if name and f"bn/{name}" in ref:
      out[f"bn/{name}"] = (rel(value, ref[f"bn/{name}"]), tol["bn"])
  missing = [k for k in ref if k.startswith("bn/") and k not in out]
  assert not missing, f"no BatchNorm statistics for {missing}"
  return out


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.stem for p in FIXTURES])
def trained(request):
  return run_official_steps(request.param)


def test_golden_train_fixtures_are_present():
  """Fails (not skips) when LSEG_GOLDEN_DIR is set and its train/ holds no fixture."""
  check_fixtures_present(FIXTURES, TRAIN_DIR, "train_*.json")


@pytest.mark.skipif(not FIXTURES, reason=f"no golden training fixtures in {TRAIN_DIR} (set LSEG_GOLDEN_DIR)")
def test_training_steps_match_the_official_ones(trained, capsys):
  ours, ref = trained
  errs = errors(ours, ref)
  worst = {}
  for name, (err, tol) in errs.items():
    quantity = name.split("/")[1] if name.startswith("step") else name.split("/")[0]
    if quantity not in worst or err / tol > worst[quantity][0] / worst[quantity][1]:
      worst[quantity] = (err, tol, name)
  with capsys.disabled():
    print(f"\n{ours['fx']['config']['backbone']}: worst error per quantity (tolerance)")
    for quantity, (err, tol, name) in worst.items():
      print(f"  {quantity:28s} {err:.2e} ({tol:.0e})  {name}")
  bad = {name: f"{err:.3g} > {tol:.0e}" for name, (err, tol) in errs.items() if not err <= tol}
  assert not bad, f"out of tolerance (name: error > tolerance): {bad}"


def replay(ours: dict, **overrides) -> dict:
  """The optimiser of `ours` with config `overrides`, fed the recorded raw
  gradients of every step: its momentum buffers and parameters after them."""
  config = ours["config"].copy_and_resolve_references()
  for key, value in overrides.items():
    config[key] = value
  tx, _ = optim.make_optimizer(config, ours["params0"], STEPS_PER_EPOCH)
  params, opt = ours["params0"], tx.init(ours["params0"])
  for grads in ours["grads"]:
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  momentum = flax.traverse_util.unflatten_dict(training.momentum_buffers(opt))
  return {**ours, "params": jax.tree.map(np.asarray, params), "momentum": jax.tree.map(np.asarray, momentum)}


@pytest.mark.skipif(not FIXTURES, reason=f"no golden training fixtures in {TRAIN_DIR} (set LSEG_GOLDEN_DIR)")
def test_the_comparison_catches_a_broken_recipe(trained):
  """The same comparison fails on a wrong lr group, a missing weight decay and
  eval-mode BatchNorm during training."""
  ours, ref = trained
  tol = ours["fx"]["tolerances"]
  same = errors(replay(ours), ref)  # the replay itself reproduces the production run
  assert max(same[k][0] / same[k][1] for k in same if k.startswith(("delta/", "momentum/"))) <= 1.0
  no_10x = errors(replay(ours, lr_mults={}), ref)
  assert no_10x["delta/scratch.head1.weight"][0] > 5 * tol["delta"]  # 0.9: the update is 10x too small
  no_wd = errors(replay(ours, wd=0.0), ref)
  assert no_wd["momentum/pretrained.model.blocks.11.mlp.fc2.weight"][0] > 2 * tol["momentum"]
  assert rel(ours["logits_eval_step0_stride4"], ref["logits_train_step1_stride4"]) > 100 * tol[
      "logits_train_step1_stride4"]
