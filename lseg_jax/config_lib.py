"""Pieces every training config in configs/ shares (as big_vision.configs.common),
and `validate`: every check of a config, before any heavy work."""

from collections.abc import Iterator
import contextlib
import difflib
import importlib.util
import os
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from lseg_jax import data, losses


class UserError(ValueError):
  """A mistake in the config, the command line, the workdir or the data paths:
  the scripts print its one-line message and exit with status 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Turns the errors that setup code raises for bad input (ValueError,
  missing files, permissions) into UserErrors with the first line of their
  message. Wrap setup only: a bug in the training loop keeps its traceback."""
  try:
    yield
  except UserError:
    raise
  except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
          PermissionError) as e:
    raise UserError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


def optional_str():
  """A str field that may stay None and can still be set with --config.x=...
  (a new placeholder each call: a shared one would link the fields)."""
  return config_dict.placeholder(str)


# Logical parameter axes -> mesh axes (see lseg_jax/sharding.py). FSDP shards
# parameters and optimiser state over `fsdp`; `tensor` splits the MLP / qkv /
# conv output dims when the mesh has that axis > 1.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("vocab", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("conv_out", "tensor"),
    ("embed_out", "tensor"),
)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A config's `:key=value,key=value` argument over its `defaults`, each value
  cast to its default's type (big_vision's `parse_arg`). An unknown key or a
  malformed item is a ValueError naming it."""
  args = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in args:
      raise ValueError(f"bad config argument {item!r}: expected key=value with a key in {list(args)}")
    args[key] = type(args[key])(value)
  return args


def base_config() -> ml_collections.ConfigDict:
  """Defaults every config overrides where it needs to."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.input = data.default_input_config()  # every key of the input pipeline, with its default
  config.init = dict(model_dir=optional_str(), vit=optional_str(), resnet=optional_str(), clip_text=optional_str())
  config.prompt_templates = ("{}",)  # LSeg feeds raw label names

  config.optax_name = "sgd"
  # The learning rate: `lr` as is, or the official recipe's `base_lr / 16 *
  # per-replica batch` (lang-seg `lsegmentation_module.py`), where the
  # per-replica batch is input.batch_size / grad_accum_steps / ddp_replicas.
  # Set exactly one of the two.
  config.lr = config_dict.placeholder(float)
  config.base_lr = config_dict.placeholder(float)
  config.ddp_replicas = 1  # the data-parallel replicas (GPUs) the recipe was written for
  config.momentum = 0.9
  config.wd = 1e-4
  config.lr_mults = {"fusion": 10.0, "head": 10.0}  # the official `scratch` group at 10x
  # poly: (1 - t / horizon) ** power, t in epochs when per_epoch (the official
  # LambdaLR steps once per epoch); horizon = horizon_epochs, or the run's own
  # length when 0.
  config.schedule = dict(kind="poly", power=0.9, per_epoch=True, warmup_steps=0, horizon_epochs=0.0)
  config.grad_clip_norm = 0.0
  config.grad_accum_steps = 1
  # "pixels": the mean over every valid pixel of the optimiser step (any device
  # count, any accumulation). "replicas": the official DDP reduction: each of
  # `ddp_replicas` equal slices of every micro-batch averages over its own
  # valid pixels, and the step's loss is the mean of those means.
  config.loss_reduction = "pixels"
  config.total_steps = 0  # set, or derived from total_epochs
  config.total_epochs = 0.0

  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.sharding_rules = SHARDING_RULES

  config.log_every = 50
  config.ckpt_every = 1000
  config.keep_ckpts = 3
  config.eval_every = 0
  config.evals = dict(split="validation", batch_size=8, protocol="single")
  # A jax.profiler trace of training steps start_step .. start_step +
  # num_steps - 1 into WORKDIR/tb (TensorBoard's profile tab); off while
  # num_steps is 0. Process 0 only, unless all_processes.
  config.profile = dict(start_step=5, num_steps=0, all_processes=False)
  config.paper_miou = config_dict.placeholder(float)  # the published number this config should reach
  return config


# Fields a resumed run may change without --allow_config_change: how long it
# runs, how often it logs and saves, where its data lives, its mesh and its
# input threads, what it profiles. Anything else changes what is trained.
RESUMABLE_CHANGES = ("total_steps", "total_epochs", "log_every", "ckpt_every", "keep_ckpts", "eval_every",
                     "evals.batch_size", "profile", "mesh", "sharding_rules", "input.data_dir", "input.manual_dir",
                     "input.prepare", "input.worker_count", "input.num_threads", "input.prefetch_batches")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
MODULES = ("backbone", "reassemble", "fusion", "head")  # the trained top-level modules (lr_mults keys)


def flatten(config, prefix: str = "") -> Iterator[tuple[str, object]]:
  """(dotted key, value) of every leaf field of a ConfigDict or dict."""
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def nearest_keys(key: str, known: list[str]) -> list[str]:
  """Valid dotted keys a misspelt or misplaced `key` may mean: the close
  spellings, and the keys that end in its last part at any depth
  (`batch_size` -> `input.batch_size`, `evals.batch_size`)."""
  last = key.rsplit(".", 1)[-1]
  same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == last]
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  close_leaf = [k for k in known if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.8)]
  prefix = [k for k in known if len(leaf := k.rsplit(".", 1)[-1]) >= 2 and last.startswith(leaf)]  # lr_typo -> lr
  return list(dict.fromkeys(same_leaf + close + close_leaf + prefix))[:5]


