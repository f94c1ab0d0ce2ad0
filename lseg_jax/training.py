"""The training step: what train.py jits, and what the parity tests run.

One optimiser step over `accum` micro-batches, as the official run with
`accumulate_grad_batches`: the micro-batches run in sequence, each in train
mode (BatchNorm normalises with that micro-batch's statistics and updates the
running statistics, one update per micro-batch, as the official code does),
their gradients are summed, and one optimiser update follows. The loss of the
step (`losses.REDUCTIONS`):
- "pixels": the mean over every valid pixel of all micro-batches, so the
  update equals that of one batch `accum` times larger, up to BatchNorm;
- "replicas": the official DDP + accumulation objective, the mean over
  micro-batches and `replicas` slices of each slice's own valid-pixel mean.

The label embeddings of the frozen text tower come in as `text_table`
[L, D]: they are not trained, and not part of the state.
"""

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from lseg_jax import losses, sharding

State = dict  # {"params", "batch_stats", "opt", "step"}
GradFn = Callable[[dict, dict, dict, jax.Array], tuple[dict, dict, dict]]


def init_state(params: dict, batch_stats: dict, tx: optax.GradientTransformation, mesh: Mesh) -> State:
  """The train state; the optimizer state is laid out like the parameters
  (moments) and replicated over the mesh where it is a scalar (counts)."""
  opt = jax.jit(tx.init)(params)
  everywhere = set(mesh.devices.flat)
  opt = jax.tree.map(lambda x: x if x.sharding.device_set == everywhere
                     else jax.device_put(x, sharding.replicated(mesh)), opt)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return {"params": params, "batch_stats": batch_stats, "opt": opt, "step": step}


def make_grad_fn(model, *, accum: int = 1, reduction: str = "pixels", replicas: int = 1) -> GradFn:
  """(params, batch_stats, batch, text_table) -> (grads, batch_stats, stats):
  the raw gradients of one step's loss (before weight decay), the BatchNorm
  statistics after its micro-batches, and summable statistics (loss,
  loss_sum, correct, valid)."""
  if reduction not in losses.REDUCTIONS:
    raise ValueError(f"loss_reduction={reduction!r} is not one of {losses.REDUCTIONS}")

  def micro_loss(params, batch_stats, mb, text_table, total_valid):
    text = text_table[mb["label_ids"]]  # [b, N, D]
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, mb["image"], text,
                                  mb["label_mask"], train=True, mutable=["batch_stats"])
    nll, valid, correct = losses.pixel_nll(logits, mb["mask"], mb["label_mask"])  # [b, H, W]
    if reduction == "pixels":
      loss = nll.sum() / jnp.maximum(total_valid, 1)
    else:
      loss = losses.replica_mean(nll, valid, replicas) / accum
    stats = {"loss": loss, "loss_sum": nll.sum(), "correct": correct.sum(), "valid": valid.sum()}
    return loss, (updates.get("batch_stats", batch_stats), stats)

  def grad_fn(params, batch_stats, batch, text_table):
    total_valid = (batch["mask"] != losses.IGNORE).sum()
    # Micro-batch i is rows i::accum of the batch: a reshape that keeps the
    # batch axis sharded. A Python loop, not lax.scan: XLA:CPU runs a scanned
    # body ~6x slower, and `accum` is small.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), batch)
    grads, sums = None, None
    for i in range(accum):
      mb = jax.tree.map(lambda x: x[:, i], micro)
      (_, (batch_stats, stats)), g = jax.value_and_grad(micro_loss, has_aux=True)(
          params, batch_stats, mb, text_table, total_valid)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    return grads, batch_stats, sums

  return grad_fn


def module_norms(tree: dict) -> dict[str, jax.Array]:
  """Global L2 norm of each top-level module ('backbone', 'fusion', ...)."""
  return {name: optax.tree.norm(sub) for name, sub in tree.items()}


def make_train_step(model, tx: optax.GradientTransformation, sched: optax.Schedule, *, accum: int = 1,
                    reduction: str = "pixels", replicas: int = 1) -> Callable[[State, dict, jax.Array],
                                                                              tuple[State, dict]]:
  """(state, batch, text_table) -> (state, measurements): one optimiser step
  (see the module docstring). Measurements: loss, pixel_acc, lr (the 1x
  group's), grad_norm (raw gradients, before weight decay), one
  grad_norm/<module> per top-level module, param_norm, update_norm."""
  grad_fn = make_grad_fn(model, accum=accum, reduction=reduction, replicas=replicas)

  def train_step(state: State, batch: dict, text_table: jax.Array) -> tuple[State, dict]:
    grads, batch_stats, sums = grad_fn(state["params"], state["batch_stats"], batch, text_table)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
                 "opt": opt, "step": state["step"] + 1}
    measurements = {"loss": sums["loss"], "pixel_acc": sums["correct"] / jnp.maximum(sums["valid"], 1),
                    "lr": sched(state["step"]), "grad_norm": optax.tree.norm(grads),
                    "param_norm": optax.tree.norm(state["params"]), "update_norm": optax.tree.norm(updates)}
    measurements |= {f"grad_norm/{k}": v for k, v in module_norms(grads).items()}
    return new_state, measurements

  return train_step


def momentum_buffers(opt_state) -> dict:
  """The SGD momentum buffers (torch's `momentum_buffer`, optax's
  `TraceState.trace`) of every group, merged into one params-shaped flat
  dict {path tuple: array}."""
  merged = {}
  for trace in optax.tree.get_all_with_path(opt_state, "trace"):
    flat = flax.traverse_util.flatten_dict(trace[1])
    merged |= {k: v for k, v in flat.items() if not isinstance(v, optax.MaskedNode)}
  return merged
