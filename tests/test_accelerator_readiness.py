"""What a lent GPU or TPU will measure, kept working on the CPU: the
topology-aware mesh, gradient accumulation by loop or scan, the logical
activation layout, the selectable attention core, compile-only memory, and
`benchmarks/accelerator.sh --smoke` end to end (tiny model, CPU backend)."""

import json
import subprocess

import flax
import jax
from jax.sharding import AxisType
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, cpu_env
from lseg_jax import config_lib, optim, sharding, training
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs
from lseg_jax.models.transformer import Block

LABELS = 5


def tiny_setup(mesh, backbone: str = "tiny", batch_size: int = 8, size: int = 32, **model_overrides):
  """(model, tx, sched, state, batch, text_table, rules) of a tiny model, laid out on `mesh`."""
  config = config_lib.base_config()
  config.model = get_model_config(backbone, **model_overrides)
  config.total_steps = 10
  config.lr = 1e-2
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model = build_model(config.model)
  init_fn = lambda r: model.init(r, *init_inputs(config.model), method=LSeg.segment)
  shardings = sharding.logical_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh, rules)
  variables = jax.jit(lambda r: flax.linen.unbox(init_fn(r)), out_shardings=shardings)(jax.random.key(0))
  variables["params"].pop("text_encoder")
  tx, sched = optim.make_optimizer(config, variables["params"], 10)
  state = training.init_state(variables["params"], variables["batch_stats"], tx, mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
           "mask": rng.integers(-1, LABELS, (batch_size, size, size)).astype(np.int32),
           "label_ids": np.tile(np.arange(LABELS, dtype=np.int32), (batch_size, 1)),
           "label_mask": np.ones((batch_size, LABELS), bool)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  text = jax.device_put(jnp.asarray(rng.normal(size=(LABELS, config.model.text.embed_dim)), jnp.float32),
                        sharding.replicated(mesh))
  return model, tx, sched, state, batch, text, rules


def run_step(step, state, batch, text):
  """One jitted step; `state` is not donated, so several steps can start from it."""
  return jax.jit(step)(state, batch, text)


def assert_trees_close(a, b, rtol: float, atol: float = 0.0) -> None:
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_mesh_uses_jax_make_mesh_order_with_auto_axes():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)])
  expected = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  assert mesh.shape == {"data": 2, "fsdp": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.devices.flat]
  assert sharding.make_mesh([("data", 3)]).devices.size == 3  # fewer than all devices still works
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.make_mesh([("data", 3), ("fsdp", -1)])


@pytest.mark.parametrize("backbone", ["tiny"])  # its decoder has BatchNorm: the scan threads batch_stats
def test_scan_and_loop_accumulation_give_the_same_update_and_batch_stats(backbone):
  """accum 2 as an unrolled loop and as lax.scan: same params, BatchNorm
  running statistics (threaded through the scan) and measurements."""
  mesh = sharding.make_mesh([("data", 1)])
  model, tx, sched, state, batch, text, _ = tiny_setup(mesh, backbone)
  out = {impl: run_step(training.make_train_step(model, tx, sched, accum=2, accum_impl=impl), state, batch, text)
         for impl in ("loop", "scan")}
  (loop_state, loop_m), (scan_state, scan_m) = out["loop"], out["scan"]
  assert not np.allclose(jax.tree.leaves(loop_state["batch_stats"])[0], jax.tree.leaves(state["batch_stats"])[0])
  assert_trees_close(scan_state["params"], loop_state["params"], rtol=1e-5, atol=1e-7)
  assert_trees_close(scan_state["batch_stats"], loop_state["batch_stats"], rtol=1e-5, atol=1e-7)
  assert_trees_close(scan_m, loop_m, rtol=1e-5, atol=1e-7)


def test_auto_accumulation_is_the_loop_on_cpu_and_a_bad_name_fails():
  assert training.resolve_accum_impl("auto") == ("loop" if jax.default_backend() == "cpu" else "scan")
  with pytest.raises(ValueError, match="accum_impl='while'"):
    training.resolve_accum_impl("while")