def unknown_key_error(key: str, known: list[str]) -> str:
  hint = nearest_keys(key, known)
  return f"unknown config key {key!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its get_config(arg), as --config loads it."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"lseg_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def config_spec(argv: list[str], default: str | None = None) -> str | None:
  """The --config value of a command line (`default` when absent)."""
  for i, item in enumerate(argv):
    if item.startswith("--config="):
      return item.partition("=")[2]
    if item == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def one_line(e: Exception) -> str:
  """An error as one line: a multi-line message (a config file's traceback
  inside a flag error) by its first and last lines."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def command_line_error(argv: list[str], error: Exception) -> str:
  """The one line for a command line that absl or ml_collections refused
  with `error` (train.py and eval.py): a config file that does not load says
  why, a `--config.KEY` the config lacks is named with the nearest valid
  keys, anything else is the error itself."""
  spec = config_spec(argv)
  if spec:
    try:
      load_config_file(spec)
    except Exception as load_error:  # pylint: disable=broad-except  # a config file can raise anything
      return f"config {spec}: {type(load_error).__name__}: {one_line(load_error)}"
    if message := override_error(spec, argv):
      return message
  return one_line(error)


def override_error(config_spec: str, argv: list[str]) -> str | None:
  """Names the first `--config.KEY=...` of `argv` that the config file lacks
  (ml_collections reports it as a bare AttributeError/KeyError)."""
  try:
    config = load_config_file(config_spec)
  except Exception:  # pylint: disable=broad-except
    return None  # the file itself is the problem: its own error says so
  known = [k for k, _ in flatten(config)]
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  for item in argv:
    if item.startswith("--config."):
      key = item[len("--config."):].partition("=")[0]
      if key not in prefixes:
        return unknown_key_error(key, known)
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check of a training config, each a ValueError naming the field:
  fields the code does not know (at any depth, with the nearest valid ones),
  sizes that are not positive, unknown choices, a batch that the devices x
  accumulation do not divide, missing init files. Cheap: nothing is built."""
  from lseg_jax import models, optim, sharding  # pylint: disable=g-import-not-at-top

  known = dict(flatten(base_config()))
  model_known = [f"model.{k}" for k, _ in flatten(models.get_model_config(config.model.backbone))] if (
      config.get("model") and config.model.get("backbone") in models.BACKBONES) else []
  for key, _ in flatten(config):
    if key not in known and not key.startswith("model.") and not key.startswith("lr_mults."):
      raise ValueError(unknown_key_error(key, list(known) + model_known))
    if key.startswith("model.") and model_known and key not in model_known:
      raise ValueError(unknown_key_error(key, list(known) + model_known))
  if not config.get("model"):
    raise ValueError("the config has no `model` section (set config.model = get_model_config(...))")
  models.build_model(config.model)  # unknown backbone, readout, arch_option, activation, remat policy
  data.resolve_input_config(config.input)  # unknown dataset keys, eval_mode, normalisation, sizes
  data.registry.get(config.input.dataset)  # unknown dataset name

  def positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
      raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else 'positive'}")

  for key in ("input.batch_size", "evals.batch_size", "grad_accum_steps", "ddp_replicas", "log_every",
              "keep_ckpts", "schedule.power"):
    positive(key, _get(config, key, known[key]))
  for key in ("ckpt_every", "eval_every", "wd", "schedule.warmup_steps", "schedule.horizon_epochs",
              "grad_clip_norm", "total_steps", "total_epochs"):
    positive(key, _get(config, key, known[key]), allow_zero=True)
  positive("profile.start_step", _get(config, "profile.start_step", known["profile.start_step"]))
  positive("profile.num_steps", _get(config, "profile.num_steps", known["profile.num_steps"]), allow_zero=True)
  if not (config.total_steps or config.total_epochs):
    raise ValueError("set total_steps or total_epochs: both are 0, the run would have no step")
  lr = optim.base_learning_rate(config)  # exactly one of lr and base_lr
  if not lr > 0:
    raise ValueError(f"the learning rate {lr} must be positive")
  for key, choices in (("optax_name", OPTIMIZERS), ("schedule.kind", SCHEDULES),
                       ("loss_reduction", losses.REDUCTIONS), ("evals.protocol", ("single", "multiscale", "fewshot"))):
    value = _get(config, key, known[key])
    if value not in choices:
      raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")
  for group in config.lr_mults:
    if group not in MODULES:
      raise ValueError(f"lr_mults has group {group!r}; the trained modules are {', '.join(MODULES)}")
  for part, path in config.init.items():
    if path and not os.path.exists(path):
      raise ValueError(f"init.{part}={path} does not exist")

  mesh = check_mesh(config.mesh)
  batch_devices = sharding.batch_devices(mesh, tuple(tuple(r) for r in config.sharding_rules))
  accum = config.grad_accum_steps
  replicas = config.ddp_replicas if _get(config, "loss_reduction", "pixels") == "replicas" else 1
  for key, size, multiple, why in (
      ("input.batch_size", config.input.batch_size, batch_devices * accum * replicas,
       f" x grad_accum_steps={accum}" + (f" x ddp_replicas={replicas}" if replicas > 1 else "")),
      ("evals.batch_size", config.evals.batch_size, batch_devices, "")):
    if size % multiple:
      raise ValueError(f"{key}={size} must be a multiple of {multiple} (the devices the batch is split over{why})")


def check_mesh(axes) -> "jax.sharding.Mesh":
  """The mesh of `config.mesh`, or a ValueError naming it and the devices
  this process sees: processes that did not join (README "Multi-host") each
  see only their own."""
  from lseg_jax import distributed, sharding  # pylint: disable=g-import-not-at-top

  try:
    return sharding.make_mesh(axes)
  except ValueError as e:
    raise ValueError(f"{e}: this process sees {distributed.topology()}") from None


def _get(config: ml_collections.ConfigDict, dotted: str, default=None):
  """config.a.b for "a.b"; `default` where a config left the field out."""
  for part in dotted.split("."):
    if part not in config:
      return default
    config = config[part]
  return config
