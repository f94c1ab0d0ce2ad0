"""The LSeg training loss: per-pixel softmax cross-entropy over the label logits.

As the official `nn.CrossEntropyLoss(ignore_index=-1)`: the mean over the
pixels whose target is not ignored. Labels that only pad a per-image label set
(`label_mask` False) take no probability mass.
"""

import jax
import jax.numpy as jnp

IGNORE = -1


def mask_padded_labels(logits: jax.Array, label_mask: jax.Array | None) -> jax.Array:
  """logits [B, H, W, N]; padded labels (label_mask [B, N] False) -> -1e9."""
  if label_mask is None:
    return logits
  return jnp.where(label_mask[:, None, None, :], logits, -1e9)


def pixel_cross_entropy(logits: jax.Array, targets: jax.Array, label_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits [B, H, W, N] (float32), targets [B, H, W] in [0, N) or IGNORE.

  Returns the mean loss over valid pixels and sums for metrics (summable over
  steps and devices): loss_sum, correct, valid.
  """
  logits = mask_padded_labels(logits.astype(jnp.float32), label_mask)
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # [B, H, W]
  nll = jnp.where(valid, nll, 0.0)
  n_valid = valid.sum()
  correct = ((jnp.argmax(logits, -1) == targets) & valid).sum()
  loss = nll.sum() / jnp.maximum(n_valid, 1)
  return loss, {"loss_sum": nll.sum(), "correct": correct, "valid": n_valid}
