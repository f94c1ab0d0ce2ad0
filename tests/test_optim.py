"""The official training recipe as behaviour: lr groups, weight decay, the
per-epoch poly schedule, the lr formula, gradient accumulation and the loss
reductions (lseg_jax.optim, lseg_jax.training, lseg_jax.losses)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import config_lib, losses, optim, sharding, training
from lseg_jax.convert import rules as rules_lib
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def recipe(model_config, **overrides):
  """The ADE20K recipe's optimiser fields around `model_config`."""
  config = config_lib.base_config()
  config.model = model_config
  config.input.batch_size = 8
  config.base_lr = 0.004
  config.total_steps = 100
  config.mesh = (("data", 1),)
  for key, value in overrides.items():
    config[key] = value
  return config


def init(model_config, seed: int = 0):
  model = build_model(model_config)
  variables = model.init(jax.random.key(seed), *init_inputs(model_config, size=64), method=LSeg.segment)
  variables = flax.linen.unbox(variables)
  text = variables["params"].pop("text_encoder")
  return model, variables, text


def official_names(params: dict, model_config) -> dict[str, str]:
  """{flax path: official key} through the converter's own rules."""
  rules = rules_lib.lseg_rules(model_config)
  out = {}
  for k in flax.traverse_util.flatten_dict(params):
    path = "params/" + "/".join(k)
    out["/".join(k)] = rules_lib.official_name(rules, path)[0]
  return out


@pytest.mark.parametrize("backbone", ["tiny", "tiny_resnet"])
def test_pretrained_trains_at_1x_and_scratch_at_10x_with_decay_on_every_tensor(backbone):
  """One SGD step without momentum from zero gradients is -lr * wd * p, and
  with unit gradients -lr * (1 + wd * p): every official `pretrained.*` tensor
  at lr, every `scratch.*` at 10 lr, decay on all (biases and norms too)."""
  model_config = get_model_config(backbone)
  _, variables, _ = init(model_config)
  params = variables["params"]
  config = recipe(model_config, momentum=0.0, wd=0.1)
  tx, sched = optim.make_optimizer(config, params, steps_per_epoch=10)
  lr = float(sched(0))
  names = official_names(params, model_config)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  for grad_value in (0.0, 1.0):
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in flax.traverse_util.flatten_dict(updates, sep="/").items():
      official = names[path]
      mult = 10.0 if official.startswith("scratch.") else 1.0
      assert official.startswith(("pretrained.", "scratch.")), official
      np.testing.assert_allclose(u, -mult * lr * (grad_value + 0.1 * flat[path]), rtol=1e-5, atol=1e-12,
                                 err_msg=f"{path} ({official})")


def test_poly_per_epoch_is_the_official_lambda_lr():
  """LambdaLR(lambda e: (1 - e / max_epochs) ** 0.9), stepped once per epoch,
  with the horizon at max_epochs even when the run stops earlier."""
  spe, max_epochs = 7, 10
  config = recipe(get_model_config("tiny"), total_steps=4 * spe,
                  schedule=dict(kind="poly", power=0.9, per_epoch=True, warmup_steps=0, horizon_epochs=float(max_epochs)))
  sched = optim.schedule(config, spe)
  base = optim.base_learning_rate(config)
  for step in range(4 * spe):
    expected = base * (1 - (step // spe) / max_epochs) ** 0.9
    np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6, err_msg=str(step))
  config.schedule.horizon_epochs = 0.0  # the run's own length
  np.testing.assert_allclose(float(optim.schedule(config, spe)(2 * spe)), base * 0.5 ** 0.9, rtol=1e-6)


@pytest.mark.parametrize("batch,accum,replicas,lr", [
    (16, 1, 1, 0.004), (32, 1, 1, 0.008), (2, 1, 1, 0.0005), (64, 2, 8, 0.001)])
def test_the_lr_is_base_lr_over_16_times_the_per_replica_batch(batch, accum, replicas, lr):
  config = recipe(get_model_config("tiny"), grad_accum_steps=accum, ddp_replicas=replicas)
  config.input.batch_size = batch
  assert optim.base_learning_rate(config) == pytest.approx(lr)


def tiny_batch(n: int, size: int = 64, labels: int = 4, seed: int = 0, ignore_rows: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, labels, (n, size, size)).astype(np.int32)
  mask[:, :ignore_rows] = losses.IGNORE
  mask[0, :, : size // 2] = losses.IGNORE  # unequal valid counts across images
  return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32), "mask": mask,
          "label_ids": np.tile(np.arange(labels, dtype=np.int32), (n, 1)), "label_mask": np.ones((n, labels), bool)}


