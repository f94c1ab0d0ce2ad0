r"""Trains LSeg: from one CPU to a pod, with the same file.

  python train.py                                   # offline demo: configs/demo.py
  python train.py --config configs/ade20k_lseg_vitl16.py --workdir /ckpt/ade \
      --config.input.data_dir=/data/tfds --config.init.vit=/w/L_16-i21k.npz \
      --config.init.clip_text=/w/clip-vit-base-patch32.safetensors

Stages of `main`, top to bottom: config and processes, mesh, input pipeline,
model and text embeddings, sharded state, update step, checkpoint restore,
train loop (metrics, checkpoints, evaluation).

Multi-process (e.g. 2 processes x 4 CPU devices on localhost): pass
--coordinator_address=localhost:PORT --num_processes=2 --process_id=I to each.
"""

import functools
import json
import logging
from pathlib import Path
import signal
import sys
import tempfile
import time

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from lseg_jax import checkpoint, data, evaluate, labels as labels_lib, losses, optim, pretrained, sharding
from lseg_jax.models import LSeg, build_model, init_inputs

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent / "configs" / "demo.py"), "Training config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default: a temp dir).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")

# Peak dense bf16 FLOP/s per chip, for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class NonFiniteLoss(RuntimeError):
  pass


def peak_flops(device: jax.Device) -> float | None:
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in device.device_kind.lower()), None)


def main(argv):
  del argv
  if _COORDINATOR.value:
    # Collectives between CPU processes (tests, CPU clusters); GPUs/TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value or Path(tempfile.gettempdir()) / "lseg_jax_demo"
  train_and_evaluate(_CONFIG.value, workdir)


