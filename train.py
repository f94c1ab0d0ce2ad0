r"""Trains LSeg: from one CPU to a pod, with the same file.

  python train.py                                   # offline demo: configs/demo.py
  python train.py --config configs/ade20k_lseg_vitl16.py --workdir /ckpt/ade \
      --config.input.data_dir=/data/tfds --config.init.vit=/w/L_16-i21k.npz \
      --config.init.clip_text=/w/clip-vit-base-patch32.safetensors

Stages of `main`, top to bottom: config and processes, mesh, input pipeline,
model and text embeddings, sharded state, update step, checkpoint restore,
train loop (metrics, checkpoints, evaluation).

Multi-process: under a TPU pod slice, SLURM, Open MPI or Kubernetes the
processes join from the environment; elsewhere (e.g. 2 processes x 4 CPU
devices on localhost) pass --coordinator_address=localhost:PORT
--num_processes=2 --process_id=I to each (README "Multi-host").
"""

import contextlib
import datetime
import functools
import json
import os
from pathlib import Path
import signal
import sys
import time

from absl import app
from absl import flags
import flax
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from lseg_jax import checkpoint, cli, config_lib, data, distributed, evaluate, flops as flops_lib, labels as labels_lib
from lseg_jax import optim, preemption, pretrained, profiling, sharding, training, workdir as workdir_lib
from lseg_jax.models import LSeg, build_model, init_inputs

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "demo.py")
# No default here: ml_collections would load it at import, where a misspelt
# --config.KEY is a traceback; parse_flags passes configs/demo.py instead.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:arg].", lock_config=True)
flags.FLAGS["config"].default_as_str = "'configs/demo.py'"  # what --help shows
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run's directory (config.json, checkpoints/, metrics.jsonl, tb/). An existing one is "
    "resumed from its latest checkpoint when it holds the same config. Default: a temp dir named after the "
    "user, the config file and its argument, e.g. /tmp/lseg_jax_alice_demo.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose config.json differs from this config (same model "
    "and optimizer tree), e.g. to change the learning rate of a run on purpose.")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id

# Exit codes (README "Workdirs and resuming").
EXIT_FAULT, EXIT_USAGE = 1, 2  # and preemption.EXIT_SIGNAL: 130 Ctrl-C, 143 SIGTERM, after saving


class RunFault(RuntimeError):
  """The run cannot go on (non-finite loss, a checkpoint that failed to save)."""


class NonFiniteLoss(RunFault):
  pass


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where any mistake (an unknown flag, a config file that
  does not load, a misspelt --config.KEY) is one line and exit 2:
  ml_collections reports an unknown key as a bare traceback, and a config
  file that fails to load only at its first use."""
  if config_lib.config_spec(argv) is None:
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  try:
    config_lib.load_config_file(config_lib.config_spec(argv))
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # absl, ml_collections and config files raise anything
    print(f"error: {config_lib.command_line_error(argv, e)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def main(argv):
  del argv
  cli.quiet_libraries()
  workdir = Path(_WORKDIR.value or workdir_lib.default_workdir(config_lib.config_spec(sys.argv, DEFAULT_CONFIG)))
  try:
    try:  # before any work, and without creating anything
      checkpoint.check_writable(workdir.absolute() / checkpoint.RUN_CONFIG)
    except OSError as e:
      raise config_lib.UserError(f"--workdir {workdir.absolute()}: {e}") from None
    status(distributed.start())
    train_and_evaluate(_CONFIG.value, workdir, _ALLOW_CONFIG_CHANGE.value)
  except config_lib.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except RunFault as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Skip the atexit handlers: on a full disk they retry writes and print tracebacks.
    os._exit(EXIT_FAULT)
  except preemption.Stopped as e:
    sys.exit(preemption.EXIT_SIGNAL[e.signum])


def status(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def train_and_evaluate(config, workdir: str | os.PathLike, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and
  returns the final validation scores. A mistake in the config or the workdir
  is a config_lib.UserError raised before any heavy work or any write; a
  workdir that another live run holds is one (`workdir.RunLock`)."""
  started = time.time()
  workdir = Path(workdir).absolute()
  with config_lib.user_errors():
    config_lib.validate(config)
    lock, note = workdir_lib.lock_run(workdir)
  stop = preemption.StopRequest(on_abort=lock.release)
  previous_handlers = {s: signal.getsignal(s) for s in preemption.EXIT_SIGNAL}
  stop.install()
  try:
    if note:
      status(note)
    return _train_and_evaluate(config, workdir, allow_config_change, stop, started)
  finally:
    lock.release()
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)


