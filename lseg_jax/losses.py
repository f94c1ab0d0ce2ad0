"""The LSeg training loss: per-pixel softmax cross-entropy over the label logits.

As the official `nn.CrossEntropyLoss(ignore_index=-1)`: the mean over the
pixels whose target is not ignored. Labels that only pad a per-image label set
(`label_mask` False) take no probability mass.

Reductions over a batch (`config.loss_reduction`, see `training.py`):
"pixels" divides the summed loss by the valid pixels of the whole optimiser
step; "replicas" reproduces the official multi-GPU run, where each DDP
replica averages over its own valid pixels and the gradients (so the losses)
are averaged over replicas and accumulated micro-batches. The two agree when
every slice has the same number of valid pixels.
"""

import jax
import jax.numpy as jnp

IGNORE = -1  # the target of unlabelled pixels (ADE20K's 0 - 1), here and in the data
REDUCTIONS = ("pixels", "replicas")


def mask_padded_labels(logits: jax.Array, label_mask: jax.Array | None) -> jax.Array:
  """logits [B, H, W, N]; padded labels (label_mask [B, N] False) -> -1e9."""
  if label_mask is None:
    return logits
  return jnp.where(label_mask[:, None, None, :], logits, -1e9)


def pixel_nll(logits: jax.Array, targets: jax.Array, label_mask: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [B, H, W, N], targets [B, H, W] in [0, N) or IGNORE ->
  (nll [B, H, W] (0 where ignored), valid [B, H, W] bool, correct [B, H, W] bool)."""
  logits = mask_padded_labels(logits.astype(jnp.float32), label_mask)
  valid = targets != IGNORE
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets) & valid
  return jnp.where(valid, nll, 0.0), valid, correct


def pixel_cross_entropy(logits: jax.Array, targets: jax.Array, label_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The mean loss over valid pixels, and sums for metrics (summable over
  steps and devices): loss_sum, correct, valid."""
  nll, valid, correct = pixel_nll(logits, targets, label_mask)
  n_valid = valid.sum()
  return nll.sum() / jnp.maximum(n_valid, 1), {"loss_sum": nll.sum(), "correct": correct.sum(), "valid": n_valid}


def replica_mean(nll: jax.Array, valid: jax.Array, replicas: int) -> jax.Array:
  """The official DDP loss of a batch: the batch split into `replicas` equal
  contiguous slices (one per GPU), each averaged over its own valid pixels,
  then the mean of the slice means. nll, valid [B, H, W]."""
  per_slice = lambda x: x.reshape(replicas, -1).sum(1)
  return (per_slice(nll) / jnp.maximum(per_slice(valid), 1)).mean()