def train_and_evaluate(config, workdir: str | Path) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and
  returns the final validation scores."""
  host0 = jax.process_index() == 0
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if host0:
    logging.info("workdir: %s", workdir)
    print(f"workdir: {workdir}", flush=True)
  (workdir / checkpoint.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
  (workdir / checkpoint.MODEL_CONFIG).write_text(config.model.to_json(indent=2))

  # ------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  accum = config.get("grad_accum_steps", 1)
  batch_devices = sharding.batch_devices(mesh, rules)
  for key, size, multiple, why in (
      ("input.batch_size", config.input.batch_size, batch_devices * accum, f" x grad_accum_steps={accum}"),
      ("evals.batch_size", config.evals.batch_size, batch_devices, "")):
    if size % multiple:
      raise ValueError(f"{key}={size} must be a multiple of {multiple} (the devices the batch is split over{why})")
  to_global = functools.partial(data.make_global_batch, mesh=mesh, rules=rules)

  # ------------------------------------------------------------ input
  label_names = data.label_names(config.input)
  num_train = data.num_examples(config.input, config.input.split)
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  if config.get("total_epochs"):
    config.unlock()
    config.total_steps = int(config.total_epochs * steps_per_epoch)
    config.lock()
  train_loader = data.make_loader(config.input, config.input.split, global_batch_size=config.input.batch_size,
                                  seed=config.seed, train=True)
  train_iter = iter(train_loader)

  # ------------------------------------------------------------ model
  model = build_model(config.model)
  init_fn = lambda rng: model.init(rng, *init_inputs(config.model), method=LSeg.segment)
  boxed = jax.eval_shape(init_fn, jax.random.key(config.seed))
  var_shardings = sharding.logical_shardings(boxed, mesh, rules)
  variables = jax.jit(lambda r: flax.linen.unbox(init_fn(r)), out_shardings=var_shardings)(
      jax.random.key(config.seed))
  variables = pretrained.load_initial_weights(config, variables, var_shardings)
  text_params = variables["params"].pop("text_encoder")  # frozen: not trained, not in the state
  var_shardings["params"].pop("text_encoder")
  checkpoint.save_text_encoder(workdir, text_params)  # once, for eval.py and predict
  text_table = labels_lib.encode_labels(model, text_params, label_names, config.get("prompt_templates", ("{}",)))
  text_table = jax.device_put(text_table, sharding.replicated(mesh))  # [L, D]

  # ------------------------------------------------------------ optimizer + state
  tx, sched = optim.make_optimizer(config, variables["params"], steps_per_epoch)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "step": jnp.zeros((), jnp.int32)}
  # Optimizer state: jit lays moments out like their parameters but leaves
  # scalar counts on one device; those are replicated over the mesh.
  state["opt"] = jax.tree.map(lambda x: x if x.sharding.device_set == set(mesh.devices.flat)
                              else jax.device_put(x, sharding.replicated(mesh)), jax.jit(tx.init)(state["params"]))
  state["step"] = jax.device_put(state["step"], sharding.replicated(mesh))
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # ------------------------------------------------------------ update step
  train_step = make_train_step(model, tx, sched, accum)
  train_step = jax.jit(train_step, donate_argnums=(0,),
                       in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
  eval_step = jax.jit(evaluate.make_eval_step(model, len(label_names)))

  # ------------------------------------------------------------ checkpoints
  manager = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts, enable_async_checkpointing=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": data.checkpoint_handler()})
  state, train_iter = restore_latest(manager, state, train_iter)
  first_step = int(state["step"])
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=data.checkpoint_save(train_iter)), force=True)

  # ------------------------------------------------------------ loop
  writer = MetricWriter(workdir, enabled=host0)
  compiled, flops = None, None
  t0, last_t, last_step = time.time(), time.time(), first_step
  pending = None  # the previous step's metrics, checked one step late to keep the device busy
  for step in range(first_step + 1, config.total_steps + 1):
    batch = to_global(next(train_iter))
    if compiled is None:  # compile once, ahead of time, to read the step's FLOPs
      compiled = train_step.lower(state, batch, text_table).compile()
      cost = compiled.cost_analysis()
      flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")
    state, measurements = compiled(state, batch, text_table)
    if pending is not None:
      check_finite(*pending)
    pending = (step, measurements)
    if step == first_step + 1:  # the first step compiles: excluded from speed
      last_t, last_step = time.time(), step
    if step % config.log_every == 0 or step == config.total_steps:
      check_finite(*pending)
      now = time.time()
      m = {k: float(v) for k, v in jax.device_get(measurements).items()}
      if step > last_step:
        step_time = (now - last_t) / (step - last_step)
        m |= {"step_time": step_time, "images_per_s": config.input.batch_size / step_time}
        if flops and (peak := peak_flops(jax.devices()[0])):
          m["mfu"] = flops / step_time / peak  # XLA's cost analysis is per device
        eta = (config.total_steps - step) * step_time
      else:
        eta = float("nan")
      last_t, last_step = now, step
      writer.write(step, m)
      if host0:
        print(f"[{step}/{config.total_steps}] " + " ".join(f"{k}={v:.4g}" for k, v in m.items())
              + f" eta={eta:.0f}s", flush=True)
    if config.ckpt_every and step % config.ckpt_every == 0:
      save(step)
    if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
      run_eval(config, model, state, text_table, eval_step, to_global, writer, step, label_names)
    if stop["signal"] is not None:
      save(step)
      manager.wait_until_finished()
      print(f"received signal {stop['signal']}: saved step {step}, exiting", flush=True)
      sys.exit(0)
  if manager.latest_step() != config.total_steps:
    save(config.total_steps)
  manager.wait_until_finished()
  scores = run_eval(config, model, state, text_table, eval_step, to_global, writer, config.total_steps,
                    label_names)
  writer.close()
  manager.close()
  if host0:
    print(f"done in {time.time() - t0:.0f}s: val mIoU={scores['mIoU']:.4f} pixAcc={scores['pixAcc']:.4f}; "
          f"checkpoint in {workdir / 'checkpoints'}", flush=True)
  return scores


def make_train_step(model, tx: optax.GradientTransformation, sched: optax.Schedule, accum: int = 1):
  """(state, batch, text_table) -> (state, measurements): one optimiser step
  over `accum` micro-batches; the frozen label embeddings come in `text_table`."""

  def train_step(state, batch, text_table):
    def loss_fn(params, batch_stats, mb):
      text = text_table[mb["label_ids"]]  # [b, N, D]
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, mb["image"], text,
                                    mb["label_mask"], train=True, mutable=["batch_stats"])
      loss, stats = losses.pixel_cross_entropy(logits, mb["mask"], mb["label_mask"])
      return loss, (updates.get("batch_stats", batch_stats), stats)

    # Gradient accumulation as the official run: micro-batches in sequence,
    # BatchNorm statistics updated by each. A Python loop, not lax.scan: XLA:CPU
    # runs a scanned body ~6x slower, and `accum` is small.
    grads, batch_stats, sums = None, state["batch_stats"], None
    # Row i::accum of the batch, as a reshape that keeps the batch axis sharded.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), batch)
    for mb in (jax.tree.map(lambda x: x[:, i], micro) for i in range(accum)):
      (_, (batch_stats, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch_stats, mb)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
                 "opt": opt, "step": state["step"] + 1}
    valid = jnp.maximum(sums["valid"], 1)
    measurements = {"loss": sums["loss_sum"] / valid, "pixel_acc": sums["correct"] / valid,
                    "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(state["params"]),
                    "lr": sched(state["step"])}
    return new_state, measurements

  return train_step


def check_finite(step: int, measurements: dict) -> None:
  if not np.isfinite(float(measurements["loss"])):
    raise NonFiniteLoss(f"loss is {float(measurements['loss'])} at step {step}: stopping "
                        "(lower the learning rate, or check the input)")


def restore_latest(manager: ocp.CheckpointManager, state, train_iter):
  """The newest readable checkpoint; a corrupt one is skipped with a warning."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=data.checkpoint_restore(train_iter)))
    except Exception as e:  # orbax raises many types for truncated files
      logging.warning("checkpoint %d is unreadable (%s: %s); trying the previous one", step, type(e).__name__, e)
      print(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); deleting it and falling back",
            flush=True)
      manager.delete(step)  # the run will write this step again
      continue
    print(f"resumed from step {step}", flush=True)
    return restored["state"], restored["data"]
  return state, train_iter


def run_eval(config, model, state, text_table, eval_step, to_global, writer, step, label_names) -> dict:
  ev = config.evals
  loader = data.make_loader(config.input, ev.split, global_batch_size=ev.batch_size, seed=0, train=False,
                            num_epochs=1)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  scores = evaluate.evaluate(eval_step, variables, text_table, loader, data.num_examples(config.input, ev.split),
                             ev.batch_size, to_global)
  writer.write(step, {f"{ev.split}/{k}": v for k, v in scores.items() if k != "IoU"})
  if jax.process_index() == 0:
    print(f"[{step}] {ev.split}: mIoU={scores['mIoU']:.4f} pixAcc={scores['pixAcc']:.4f} "
          f"loss={scores['loss']:.4f}", flush=True)
  return scores


class MetricWriter:
  """TensorBoard events (tensorboardX: no TensorFlow needed) and JSON lines, host 0 only."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tb"))
      self.jsonl = open(workdir / "metrics.jsonl", "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


if __name__ == "__main__":
  app.run(main)
