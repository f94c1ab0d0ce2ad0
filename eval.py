r"""Evaluates LSeg with the official protocols; prints the scores, then writes them as JSON.

  python eval.py --workdir /tmp/lseg_jax_${USER}_demo            # the demo, as train.py evaluated it
  python eval.py --config configs/ade20k_lseg_vitl16.py --workdir /ckpt/lseg_ade20k --protocol multiscale
  python eval.py --config configs/ade20k_lseg_vitl16.py --checkpoint models/lseg_demo --protocol multiscale
  python eval.py --config configs/fewshot_lsegzs.py:dataset=pascal5i,fold=0 --checkpoint models/pascal0
  python eval.py --config configs/ade20k_lseg_vitl16.py --exported lseg.jaxexport --protocol multiscale
  python eval.py --workdir /ckpt/ade --coordinator_address=host0:1234 --num_processes=2 --process_id=I
  srun --ntasks-per-node=8 --gpus-per-node=8 python eval.py --workdir /shared/ade   # processes from SLURM

The model: --checkpoint (a converted model directory or a training workdir),
--workdir's newest readable checkpoint (a damaged one is skipped with a
warning, never deleted: evaluation only reads), or --exported, a
`python -m lseg_jax.export` artifact (no model code needed; its window must
be input.crop_size). Only the parameters and BatchNorm statistics are read,
not the optimizer state. Every protocol runs on all the devices of
`config.mesh`, over one or several processes, with the scores of one device.
The config: --config, or the run config (config.json) of --workdir (or of a
--checkpoint that is a training workdir).
The scores: printed, then written atomically to --out, by default
WORKDIR/eval_<protocol>_<split>.json, or with --checkpoint alone
./eval_<model dir or artifact name>_<protocol>_<split>.json (never into a model directory),
as strict JSON (a non-finite number is null) naming the model and the training
step it scored (null for a converted model or an artifact).

Protocols (--protocol, default: `config.evals.protocol` or "single"):
  single      the config's eval transform (as train.py's validation), batched over the mesh;
  multiscale  ADE20K's test_lseg.py: 6 scales x flip, sliding 480 windows, summed on the devices
              (lseg_jax.inference.MultiScaleSegmenter; evals.windows_per_device, default 4);
  fewshot     test_lseg_zs.py: per-episode ['others', class], mIoU and FB-IoU (HSNet).
mIoU / pixAcc follow PyTorch-Encoding's SegmentationMetric from a confusion
matrix summed over devices and processes.

A user's mistake (a missing or damaged checkpoint, a config typo, an unwritable
--out) is one `error:` line and exit code 2, found before anything compiles.
The flags live in their own FlagValues, so tests can call `main` in-process
beside train.py.
"""

import functools
import json
from pathlib import Path
import re
import sys
import time

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from lseg_jax import checkpoint, cli, config_lib, data, distributed, evaluate, files, inference
from lseg_jax import losses, metrics, sharding
from lseg_jax.data import fewshot
from lseg_jax.segmenter import Segmenter