def _train_and_evaluate(config, workdir: Path, allow_config_change: bool, stop: preemption.StopRequest,
                        started: float) -> dict:
  """train_and_evaluate's body, run while this run holds the workdir's lock."""
  # ------------------------------------------------------------ config, workdir
  with config_lib.user_errors():
    changes = workdir_lib.check_workdir(workdir, config, allow_config_change)
  status(f"workdir: {workdir}")
  if changes:
    status(f"note: resuming with config changes: {'; '.join(changes)}")

  # ------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  to_global = functools.partial(data.make_global_batch, mesh=mesh, rules=rules)

  # ------------------------------------------------------------ input
  status(f"dataset: {config.input.dataset} (prepared on first use)")
  make_train_loader = functools.partial(data.make_loader, config.input, config.input.split,
                                        global_batch_size=config.input.batch_size, seed=config.seed, train=True)
  with config_lib.user_errors():  # a missing manual_dir, an empty split, ...
    label_names = data.label_names(config.input)
    num_train = data.num_examples(config.input, config.input.split, train=True)  # images per epoch
    steps_per_epoch = max(num_train // config.input.batch_size, 1)
    if config.total_epochs:
      config.unlock()
      config.total_steps = int(config.total_epochs * steps_per_epoch)
      config.lock()
    train_loader = make_train_loader()

  # ------------------------------------------------------------ model and text embeddings
  model = build_model(config.model)
  init_fn = lambda rng: model.init(rng, *init_inputs(config.model), method=LSeg.segment)
  boxed = jax.eval_shape(init_fn, jax.random.key(config.seed))
  var_shardings = sharding.logical_shardings(boxed, mesh, rules)
  variables = jax.jit(lambda r: flax.linen.unbox(init_fn(r)), out_shardings=var_shardings)(
      jax.random.key(config.seed))
  with config_lib.user_errors():  # init files of another model
    variables = pretrained.load_initial_weights(config, variables, var_shardings)
  text_params = variables["params"].pop("text_encoder")  # frozen: not trained, not in the state
  var_shardings["params"].pop("text_encoder")
  text_table = labels_lib.encode_labels(model, text_params, label_names, config.prompt_templates)
  text_table = jax.device_put(text_table, sharding.replicated(mesh))  # [L, D]

  # ------------------------------------------------------------ optimizer and state
  tx, sched = optim.make_optimizer(config, variables["params"], steps_per_epoch)
  state = training.init_state(variables["params"], variables.get("batch_stats", {}), tx, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # ------------------------------------------------------------ update step
  train_step = training.make_train_step(model, tx, sched, accum=config.grad_accum_steps,
                                        reduction=config.loss_reduction, replicas=config.ddp_replicas,
                                        activations=(mesh, rules))
  train_step = jax.jit(train_step, donate_argnums=(0,),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
  eval_step = jax.jit(evaluate.make_eval_step(model, len(label_names)))

  # ------------------------------------------------------------ checkpoint restore
  # A checkpoint holds the state only: the input position is the step (one
  # global batch per step), the same on every process, so a run resumes on
  # any number of processes.
  make_manager = lambda: ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts, enable_async_checkpointing=True),
      item_handlers={"state": ocp.StandardCheckpointHandler()})
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with config_lib.user_errors(), stop.setup_phase():  # checkpoints of another model; a signal: leave now
    manager, restored, resumed = workdir_lib.restore_latest(make_manager, workdir, abstract)
  if resumed is not None:
    state = restored
    with config_lib.user_errors():
      train_loader = make_train_loader(start_batch=resumed)
    status(f"resumed from step {resumed}")
  train_iter = iter(train_loader)
  workdir_lib.write_run_files(workdir, config)  # the restore decision is made: this run owns the workdir
  checkpoint.save_text_encoder(workdir, text_params)  # once, for eval.py and predict
  first_step = int(state["step"])
  saved = {"pending": None}  # the step of the background save not yet known finished

  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  def save(step: int, state) -> None:
    check_saves(wait=True)  # the previous save's fault names that save (orbax would raise it from this one)
    saved["pending"] = step
    with save_faults():
      # A full disk is refused before orbax starts writing: a save failing
      # midway leaves the library's threads printing pages of tracebacks.
      workdir_lib.check_free_space(workdir, state_bytes)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

  @contextlib.contextmanager
  def save_faults():
    """An orbax error while a save is pending -> RunFault naming the failed
    save and the last good (finalised) checkpoint."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
      last = checkpoint.latest_step(workdir)
      raise RunFault(f"saving checkpoint {saved['pending']} failed ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:300]}); the last good checkpoint is "
                     f"{'step ' + str(last) if last is not None else 'none'} in {workdir / 'checkpoints'}") from None

  def check_saves(wait: bool = False) -> None:
    """Raises RunFault once the pending background save has failed (disk
    full, ...): checked every step, so the run stops at the next step."""
    if saved["pending"] is None or (not wait and manager.is_saving_in_progress()):
      return  # (manager.latest_step() names a save from its start, not once it is finalised)
    with save_faults():
      manager.wait_until_finished()  # re-raises the background save's error
    saved["pending"] = None

  # ------------------------------------------------------------ loop
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  profiler = profiling.StepProfiler.from_config(config.profile, workdir / "tb")
  t0 = time.time()
  status(f"setup took {t0 - started:.0f}s (data, model, text embeddings, state, restore)")
  try:
    scores = train_loop(config, state, train_iter, train_step, text_table, to_global, save, check_saves, stop,
                        writer, first_step, lambda st, step: run_eval(config, model, st, text_table, eval_step,
                                                                      to_global, writer, step, label_names, stop),
                        manager, profiler)
  except NonFiniteLoss:
    check_saves(wait=True)  # the checkpoints before the bad step are finalised before the exit
    raise
  except OSError as e:  # a full disk or a lost mount while writing metrics
    last = checkpoint.latest_step(workdir)
    raise RunFault(f"{type(e).__name__}: {e}; the last good checkpoint is "
                   f"{'step ' + str(last) if last is not None else 'none'} in {workdir / 'checkpoints'}") from e
  finally:
    writer.close()
    profiler.stop()
  manager.close()
  status(f"done in {time.time() - t0:.0f}s: val mIoU={scores['mIoU']:.4f} pixAcc={scores['pixAcc']:.4f}; "
         f"checkpoint in {workdir / 'checkpoints'}")
  return scores


class EvalAbandoned(Exception):
  """A stop was agreed during an evaluation: its scores are not logged."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def train_loop(config, state, train_iter, train_step, text_table, to_global, save, check_saves,
               stop: preemption.StopRequest, writer, first_step: int, evaluate_fn, manager,
               profiler: profiling.StepProfiler) -> dict:
  """Steps first_step + 1 .. total_steps: metrics every log_every, checkpoints
  every ckpt_every and at the end, then the final evaluation. A stop that the
  processes agree on (`stop.agreed`, after every step and within every
  evaluation) saves the step reached and raises preemption.Stopped."""
  status(f"compiling the train step ({config.model.backbone}, batch {config.input.batch_size})")
  compiled, step_flops = None, None
  last_t, last_step = time.time(), first_step

  def save_checked(step: int) -> None:
    """Saves step's state once its loss is known finite: no checkpoint
    holds the state after a non-finite step."""
    if pending is not None:
      check_finite(*pending)
    save(step, state)

  def stop_at(step: int, signum: int) -> preemption.Stopped:
    if step != first_step and manager.latest_step() != step:  # at first_step nothing is new
      save_checked(step)
    check_saves(wait=True)
    status(f"received signal {signum}: saved step {step}, exiting (status {preemption.EXIT_SIGNAL[signum]})")
    return preemption.Stopped(signum)

  pending = None  # the previous step's metrics, checked one step late to keep the device busy
  for step in range(first_step + 1, config.total_steps + 1):
    batch = to_global(next(train_iter))
    if compiled is None:  # compile once, ahead of time, to read the step's FLOPs
      t = time.time()
      with stop.setup_phase():  # nothing to save yet: a signal during the compile leaves at once
        compiled = preemption.run_interruptibly(lambda: train_step.lower(state, batch, text_table).compile(), stop)
      step_flops = flops_lib.compiled_flops(compiled)
      status(f"compiled in {time.time() - t:.0f}s; training steps {first_step + 1}..{config.total_steps}")
      status(f"per-device memory (GiB): {sharding.compiled_memory_gib(compiled)}")
      if (signum := stop.agreed()) is not None:  # a multi-process run's signal during the compile
        raise stop_at(step - 1, signum)
    state, measurements = profiler.step(step, compiled, state, batch, text_table)
    check_saves()
    if pending is not None:
      check_finite(*pending)
    pending = (step, measurements)
    if step == first_step + 1 or profiler.in_window(step):  # compiling, tracing: excluded from speed
      last_t, last_step = time.time(), step
    if step % config.log_every == 0 or step == config.total_steps:
      check_finite(*pending)
      log_step(config, step, jax.device_get(measurements), last_t, last_step, step_flops, writer)
      last_t, last_step = time.time(), step
    if config.ckpt_every and step % config.ckpt_every == 0:
      save_checked(step)
    if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
      t = time.time()
      try:
        evaluate_fn(state, step)
      except EvalAbandoned as e:
        raise stop_at(step, e.signum) from None
      last_t += time.time() - t  # evaluation is not training time
    if (signum := stop.agreed(step)) is not None:
      raise stop_at(step, signum)
  if manager.latest_step() != config.total_steps:
    save_checked(config.total_steps)
  check_saves(wait=True)
  try:
    return evaluate_fn(state, config.total_steps)
  except EvalAbandoned as e:
    raise stop_at(config.total_steps, e.signum) from None


