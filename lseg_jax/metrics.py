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