def define_flags(argv: list[str]) -> flags.FlagValues:
  """eval.py's flags in a FlagValues of their own, fresh for each command
  line `argv` (whose `--config.a.b=x` overrides it reads): tests run `main`
  in-process, beside train.py's global flags."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file (default: WORKDIR/config.json's run).",
                                  flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Training workdir: its run config, its newest readable checkpoint "
                      "(unless --checkpoint); results go here (unless --out).", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "A model directory (python -m lseg_jax.convert) or training workdir.",
                      flag_values=fv)
  flags.DEFINE_string("exported", None, "An lseg_jax.export artifact to evaluate instead of a checkpoint "
                      "(needs --config).", flag_values=fv)
  distributed.define_flags(fv)
  flags.DEFINE_enum("protocol", None, ["single", "multiscale", "fewshot"], "Evaluation protocol.", flag_values=fv)
  flags.DEFINE_string("split", None, "Split to evaluate (default: config.evals.split).", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON file for the scores (default: see above).", flag_values=fv)
  return fv


HELP = {"-h", "--help", "--helpshort", "--helpfull"}
# The project's user-facing errors (OSError covers missing, unreadable and
# unwritable paths); anything else is a bug and keeps its traceback.
USER_ERRORS = (flags.Error, ValueError, OSError)
FEWSHOT_BENCHMARKS = {"pascal5i": "pascal", "coco20i": "coco", "fss1000": "fss"}  # dataset -> HSNet name


def progress(done: int, total: int, t0: float) -> None:
  if jax.process_index() == 0:
    rate = done / max(time.time() - t0, 1e-9)
    print(f"\r{done}/{total} images ({rate:.2f}/s, eta {(total - done) / max(rate, 1e-9):.0f}s)",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def _eval_mesh(config) -> jax.sharding.Mesh:
  """The devices of `config.mesh` as one data axis: evaluation replicates the model."""
  return sharding.make_mesh([("data", sharding.make_mesh(config.mesh).devices.size)])


def _check_batch(config, mesh, rules) -> None:
  """evals.batch_size must split evenly over the devices the batch is sharded on."""
  devices = sharding.batch_devices(mesh, rules)
  if config.evals.batch_size % devices:
    raise ValueError(f"evals.batch_size={config.evals.batch_size} must be a multiple of {devices} "
                     "(the devices the batch is split over)")


def single_scale(config, model, variables, text_table, split: str) -> dict:
  """train.py's validation: the config's eval transform, batched over the mesh."""
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  _check_batch(config, mesh, rules)
  eval_step = jax.jit(evaluate.make_eval_step(model, len(text_table)))
  loader = data.make_loader(config.input, split, global_batch_size=config.evals.batch_size, seed=0,
                            train=False, num_epochs=1)
  to_global = functools.partial(data.make_global_batch, mesh=mesh, rules=rules)
  variables = inference.replicate(variables, mesh)
  return evaluate.evaluate(eval_step, variables, inference.replicate(text_table, mesh), loader,
                           data.num_examples(config.input, split), config.evals.batch_size, to_global)


def _per_image(config, split: str):
  """Full-size examples of this process, one at a time (padding included:
  every process yields the same number)."""
  cfg = ml_collections.ConfigDict(config.input.to_dict())
  cfg.eval_mode = "none"
  loader = data.make_loader(cfg, split, global_batch_size=jax.process_count(), seed=0, train=False,
                            num_epochs=1)
  for batch in loader:
    yield {k: v[0] for k, v in batch.items()}


def _groups(examples, size: int):
  """Lists of `size` examples, the last one filled with None."""
  group = []
  for ex in examples:
    group.append(ex)
    if len(group) == size:
      yield group
      group = []
  if group:
    yield group + [None] * (size - len(group))


def _padded_targets(group: list, out_hw: tuple[int, int]) -> np.ndarray:
  """[G, H, W] label positions of a group, IGNORE outside each image and for empty slots."""
  targets = np.full((len(group), *out_hw), losses.IGNORE, np.int32)
  for i, ex in enumerate(group):
    if ex is not None:
      targets[i, :ex["mask"].shape[0], :ex["mask"].shape[1]] = ex["mask"]
  return targets


def multiscale(config, model, variables, text_table, split: str) -> dict:
  """ADE20K's official multi-scale, flipped, sliding-window evaluation, every
  [H, W, labels] map on the devices (`inference.MultiScaleSegmenter`); only
  the confusion matrix comes back."""
  mesh = _eval_mesh(config)
  ms = inference.MultiScale(base_size=config.input.base_size, crop_size=config.input.crop_size)
  mean, std = data.transforms.normalization_stats(config.input.normalization)
  segmenter = inference.MultiScaleSegmenter(
      inference.model_forward(model), variables, mesh, ms, -mean / std,
      windows_per_device=config.evals.get("windows_per_device", 4))
  num_classes = len(text_table)
  table = np.asarray(text_table)
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  confusion_fn = jax.jit(functools.partial(evaluate.confusion, num_classes=num_classes))
  n_labels = config.input.get("max_labels") or num_classes
  empty = {"label_ids": np.zeros(n_labels, np.int32), "label_mask": np.zeros(n_labels, bool)}  # an empty slot
  confusion = np.zeros((num_classes, num_classes), np.int64)
  total, done, t0 = data.num_examples(config.input, split), 0, time.time()
  for group in _groups(_per_image(config, split), segmenter.slots):
    group = [ex if ex is not None and (ex["mask"] != losses.IGNORE).any() else None for ex in group]  # padding
    label_ids = np.stack([(ex or empty)["label_ids"] for ex in group])  # [G, N]
    label_mask = np.stack([(ex or empty)["label_mask"] for ex in group])
    sums, out_hw = segmenter.logit_sums([None if ex is None else ex["image"] for ex in group], table[label_ids],
                                        label_mask)
    to_global = lambda x: jax.make_array_from_process_local_data(data_sharding, x)
    conf = confusion_fn(sums, to_global(_padded_targets(group, out_hw)), to_global(label_ids),
                        to_global(label_mask))
    confusion += np.asarray(conf, np.int64)
    done += sum(ex is not None for ex in group)
    progress(min(done * jax.process_count(), total), total, t0)
  return metrics.segmentation_scores(confusion)


def _fold(builder_config: str | None) -> int:
  """The fold of a few-shot builder config ("fold2", "fold2_n100")."""
  match = re.match(r"fold(\d+)", builder_config or "fold0")
  if not match:
    raise ValueError(f"input.builder_config={builder_config!r} names no fold (fold0..fold3)")
  return int(match.group(1))


def fewshot_eval(config, model, variables, text_table, split: str) -> dict:
  """test_lseg_zs.py: single scale, no flip, per-episode label pair; the
  episodes sharded over the mesh, the areas summed on the devices."""
  names = data.label_names(config.input)  # ("others", *classes)
  num_classes = len(text_table) - 1  # the table is ("others", *classes)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  _check_batch(config, mesh, rules)
  step = jax.jit(evaluate.make_fewshot_step(model, num_classes))
  variables, table = inference.replicate((variables, text_table), mesh)
  loader = data.make_loader(config.input, split, global_batch_size=config.evals.batch_size, seed=0,
                            train=False, num_epochs=1)
  num_batches = -(-data.num_examples(config.input, split) // config.evals.batch_size)
  local_batch = config.evals.batch_size // jax.process_count()
  inter, union = np.zeros((num_classes, 2), np.int64), np.zeros((num_classes, 2), np.int64)
  total, t0 = data.num_examples(config.input, split), time.time()
  for i, batch in enumerate(evaluate.padded_batches(loader, num_batches, local_batch)):
    i_sum, u_sum = step(variables, data.make_global_batch(batch, mesh, rules=rules), table)
    inter += np.asarray(i_sum, np.int64)
    union += np.asarray(u_sum, np.int64)
    progress(min((i + 1) * config.evals.batch_size, total), total, t0)
  benchmark = FEWSHOT_BENCHMARKS[config.input.dataset]
  classes = (fewshot.fold_class_ids(benchmark, _fold(config.input.builder_config)) if benchmark != "fss"
             else sorted({int(c) for c in np.nonzero(union.sum(1))[0]}))
  scores = metrics.fewshot_scores(inter, union, classes)
  scores["IoU"] = {str(names[c + 1]): iou for c, iou in zip(classes, scores["IoU"])}
  return scores


PROTOCOLS = {"single": single_scale, "multiscale": multiscale, "fewshot": fewshot_eval}


def _directory_flag(name: str, value: str | None) -> Path | None:
  return None if value is None else checkpoint.existing_directory(Path(value).absolute(), name)


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  """Parses `argv` (argv[0] is the program) into `fv`; a mistake is one
  ValueError line (train.py's wording: config_lib.command_line_error)."""
  try:
    if spec := config_lib.config_spec(argv):
      config_lib.load_config_file(spec)  # ml_collections would defer a failure to the config's first use
    rest = fv(argv)
  except Exception as e:  # pylint: disable=broad-except  # absl, ml_collections and config files raise anything
    raise ValueError(config_lib.command_line_error(argv, e)) from None
  if rest[1:]:
    raise ValueError(f"unexpected argument {rest[1]!r}: eval.py takes flags only (see --help)")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl's global flags


def _exported_flag(value: str | None) -> Path | None:
  if value is None:
    return None
  path = Path(value).absolute()
  if not path.is_file():
    raise FileNotFoundError(f"--exported {path} does not exist or is not a file")
  return path


def resolve_run(fv: flags.FlagValues) -> tuple[Path, ml_collections.ConfigDict, str, str, Path]:
  """(model path: a checkpoint or an exported artifact, config, protocol,
  split, output file) from the parsed flags, every user mistake raised here,
  before any model is read."""
  workdir, model_dir = _directory_flag("workdir", fv.workdir), _directory_flag("checkpoint", fv.checkpoint)
  exported = _exported_flag(fv.exported)
  if not (workdir or model_dir or exported):
    raise ValueError("give --workdir (a training run), --checkpoint (a model directory) or --exported "
                     "(an lseg_jax.export artifact)")
  if exported and model_dir:
    raise ValueError("give --checkpoint or --exported, not both")
  model_path = exported or model_dir or workdir
  config = fv.config or (checkpoint.read_run_config(workdir or model_dir) if not exported else None)
  if config is None:
    holds = f"{model_path} holds no {checkpoint.RUN_CONFIG}" + ("" if exported else " (a converted model)")
    raise ValueError(f"give --config: {holds}")
  protocol = fv.protocol or config.evals.get("protocol", "single")
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r} in config.evals.protocol; one of {', '.join(PROTOCOLS)}")
  if protocol == "fewshot" and config.input.dataset not in FEWSHOT_BENCHMARKS:
    raise ValueError(f"--protocol fewshot needs a few-shot dataset ({', '.join(FEWSHOT_BENCHMARKS)}), "
                     f"not {config.input.dataset}")
  split = fv.split or config.evals.split
  config_lib.check_mesh(config.mesh)  # the devices it needs: found before any model is read
  if fv.out:
    out = Path(fv.out).absolute()
  elif workdir:
    out = workdir / f"eval_{protocol}_{split}.json"
  else:
    out = Path.cwd() / f"eval_{model_path.stem if exported else model_path.name}_{protocol}_{split}.json"
  if out.is_dir():
    raise IsADirectoryError(f"--out {out} is a directory; give a file path such as {out / 'scores.json'}")
  if jax.process_index() == 0:
    try:
      checkpoint.check_writable(out)
    except OSError as e:
      raise type(e)(f"{e}; choose another file with --out") from None
  return model_path, config, protocol, split, out


