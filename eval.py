r"""Evaluates LSeg with the official protocols; prints the scores, then writes them as JSON.

  python eval.py --workdir /tmp/lseg_jax_demo                    # the demo, as train.py evaluated it
  python eval.py --config configs/ade20k_lseg_vitl16.py --workdir /ckpt/lseg_ade20k --protocol multiscale
  python eval.py --config configs/ade20k_lseg_vitl16.py --checkpoint models/lseg_demo --protocol multiscale
  python eval.py --config configs/fewshot_lsegzs.py:dataset=pascal5i,fold=0 --checkpoint models/pascal0

The model: --checkpoint (a converted model directory or a training workdir) or
--workdir's newest readable checkpoint (a damaged one is skipped with a
warning, never deleted: evaluation only reads). Only the parameters and
BatchNorm statistics are read, not the optimizer state.
The config: --config, or the run config (config.json) of --workdir (or of a
--checkpoint that is a training workdir).
The scores: printed, then written atomically to --out, by default
WORKDIR/eval_<protocol>_<split>.json, or with --checkpoint alone
./eval_<model dir name>_<protocol>_<split>.json (never into a model directory).

Protocols (--protocol, default: `config.evals.protocol` or "single"):
  single      the config's eval transform (as train.py's validation), batched over the mesh;
  multiscale  ADE20K's test_lseg.py: 6 scales x flip, sliding 480 windows (lseg_jax.inference);
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
import os
from pathlib import Path
import sys
import tempfile
import time

from absl import flags
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from lseg_jax import checkpoint, data, evaluate, inference, labels as labels_lib, metrics, sharding
from lseg_jax.data import fewshot
from lseg_jax.models import build_model


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


def single_scale(config, model, variables, text_table, split: str) -> dict:
  """train.py's validation: the config's eval transform, batched over the mesh."""
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  eval_step = jax.jit(evaluate.make_eval_step(model, len(text_table)))
  loader = data.make_loader(config.input, split, global_batch_size=config.evals.batch_size, seed=0,
                            train=False, num_epochs=1)
  to_global = functools.partial(data.make_global_batch, mesh=mesh, rules=rules)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  return evaluate.evaluate(eval_step, variables, jax.device_put(text_table, sharding.replicated(mesh)), loader,
                           data.num_examples(config.input, split), config.evals.batch_size, to_global)


def _per_image(config, split: str):
  """Full-size examples of this process, one at a time (padding included)."""
  cfg = ml_collections.ConfigDict(config.input.to_dict())
  cfg.eval_mode = "none"
  loader = data.make_loader(cfg, split, global_batch_size=jax.process_count(), seed=0, train=False,
                            num_epochs=1)
  for batch in loader:
    yield {k: v[0] for k, v in batch.items()}


def multiscale(config, model, variables, text_table, split: str) -> dict:
  """ADE20K's official multi-scale, flipped, sliding-window evaluation."""
  mesh = sharding.make_mesh([("data", jax.local_device_count())], jax.local_devices())  # per process
  ms = inference.MultiScale(base_size=config.input.base_size, crop_size=config.input.crop_size)
  mean, std = data.transforms.normalization_stats(config.input.normalization)
  forward = inference.make_window_forward(model, jax.device_put(variables, sharding.replicated(mesh)),
                                          text_table, chunk=2 * jax.local_device_count(),
                                          sharding=sharding.batch_sharding(mesh, (("batch", "data"),)))
  num_classes = len(text_table)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  total, t0 = data.num_examples(config.input, split), time.time()
  for i, ex in enumerate(_per_image(config, split)):
    if not (ex["mask"] >= 0).any():
      continue  # padding (or an image without labelled pixels: it adds nothing)
    labels = ex["label_ids"][ex["label_mask"]]
    logits = inference.multiscale_logits(forward, ex["image"], num_classes, ms, -mean / std)[..., labels]
    pred = labels[np.argmax(logits, -1)]
    target = np.where(ex["mask"] >= 0, labels[np.maximum(ex["mask"], 0)], -1)
    confusion += np.asarray(metrics.confusion_matrix(pred, target, num_classes))
    progress(min((i + 1) * jax.process_count(), total), total, t0)
  confusion = multihost_utils.process_allgather(confusion).reshape(-1, num_classes, num_classes).sum(0)
  return metrics.segmentation_scores(confusion)


def fewshot_eval(config, model, variables, text_table, split: str) -> dict:
  """test_lseg_zs.py: single scale, no flip, per-episode label pair."""
  names = data.label_names(config.input)  # ("others", *classes)
  eval_fn = jax.jit(lambda v, x, t: model.apply(v, x, t))
  num_classes = len(text_table) - 1  # the table is ("others", *classes)
  inter, union = np.zeros((num_classes, 2)), np.zeros((num_classes, 2))
  loader = data.make_loader(config.input, split, global_batch_size=config.evals.batch_size, seed=0,
                            train=False, num_epochs=1, shard_index=jax.process_index())
  total, done, t0 = data.num_examples(config.input, split), 0, time.time()
  for batch in loader:
    logits = np.asarray(eval_fn(variables, batch["image"], text_table[batch["label_ids"]]))
    pred = np.argmax(logits, -1)
    for p, target, ids in zip(pred, batch["mask"], batch["label_ids"]):
      if not (target >= 0).any():
        continue  # padding
      i, u = metrics.fewshot_areas(p, target)
      inter[ids[1] - 1] += i
      union[ids[1] - 1] += u
      done += 1
    progress(min(done * jax.process_count(), total), total, t0)
  inter = multihost_utils.process_allgather(inter).reshape(-1, num_classes, 2).sum(0)
  union = multihost_utils.process_allgather(union).reshape(-1, num_classes, 2).sum(0)
  benchmark = FEWSHOT_BENCHMARKS[config.input.dataset]
  fold = int(str(config.input.builder_config or "fold0").removeprefix("fold"))
  classes = (fewshot.fold_class_ids(benchmark, fold) if benchmark != "fss"
             else sorted({int(c) for c in np.nonzero(union.sum(1))[0]}))
  scores = metrics.fewshot_scores(inter, union, classes)
  scores["IoU"] = {str(names[c + 1]): iou for c, iou in zip(classes, scores["IoU"])}
  return scores


