r"""Evaluates LSeg with the official protocols; writes scores as JSON in the workdir.

  python eval.py --workdir /tmp/lseg_jax_demo                    # the demo, as train.py evaluated it
  python eval.py --config configs/ade20k_lseg_vitl16.py --workdir /ckpt/lseg_ade20k --protocol multiscale
  python eval.py --config configs/ade20k_lseg_vitl16.py --checkpoint models/lseg_demo --protocol multiscale
  python eval.py --config configs/fewshot_lsegzs.py:dataset=pascal5i,fold=0 --checkpoint models/pascal0

Protocols (--protocol, default: `config.evals.protocol` or "single"):
  single      the config's eval transform (as train.py's validation), batched over the mesh;
  multiscale  ADE20K's test_lseg.py: 6 scales x flip, sliding 480 windows (lseg_jax.inference);
  fewshot     test_lseg_zs.py: per-episode ['others', class], mIoU and FB-IoU (HSNet).
mIoU / pixAcc follow PyTorch-Encoding's SegmentationMetric from a confusion
matrix summed over devices and processes.
"""

import functools
import json
from pathlib import Path
import sys
import time

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from lseg_jax import checkpoint, data, evaluate, inference, labels as labels_lib, metrics, sharding
from lseg_jax.data import fewshot
from lseg_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: WORKDIR/config.json's run).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: its latest checkpoint; results go here.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model directory (python -m lseg_jax.convert).")
_PROTOCOL = flags.DEFINE_enum("protocol", None, ["single", "multiscale", "fewshot"], "Evaluation protocol.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.evals.split).")


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
  benchmark = {"pascal5i": "pascal", "coco20i": "coco", "fss1000": "fss"}[config.input.dataset]
  fold = int(str(config.input.builder_config or "fold0").removeprefix("fold"))
  classes = (fewshot.fold_class_ids(benchmark, fold) if benchmark != "fss"
             else sorted({int(c) for c in np.nonzero(union.sum(1))[0]}))
  scores = metrics.fewshot_scores(inter, union, classes)
  scores["IoU"] = {str(names[c + 1]): iou for c, iou in zip(classes, scores["IoU"])}
  return scores


PROTOCOLS = {"single": single_scale, "multiscale": multiscale, "fewshot": fewshot_eval}


def main(argv):
  del argv
  if not (_WORKDIR.value or _CHECKPOINT.value):
    raise app.UsageError("give --workdir (a training run) or --checkpoint (a model directory)")
  config = _CONFIG.value or (_WORKDIR.value and checkpoint.read_run_config(_WORKDIR.value))
  if config is None:
    raise app.UsageError("give --config, or a --workdir written by train.py (it holds config.json)")
  model_config, variables = checkpoint.load_model(_CHECKPOINT.value or _WORKDIR.value)
  model = build_model(model_config)
  label_names = data.label_names(config.input)
  text_table = labels_lib.encode_labels(model, variables["params"]["text_encoder"], label_names,
                                        config.get("prompt_templates", ("{}",)))
  variables = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
               "batch_stats": variables["batch_stats"]}
  protocol = _PROTOCOL.value or config.evals.get("protocol", "single")
  split = _SPLIT.value or config.evals.split
  scores = PROTOCOLS[protocol](config, model, variables, text_table, split)
  scores = {"protocol": protocol, "split": split, "dataset": config.input.dataset, **scores}
  if isinstance(scores.get("IoU"), list):
    scores["IoU"] = dict(zip(label_names, scores["IoU"]))
  if jax.process_index() == 0:
    out_dir = Path(_WORKDIR.value or _CHECKPOINT.value)
    out = out_dir / f"eval_{protocol}_{split}.json"
    out.write_text(json.dumps(scores, indent=2))
    for name, iou in sorted(scores.get("IoU", {}).items(), key=lambda kv: -kv[1]):
      print(f"  {name:24s} {iou:.4f}")
    summary = " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))
    print(f"{config.input.dataset} {split} ({protocol}): {summary}\nwrote {out}")


if __name__ == "__main__":
  app.run(main)