def test_activation_layout_constrains_the_traced_step():
  """With the rules the traced step carries sharding constraints, none
  without. That the constrained step computes what one device computes is
  tests/test_train.py's sharded == single-device check (train.py passes the
  rules).

  Known and open (README "Known issues"): on a data x fsdp x tensor mesh
  (jax 0.10.2, XLA:CPU) the gradients differ from one device's by ~1-5%,
  with or without the constraints; data x fsdp and data x tensor agree."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  model, tx, sched, state, batch, text, rules = tiny_setup(mesh)
  plain = training.make_train_step(model, tx, sched)
  pinned = training.make_train_step(model, tx, sched, activations=(mesh, rules))
  count = lambda step: jax.jit(step).lower(state, batch, text).as_text().count("sharding_constraint")
  assert count(plain) == 0 and count(pinned) >= 2 * 4  # block input + output of the tiny ViT's 4 blocks


@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_matches_jax_dot_product_attention(causal):
  x = jax.random.normal(jax.random.key(0), (2, 17, 32))
  blocks = {impl: Block(num_heads=2, mlp_dim=64, causal=causal, attention=impl) for impl in ("plain", "xla")}
  params = blocks["plain"].init(jax.random.key(1), x)
  y = {impl: block.apply(params, x) for impl, block in blocks.items()}
  np.testing.assert_allclose(y["plain"], y["xla"], rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_params_logits_and_loss():
  mesh = sharding.make_mesh([("data", 1)])
  model, tx, sched, state, batch, text, _ = tiny_setup(mesh, dtype="bfloat16")
  new_state, m = run_step(training.make_train_step(model, tx, sched), state, batch, text)
  assert {x.dtype for x in jax.tree.leaves(new_state["params"])} == {jnp.dtype(jnp.float32)}
  assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
  logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch["image"],
                       text[batch["label_ids"]], batch["label_mask"], train=False)
  assert logits.dtype == jnp.float32


def test_unknown_attention_is_refused():
  with pytest.raises(ValueError, match="model.attention='flash' is not one of"):
    build_model(get_model_config("tiny", attention="flash"))


def test_compiled_memory_reads_the_buffer_sizes():
  """Two 36 MB float32 inputs, the first donated to the first 36 MB output:
  fields large enough that GiB rounded to 3 places tells them apart (and off
  a rounding tie), and an alias that `total` must subtract."""
  n = 3000
  size = n * n * 4  # bytes of one [n, n] float32 array
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)
  compiled = jax.jit(lambda a, b: (a @ b + 1.0, (a @ b.T).sum()), donate_argnums=0).lower(x, x).compile()
  mem = sharding.compiled_memory_gib(compiled)
  gib = lambda nbytes: round(nbytes / 2**30, 3)
  assert (mem["argument"], mem["output"], mem["alias"]) == (gib(2 * size), gib(size), gib(size)), mem
  assert mem["total"] == pytest.approx(mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                                       + mem["generated_code"], abs=2e-3)


@pytest.mark.slow  # 45 s of the default suite's budget; the script is run for real on every lent GPU
def test_accelerator_script_smoke_prints_sane_json_lines():
  """benchmarks/accelerator.sh --smoke: the tiny model on the CPU backend."""
  env = cpu_env(1, compile_cache=False)
  out = subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator.sh"), "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  by_name = {}
  for line in lines:
    by_name.setdefault(line["benchmark"], []).append(line)
  assert set(by_name) == {"train_step_memory", "train_step", "train_step_best", "input_pipeline",
                          "eval_multiscale"}, by_name
  memory = by_name["train_step_memory"][0]["memory_gib"]
  assert memory["total"] > 0 and memory["argument"] > 0
  best = by_name["train_step_best"][0]
  assert best["images_per_s_per_device"] > 0 and 0 < best["mfu"] < 1
  assert best["mfu"] == max(s.get("mfu", 0) for s in by_name["train_step"])
  assert best["loss_dtype"] == "float32"
  assert all(v > 0 for v in by_name["input_pipeline"][0]["results"].values())
  rates = {k: v for k, v in by_name["eval_multiscale"][0].items() if k.endswith("_images_per_s")}
  assert rates and all(v > 0 for v in rates.values()), rates
