"""The mesh and the one table that maps logical axis names to mesh axes.

Models name parameter axes only logically (`embed`, `mlp`, `qkv`, `conv_in`,
`conv_out`, `vocab`; see `models/layers.py`). The config's `sharding_rules`
turns those names into mesh axes, for example FSDP + tensor parallelism:

  (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_in", "fsdp"),
   ("mlp", "tensor"), ("qkv", "tensor"), ("conv_out", "tensor"))

A dimension that the mesh axes do not divide (the 3 input channels of the
patch embedding, say) stays replicated, so any model runs on any mesh.

Activations are named the same way (`batch`, `length`, `embed`, `mlp`; see
`models/transformer.py`): inside `activation_layout` the same table pins them,
so the FSDP and tensor layouts of the step are declared rather than left to
GSPMD's propagation. A name without a rule, or whose mesh axes an earlier
name of the same array took (`embed` after `batch` under FSDP), replicates.
Parameters are pinned there too, where the layers use them (`param_at_use`).
Every jitted function that runs the model traces inside the layout
(`laid_out`): the training step, the evaluation steps.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import functools

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
Layout = tuple[Mesh, Rules]  # what activation_layout takes


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from (name, size) pairs; one size may be -1 (all remaining devices).
  Without -1 the mesh may use fewer than all devices (the first ones).

  The device order is `jax.make_mesh`'s: on GPUs and TPUs it follows the
  interconnect (the last axes within a host or ICI ring), on CPUs it is the
  plain order. Axis types are Auto (GSPMD): jax.make_mesh defaults to
  Explicit, with which plain sharded matmuls fail.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {list(axes)} does not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) > len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices[:int(np.prod(sizes))])


def _axis_names(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis name or several) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _entry(names: tuple[str, ...]):
  """A PartitionSpec entry of mesh axis names: None, one name, or the tuple."""
  return names[0] if len(names) == 1 else (names or None)


def _axis_size(mesh: Mesh, axes) -> int:
  """How many ways a PartitionSpec entry splits its dimension."""
  return int(np.prod([mesh.shape[a] for a in _axis_names(axes)]))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops the mesh axes of any dimension they do not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    size = _axis_size(mesh, axes)
    out.append(axes if size > 1 and dim % size == 0 else None)
  return P(*out)


def mesh_rules(mesh: Mesh, rules: Rules) -> Rules:
  """`rules` restricted to the axes `mesh` has: one rule table serves meshes
  with or without, say, a `tensor` axis."""
  keep = lambda axes: _entry(tuple(a for a in _axis_names(axes) if a in mesh.axis_names))
  return tuple((logical, keep(axes)) for logical, axes in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves may carry logical axis names
  (the output of `jax.eval_shape(model.init, ...)`); unnamed leaves replicate."""
  specs = nn.get_partition_spec(boxed_tree)
  specs = nn.logical_to_mesh(specs, mesh_rules(mesh, rules))
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_tree))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)),
                      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batch arrays of any rank: the leading axis over the mesh axes that
  `batch` maps to, the others replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), mesh_rules(mesh, rules)))


def batch_devices(mesh: Mesh, rules: Rules) -> int:
  """How many ways `batch_sharding` splits the batch axis."""
  return _axis_size(mesh, batch_sharding(mesh, rules).spec[0])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within it (while a function is traced), `nn.with_logical_constraint`
  pins activations and `param_at_use` parameters to `mesh` by `rules`;
  outside it both are no-ops."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules(mesh, rules)):
    yield


def laid_out(fn: Callable, layout: Layout | None) -> Callable:
  """`fn` traced inside `activation_layout(*layout)`; `fn` itself for None.
  What every jitted function that runs the model on a mesh wraps itself in."""
  if layout is None:
    return fn

  @functools.wraps(fn)
  def traced_in_layout(*args, **kwargs):
    with activation_layout(*layout):
      return fn(*args, **kwargs)

  return traced_in_layout


def param_at_use(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Parameter `x` (logical axis names `names`) as the layer that reads it
  uses it: inside `activation_layout`, constrained to its rule-table layout
  minus the mesh axes the batch is split over; outside it, `x` unchanged.

  That is FSDP's semantics spelt out: a kernel sharded over the batch's axes
  (`fsdp`) is all-gathered before its matmul and its gradient reduce-scattered
  after, while the axes the batch does not use (`tensor`) stay split. Left
  implicit, XLA's SPMD partitioner (jax 0.10.2, Shardy) chooses for itself,
  and on a data x fsdp x tensor mesh it chose wrong: the backward of
  conv(conv(x)) permuted batch shards and never permuted them back, so 104 of
  the tiny model's 130 gradients were off by up to 99% with a correct loss
  (tests/test_xla_partitioner_canary.py holds the repro; tests/test_mesh_table.py
  the one-device equality this constraint restores on every mesh)."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  batch = set(_axis_names(next((axes for name, axes in rules if name == "batch"), None)))
  spec = P(*(_entry(tuple(a for a in _axis_names(axes) if a not in batch))
             for axes in nn.logical_to_mesh_axes(names, rules)))
  return jax.lax.with_sharding_constraint(x, _fit(spec, x.shape, mesh))


MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def compiled_memory_gib(compiled) -> dict[str, float] | None:
  """Per-device memory of a compiled step from XLA's buffer assignment, GiB:
  the MEMORY_FIELDS and `total` = argument + output - alias (donated) + temp
  + code, what must fit on one device. None where the backend reports nothing."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {f: getattr(stats, f"{f}_size_in_bytes") / 2**30 for f in MEMORY_FIELDS}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return {k: round(v, 3) for k, v in out.items()}