def print_scores(scores: dict) -> None:
  """Per-class IoU, best first, and one summary line."""
  for name, iou in sorted(scores.get("IoU", {}).items(), key=lambda kv: -kv[1]):
    print(f"  {name:24s} {iou:.4f}")
  summary = " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))
  print(f"{scores['dataset']} {scores['split']} ({scores['protocol']}): {summary}", flush=True)


def json_scores(scores: dict) -> str:
  """Scores as strict JSON: a non-finite number (the loss of a diverged
  model, the IoU of a class no image has) is null, never NaN or Infinity."""
  finite = lambda v: (None if isinstance(v, float) and not np.isfinite(v) else
                      {k: finite(x) for k, x in v.items()} if isinstance(v, dict) else
                      [finite(x) for x in v] if isinstance(v, (list, tuple)) else v)
  return json.dumps(finite(scores), indent=2, allow_nan=False)


def write_scores(out: Path, scores: dict) -> None:
  """JSON written atomically onto `out`: never a half-written file."""
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(out, json_scores(scores))
  except OSError as e:
    raise OSError(f"cannot write scores to {out}: {e.strerror or e}") from e


def load_network(model_path: Path, config, label_names) -> tuple:
  """(model, variables without the text tower, text table [C, D], training
  step or None) of a checkpoint, or of an exported artifact (whose
  parameters are inside it), as `segmenter.Segmenter` loads them."""
  seg = Segmenter.load(model_path)
  if seg.window is not None and seg.window != config.input.crop_size:
    raise ValueError(f"--exported {model_path} runs {seg.window} px windows, input.crop_size is "
                     f"{config.input.crop_size}: export with --window {config.input.crop_size}")
  return seg.model, seg.params, seg.encode_labels(label_names, config.get("prompt_templates", ("{}",))), seg.step


