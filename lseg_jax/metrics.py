"""Segmentation metrics from a confusion matrix, as the official evaluations.

`SegmentationMetric` in PyTorch-Encoding (ADE20K, `test_lseg.py`): pixels whose
target is ignored (< 0) count nowhere; pixAcc = correct / labelled pixels;
IoU_c = inter_c / (eps + union_c) from totals over the whole set, and mIoU is
the mean over ALL classes (a class absent from both prediction and ground
truth has IoU 0 / eps = 0 and still counts). Per-class IoU comes from the same
totals (not the running average that `test_lseg.py` prints).
"""

import jax
import jax.numpy as jnp
import numpy as np

EPS = 2.220446049250313e-16  # np.spacing(1), the official epsilon


def confusion_matrix(pred: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
  """[num_classes, num_classes] counts of (target, prediction); ignored targets
  (< 0 or >= num_classes) are dropped. jit- and shard-friendly (one bincount)."""
  valid = (target >= 0) & (target < num_classes)
  index = jnp.where(valid, target * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict:
  """pixAcc, mIoU and per-class IoU from a [C, C] (target, prediction) matrix."""
  confusion = np.asarray(confusion, np.float64)
  inter = np.diag(confusion)
  area_pred, area_target = confusion.sum(0), confusion.sum(1)
  union = area_pred + area_target - inter
  iou = inter / (EPS + union)
  pix_acc = inter.sum() / (EPS + confusion.sum())
  return {"pixAcc": float(pix_acc), "mIoU": float(iou.mean()), "IoU": iou.tolist()}


def fewshot_areas(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Background/foreground intersection and union [2] of one episode:
  pred and target in {0 (others), 1 (class)}, target -1 ignored (HSNet's
  `Evaluator.classify_prediction`)."""
  valid = target >= 0
  inter = np.array([np.sum((pred == c) & (target == c) & valid) for c in (0, 1)], np.float64)
  union = np.array([np.sum(((pred == c) | (target == c)) & valid) for c in (0, 1)], np.float64)
  return inter, union


def fewshot_scores(inter: np.ndarray, union: np.ndarray, class_ids) -> dict:
  """HSNet's AverageMeter: inter/union [num_classes, 2] summed per class over
  episodes. mIoU = mean over the fold's classes of the foreground IoU;
  FB-IoU = mean of background and foreground IoU of the sums over those
  classes; both in percent."""
  inter, union = np.asarray(inter)[list(class_ids)], np.asarray(union)[list(class_ids)]
  fg_iou = inter[:, 1] / np.maximum(union[:, 1], 1)
  fb_iou = inter.sum(0) / np.maximum(union.sum(0), 1)
  return {"mIoU": float(100 * fg_iou.mean()), "FB-IoU": float(100 * fb_iou.mean()),
          "IoU": (100 * fg_iou).tolist()}