def log_step(config, step: int, measurements: dict, last_t: float, last_step: int, step_flops, writer) -> None:
  """One progress line (and the metric files): measurements, speed, ETA."""
  m = {k: float(v) for k, v in measurements.items()}
  now = time.time()
  eta = ""
  if step > last_step:
    step_time = (now - last_t) / (step - last_step)
    m |= {"step_time": step_time, "images_per_s": config.input.batch_size / step_time}
    if step_flops and (peak := flops_lib.peak_flops(jax.devices()[0])):
      m["mfu"] = step_flops / step_time / peak  # XLA's cost analysis is per device
    eta = f" eta={(config.total_steps - step) * step_time:.0f}s"
  writer.write(step, m)
  shown = {k: v for k, v in m.items() if "/" not in k}  # per-module norms: in the metric files only
  status(f"[{step}/{config.total_steps}] " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()) + eta)


def check_finite(step: int, measurements: dict) -> None:
  if not np.isfinite(float(measurements["loss"])):
    raise NonFiniteLoss(f"loss is {float(measurements['loss'])} at step {step}: stopping (lower the learning "
                        "rate, or check the input); the checkpoints before it are kept")


def run_eval(config, model, state, text_table, eval_step, to_global, writer, step, label_names,
             stop: preemption.StopRequest) -> dict:
  """The validation scores at `step`; EvalAbandoned (nothing logged) when the
  processes agree on a stop before one of its batches."""
  ev = config.evals
  loader = data.make_loader(config.input, ev.split, global_batch_size=ev.batch_size, seed=0, train=False,
                            num_epochs=1)

  def batches():
    for batch in loader:
      if (signum := stop.agreed()) is not None:
        raise EvalAbandoned(signum)
      yield batch

  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  scores = evaluate.evaluate(eval_step, variables, text_table, batches(), data.num_examples(config.input, ev.split),
                             ev.batch_size, to_global)
  writer.write(step, {f"{ev.split}/{k}": v for k, v in scores.items() if k != "IoU"})
  if jax.process_index() == 0:
    print(f"[{step}] {ev.split}: mIoU={scores['mIoU']:.4f} pixAcc={scores['pixAcc']:.4f} "
          f"loss={scores['loss']:.4f}", flush=True)
  return scores


class MetricWriter:
  """TensorBoard events (tensorboardX: no TensorFlow needed) and JSON lines,
  host 0 only. Every JSON line names its launch (the UTC time this writer
  started): a resumed run logs the steps since the last checkpoint again,
  and the launch tells which run wrote which line (the later one wins)."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self.launch = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    if enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tb"))
      self.jsonl = open(workdir / "metrics.jsonl", "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, "launch": self.launch, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    """Closes both files; on a full disk the run has already failed: a
    failing flush here must not hide its message."""
    if self.enabled:
      for f in (self.tb, self.jsonl):
        try:
          f.close()
        except OSError:
          pass


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