def run(fv: flags.FlagValues, argv: list[str]) -> None:
  """Evaluates the model the command line names and reports its scores."""
  parse_flags(fv, argv)
  processes = distributed.start(fv)
  model_path, config, protocol, split, out = resolve_run(fv)
  label_names = data.label_names(config.input)
  model, variables, text_table, step = load_network(model_path, config, label_names)
  if protocol == "multiscale" and Segmenter.peek(model_path)[0].get("eval_mode") == "resize" and \
      jax.process_index() == 0:
    print("note: this run saw whole images resized to a square, not the multi-scale protocol's sliding windows "
          "on images at their own aspect: its scores will be lower than --protocol single's", file=sys.stderr)
  if jax.process_index() == 0:
    print(processes, flush=True)  # once every user mistake is ruled out: those leave stdout empty
  scores = PROTOCOLS[protocol](config, model, variables, text_table, split)
  scores = {"protocol": protocol, "split": split, "dataset": config.input.dataset, "model": str(model_path),
            "step": step, **scores}
  if isinstance(scores.get("IoU"), list):
    scores["IoU"] = dict(zip(label_names, scores["IoU"]))
  if jax.process_index() == 0:
    print_scores(scores)  # first: a failing write must not lose them
    write_scores(out, scores)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
  """The command line: 0, or 2 with one `error:` line on stderr for a user's mistake."""
  cli.quiet_libraries()
  fv = define_flags(argv)
  if HELP & set(argv[1:]):
    print(__doc__ + "\n" + fv.get_help())
    return 0
  try:
    run(fv, argv)
  except USER_ERRORS as e:
    print(f"error: {config_lib.one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