PROTOCOLS = {"single": single_scale, "multiscale": multiscale, "fewshot": fewshot_eval}


def _directory_flag(name: str, value: str | None) -> Path | None:
  return None if value is None else checkpoint.existing_directory(Path(value).absolute(), name)


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  """Parses `argv` (argv[0] is the program) into `fv`."""
  try:
    rest = fv(argv)
  except (AttributeError, KeyError) as e:  # config_flags, for an override of a field the config lacks
    field, _, hint = str(e).replace("\\'", "").replace("'", "").partition("\\n")
    raise ValueError(f"a --config.* override names no config field: {field}. {hint}".strip()) from None
  if rest[1:]:
    raise ValueError(f"unexpected argument {rest[1]!r}: eval.py takes flags only (see --help)")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl's global flags


def resolve_run(fv: flags.FlagValues) -> tuple[Path, ml_collections.ConfigDict, str, str, Path]:
  """(model path, config, protocol, split, output file) from the parsed
  flags, every user mistake raised here, before any model is read."""
  workdir, model_dir = _directory_flag("workdir", fv.workdir), _directory_flag("checkpoint", fv.checkpoint)
  if not (workdir or model_dir):
    raise ValueError("give --workdir (a training run) or --checkpoint (a model directory)")
  config = fv.config or checkpoint.read_run_config(workdir or model_dir)
  if config is None:
    raise ValueError(f"give --config: {workdir or model_dir} holds no {checkpoint.RUN_CONFIG} (a converted model)")
  protocol = fv.protocol or config.evals.get("protocol", "single")
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r} in config.evals.protocol; one of {', '.join(PROTOCOLS)}")
  if protocol == "fewshot" and config.input.dataset not in FEWSHOT_BENCHMARKS:
    raise ValueError(f"--protocol fewshot needs a few-shot dataset ({', '.join(FEWSHOT_BENCHMARKS)}), "
                     f"not {config.input.dataset}")
  split = fv.split or config.evals.split
  if fv.out:
    out = Path(fv.out).absolute()
  elif workdir:
    out = workdir / f"eval_{protocol}_{split}.json"
  else:
    out = Path.cwd() / f"eval_{model_dir.name}_{protocol}_{split}.json"
  if out.is_dir():
    raise IsADirectoryError(f"--out {out} is a directory; give a file path such as {out / 'scores.json'}")
  if jax.process_index() == 0:
    try:
      checkpoint.check_writable(out)
    except OSError as e:
      raise type(e)(f"{e}; choose another file with --out") from None
  return model_dir or workdir, config, protocol, split, out


def print_scores(scores: dict) -> None:
  """Per-class IoU, best first, and one summary line."""
  for name, iou in sorted(scores.get("IoU", {}).items(), key=lambda kv: -kv[1]):
    print(f"  {name:24s} {iou:.4f}")
  summary = " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))
  print(f"{scores['dataset']} {scores['split']} ({scores['protocol']}): {summary}", flush=True)


def write_scores(out: Path, scores: dict) -> None:
  """JSON into a temporary sibling renamed onto `out`: never a half-written file."""
  tmp = None
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(scores, f, indent=2)
    os.replace(tmp, out)
  except OSError as e:
    if tmp:
      Path(tmp).unlink(missing_ok=True)
    raise OSError(f"cannot write scores to {out}: {e.strerror or e}") from e


def run(fv: flags.FlagValues, argv: list[str]) -> None:
  """Evaluates the model the command line names and reports its scores."""
  parse_flags(fv, argv)
  model_path, config, protocol, split, out = resolve_run(fv)
  model_config, variables = checkpoint.load_model(model_path)
  model = build_model(model_config)
  label_names = data.label_names(config.input)
  text_table = labels_lib.encode_labels(model, variables["params"]["text_encoder"], label_names,
                                        config.get("prompt_templates", ("{}",)))
  variables = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
               "batch_stats": variables["batch_stats"]}
  scores = PROTOCOLS[protocol](config, model, variables, text_table, split)
  scores = {"protocol": protocol, "split": split, "dataset": config.input.dataset, **scores}
  if isinstance(scores.get("IoU"), list):
    scores["IoU"] = dict(zip(label_names, scores["IoU"]))
  if jax.process_index() == 0:
    print_scores(scores)  # first: a failing write must not lose them
    write_scores(out, scores)
    print(f"wrote {out}")


def _one_line(e: Exception) -> str:
  """An error as one line: a multi-line message (a config file's traceback
  inside a flag error) by its first and last lines."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def main(argv: list[str]) -> int:
  """The command line: 0, or 2 with one `error:` line on stderr for a user's mistake."""
  fv = define_flags(argv)
  if HELP & set(argv[1:]):
    print(__doc__ + "\n" + fv.get_help())
    return 0
  try:
    run(fv, argv)
  except USER_ERRORS as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