def one_step(model, variables, text, config, batch):
  mesh = sharding.make_mesh(config.mesh)
  tx, sched = optim.make_optimizer(config, variables["params"], 10)
  state = training.init_state(variables["params"], variables.get("batch_stats", {}), tx, mesh)
  step = training.make_train_step(model, tx, sched, accum=config.grad_accum_steps,
                                  reduction=config.loss_reduction, replicas=config.ddp_replicas)
  with jax.default_matmul_precision("highest"):
    return jax.jit(step)(state, batch, text)


def test_accumulation_is_one_batch_k_times_larger_and_the_text_tower_never_trains():
  """Without BatchNorm, k micro-batches give the update of one batch k times
  larger (the loss is the mean over all valid pixels of the step)."""
  model_config = get_model_config("tiny", use_bn=False)
  model, variables, text_params = init(model_config)
  text = jax.random.normal(jax.random.key(1), (4, model_config.text.embed_dim))
  batch = tiny_batch(4)
  # The same lr for both (base_lr would scale it with the micro-batch, as officially).
  config = recipe(model_config, momentum=0.9, wd=1e-4, base_lr=None, lr=0.01)
  one, m1 = one_step(model, variables, text, config, batch)
  config.grad_accum_steps = 2
  two, m2 = one_step(model, variables, text, config, batch)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 rounding of the two sums
  assert set(one["params"]) == {"backbone", "reassemble", "fusion", "head"}  # no text tower to train
  assert set(text_params) == {"token_embedding", "positional_embedding", "text_projection", "ln_final",
                              "resblocks_0", "resblocks_1"}
  assert not any("logit_scale" in "/".join(k) for k in flax.traverse_util.flatten_dict(one["params"]))


def test_batch_norm_statistics_move_once_per_micro_batch():
  """With accumulation, each micro-batch (rows i::k) normalises with its own
  statistics and updates the running ones in turn, as the official run."""
  model_config = get_model_config("tiny")
  model, variables, _ = init(model_config)
  text = jax.random.normal(jax.random.key(1), (4, model_config.text.embed_dim))
  batch = tiny_batch(4)
  config = recipe(model_config, grad_accum_steps=2)
  state, _ = one_step(model, variables, text, config, batch)
  stats = variables["batch_stats"]
  for i in range(2):
    mb = jax.tree.map(lambda x: x[i::2], batch)
    _, updates = model.apply({"params": variables["params"], "batch_stats": stats}, mb["image"],
                             text[mb["label_ids"]], mb["label_mask"], train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
  for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_replica_reduction_is_the_mean_of_per_replica_means():
  nll = jnp.asarray(np.arange(8 * 2 * 2, dtype=np.float32).reshape(8, 2, 2))
  valid = jnp.ones((8, 2, 2), bool).at[:4, 0].set(False)  # replica 0 has half the valid pixels
  got = float(losses.replica_mean(nll * valid, valid, replicas=2))
  per = [float((nll * valid)[:4].sum() / valid[:4].sum()), float(nll[4:].sum() / valid[4:].sum())]
  assert got == pytest.approx(sum(per) / 2)
  assert got != pytest.approx(float((nll * valid).sum() / valid.sum()))  # not the global pixel mean


def test_replica_reduction_equals_pixels_when_replicas_see_equal_valid_pixels():
  model_config = get_model_config("tiny", use_bn=False)
  model, variables, _ = init(model_config)
  text = jax.random.normal(jax.random.key(1), (4, model_config.text.embed_dim))
  batch = tiny_batch(4)
  batch["mask"] = np.abs(batch["mask"])  # every pixel valid
  config = recipe(model_config, grad_accum_steps=2, base_lr=None, lr=0.01)  # ddp_replicas would scale base_lr
  pixels, _ = one_step(model, variables, text, config, batch)
  config.loss_reduction, config.ddp_replicas = "replicas", 2
  replicas, _ = one_step(model, variables, text, config, batch)
  for a, b in zip(jax.tree.leaves(pixels["params"]), jax.tree.leaves(replicas["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
