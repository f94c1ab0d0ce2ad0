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

How the micro-batches run (`ACCUM_IMPLS`): "loop" unrolls them in the
program (XLA:CPU runs it fastest: a scanned body ran ~6x slower there),
"scan" runs one compiled body under `lax.scan` (compile time and code size
independent of `accum`, what accelerators want), "auto" picks loop on CPU
and scan elsewhere. Both give the same update and BatchNorm statistics.

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
ACCUM_IMPLS = ("auto", "loop", "scan")


def init_state(params: dict, batch_stats: dict, tx: optax.GradientTransformation, mesh: Mesh) -> State:
  """The train state; the optimizer state is laid out like the parameters
  (moments) and replicated over the mesh where it is a scalar (counts)."""
  opt = jax.jit(tx.init)(params)
  everywhere = set(mesh.devices.flat)
  opt = jax.tree.map(lambda x: x if x.sharding.device_set == everywhere
                     else jax.device_put(x, sharding.replicated(mesh)), opt)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return {"params": params, "batch_stats": batch_stats, "opt": opt, "step": step}


def resolve_accum_impl(accum_impl: str) -> str:
  """"loop" or "scan": "auto" is loop on CPU (measured faster there), scan on accelerators."""
  if accum_impl not in ACCUM_IMPLS:
    raise ValueError(f"accum_impl={accum_impl!r} is not one of {ACCUM_IMPLS}")
  if accum_impl == "auto":
    return "loop" if jax.default_backend() == "cpu" else "scan"
  return accum_impl


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def make_grad_fn(model, *, accum: int = 1, reduction: str = "pixels", replicas: int = 1,
                 accum_impl: str = "auto") -> GradFn:
  """(params, batch_stats, batch, text_table) -> (grads, batch_stats, stats):
  the raw gradients of one step's loss (before weight decay), the BatchNorm
  statistics after its micro-batches, and summable statistics (loss,
  loss_sum, correct, valid)."""
  if reduction not in losses.REDUCTIONS:
    raise ValueError(f"loss_reduction={reduction!r} is not one of {losses.REDUCTIONS}")
  impl = resolve_accum_impl(accum_impl)

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

  micro_grad = jax.value_and_grad(micro_loss, has_aux=True)

  def accumulate(carry, mb, params, text_table, total_valid):
    """One micro-batch: (grads, batch_stats, sums) -> the same with its share added."""
    grads, batch_stats, sums = carry
    (_, (batch_stats, stats)), g = micro_grad(params, batch_stats, mb, text_table, total_valid)
    return _tree_add(grads, g), batch_stats, _tree_add(sums, stats)

  def grad_fn(params, batch_stats, batch, text_table):
    total_valid = (batch["mask"] != losses.IGNORE).sum()
    # Micro-batch i is rows i::accum of the batch: a reshape that keeps the
    # batch axis sharded. [accum, B / accum, ...]
    micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(micro_grad, params, batch_stats, first, text_table, total_valid)
    (_, (_, stat_shapes)), grad_shapes = shapes
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    carry = (zeros(grad_shapes), batch_stats, zeros(stat_shapes))
    step = lambda c, mb: accumulate(c, mb, params, text_table, total_valid)
    if impl == "scan":
      carry, _ = jax.lax.scan(lambda c, mb: (step(c, mb), None), carry, micro)
    else:
      for i in range(accum):
        carry = step(carry, jax.tree.map(lambda x: x[i], micro))
    return carry

  return grad_fn


def module_norms(tree: dict) -> dict[str, jax.Array]:
  """Global L2 norm of each top-level module ('backbone', 'fusion', ...)."""
  return {name: optax.tree.norm(sub) for name, sub in tree.items()}


def make_train_step(model, tx: optax.GradientTransformation, sched: optax.Schedule, *, accum: int = 1,
                    reduction: str = "pixels", replicas: int = 1, accum_impl: str = "auto",
                    activations: sharding.Layout | None = None) -> Callable[[State, dict, jax.Array],
                                                                            tuple[State, dict]]:
  """(state, batch, text_table) -> (state, measurements): one optimiser step
  (see the module docstring). Measurements: loss, pixel_acc, lr (the 1x
  group's), grad_norm (raw gradients, before weight decay), one
  grad_norm/<module> per top-level module, param_norm, update_norm.

  `activations` = (mesh, rules) traces the step inside
  `sharding.activation_layout` (`sharding.laid_out`): the model's logical
  activation names and its parameters at their use pin their sharding, which
  a multi-device mesh needs (see `sharding.param_at_use`); None leaves the
  layout to XLA (one device)."""
  grad_fn = make_grad_fn(model, accum=accum, reduction=reduction, replicas=replicas, accum_impl=accum_impl)

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

  return sharding.laid_out(train_step, activations)


def momentum_buffers(opt_state) -> dict:
  """The SGD momentum buffers (torch's `momentum_buffer`, optax's
  `TraceState.trace`) of every group, merged into one params-shaped flat
  dict {path tuple: array}."""
  merged = {}
  for trace in optax.tree.get_all_with_path(opt_state, "trace"):
    flat = flax.traverse_util.flatten_dict(trace[1])
    merged |= {k: v for k, v in flat.items() if not isinstance(v, optax.MaskedNode)}
  return merged
