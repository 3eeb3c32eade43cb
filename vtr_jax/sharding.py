"""Device meshes, logical-axis rules, and the shardings of parameters, optimizer state and batches.

The mesh has three axes, any of which may have size 1:

  data    the batch is split across it (pure data parallelism);
  fsdp    the batch *and* each parameter's `embed` dimension are split across
          it (ZeRO-3 / FSDP: XLA gathers a layer's weights just before use);
  tensor  heads, MLP width and vocabulary are split across it (Megatron-style
          tensor parallelism).

Every parameter carries logical axis names (`vtr_jax.axes`), and
activations are constrained by logical names at the model's seams. Rules in
the config map each logical name to mesh axes:

    config.mesh.shape = (-1, 1, 1)     # (data, fsdp, tensor); one -1 takes the remaining devices
    config.mesh.rules = DEFAULT_RULES  # ((logical name, mesh axes), ...)

A dimension is split only when the product of its mesh axes divides it (the
longest dividing prefix of the axes is used, else it stays whole);
`replication_report` says how many parameter bytes that leaves replicated.

Shardings come from `jax.eval_shape`: no full array is ever made on one
device (`init_params` jits the initialiser with `out_shardings`). A jitted
function enters `activate(mesh, rules)` inside its body; under it the
model's activation constraints (`constrain`) apply, and per-sample work that
XLA's partitioner would otherwise gather (the reduction methods' top-k
selections, sorts and scatters; the scoring kernels) runs inside
`jax.shard_map` over the batch axes (`per_sample`), so each device selects
for its own samples and no score array crosses devices.

Multi-host: `initialize_distributed` (before any other JAX call), then each
process loads only its rows of every global batch (`process_rows`) and
`global_batch` assembles the sharded arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vtr_jax import axes as c

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# MaxText-style defaults: the residual stream stays whole on `tensor` (Megatron), the batch splits
# over data x fsdp, weights split `embed` over fsdp and their wide dimension over tensor.
DEFAULT_RULES = (
    # parameters
    (c.EMBED, ("fsdp",)),
    (c.MLP, ("tensor",)),
    (c.HEADS, ("tensor",)),
    (c.KV_HEADS, ("tensor",)),
    (c.VOCAB, ("tensor",)),
    (c.HEAD_DIM, ()),
    (c.NORM, ()),
    (c.POSITIONS, ()),
    (c.PATCH, ()),
    (c.CHANNELS, ()),
    # activations
    (c.ACT_BATCH, ("data", "fsdp")),
    (c.ACT_LENGTH, ()),
    (c.ACT_EMBED, ()),
    (c.ACT_HEADS, ("tensor",)),
    (c.ACT_VOCAB, ("tensor",)),
)


class ShardingError(ValueError):
  """A mesh, rule or batch that cannot be used (names the values involved)."""


# ---- rules and meshes -------------------------------------------------------------------------
def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """((name, None | 'axis' | ('axis', ...)), ...) -> ((name, ('axis', ...)), ...), validated."""
  out = []
  seen = set()
  for rule in rules:
    if len(rule) != 2:
      raise ShardingError(f"a rule is (logical name, mesh axes), got {rule!r}")
    name, axes = rule
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ShardingError(f"rule for {name!r} names mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    if name in seen:
      raise ShardingError(f"logical name {name!r} has two rules")
    seen.add(name)
    out.append((str(name), axes))
  return tuple(out)


def rules_from_config(config) -> Rules:
  """`config.mesh.rules` (DEFAULT_RULES when the config has no `mesh` block)."""
  mesh_cfg = config.get("mesh") if config is not None else None
  return normalize_rules(mesh_cfg.get("rules", DEFAULT_RULES) if mesh_cfg else DEFAULT_RULES)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) with at most one -1 resolved so that the product is num_devices."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ShardingError(f"mesh shape {shape} needs one size per axis {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ShardingError(f"mesh shape {shape}: sizes must be >= 1, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ShardingError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ShardingError(f"mesh shape {shape} needs {math.prod(shape)} devices, there are {num_devices}")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh of Auto axes over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  resolved = mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(config) -> Mesh:
  """`config.mesh.shape` over all devices ((-1, 1, 1): data parallel, when the config has no `mesh`)."""
  mesh_cfg = config.get("mesh") if config is not None else None
  return make_mesh(tuple(mesh_cfg.get("shape", (-1, 1, 1))) if mesh_cfg else (-1, 1, 1))


def abstract_mesh(shape: Sequence[int]) -> jax.sharding.AbstractMesh:
  """A device-less (data, fsdp, tensor) mesh, e.g. for ahead-of-time lowering (no -1 allowed)."""
  shape = tuple(int(s) for s in shape)
  mesh_shape(shape, math.prod(shape))
  return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec(names: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules) -> PartitionSpec:
  """The PartitionSpec of an array with logical axis `names` and `shape` on `mesh`.

  Each dimension takes the longest prefix of its rule's mesh axes whose sizes
  multiply to a divisor of the dimension (axes already used by an earlier
  dimension are skipped); names without a rule, or None, stay whole.
  """
  if len(names) != len(shape):
    raise ShardingError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    axes = [a for a in table.get(name, ()) if a not in used] if name is not None else []
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    axes = [a for a in axes if mesh.shape[a] > 1]
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


# ---- parameters and optimizer state ------------------------------------------------------------
def logical_names(boxed) -> Any:
  """The logical axis names of every leaf of a boxed (`nn.with_logical_partitioning`) tree.

  Leaves without names get all-None names. Returns a tree of tuples, shaped like `nn.unbox(boxed)`.
  """
  def names(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return tuple(leaf.names)
    return (None,) * len(leaf.shape)
  return jax.tree_util.tree_map(names, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_shardings(boxed, mesh, rules: Rules) -> Any:
  """NamedShardings for a boxed abstract tree (from `jax.eval_shape` of an initialiser)."""
  abstract = nn.unbox(boxed)
  names = logical_names(boxed)
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)  # noqa: E731
  return jax.tree_util.tree_map(lambda n, a: NamedSharding(mesh, spec(n, a.shape, mesh, rules)),
                                names, abstract, is_leaf=is_names)


def init_params(init_fn: Callable, mesh, rules: Rules, *args) -> tuple[Any, Any]:
  """Runs a (boxed) Flax initialiser straight into its shardings.

  Args:
    init_fn: e.g. `model.init`; returns a tree boxed with logical names.
    args: its arguments (small example inputs; replicated).
  Returns:
    (unboxed params, their NamedShardings). Each device only ever holds its shards.
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(boxed, mesh, rules)
  params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def like_params(tree_abstract, params_abstract, param_shardings, mesh) -> Any:
  """Shardings for a tree whose leaves mirror the parameters (optimizer moments, gradients).

  A leaf whose key path ends with a parameter's path and has its shape takes
  that parameter's sharding; every other leaf (step counts, scalars) is
  replicated.
  """
  by_path = {}
  for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(params_abstract),
                          jax.tree_util.tree_leaves(param_shardings)):
    by_path[tuple(path)] = (a.shape, s)
  lengths = sorted({len(p) for p in by_path}, reverse=True)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    path = tuple(path)
    for n in lengths:
      hit = by_path.get(path[-n:]) if len(path) >= n else None
      if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
        return hit[1]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, tree_abstract)


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
  """How the parameters spread over the mesh.

  Attributes:
    devices: mesh size.
    total_bytes: all parameters.
    per_device_bytes: parameter bytes one device holds.
    replicated_bytes: parameters held whole by every device.
    replicated: (path, shape, bytes) of those, largest first.
  """
  devices: int
  total_bytes: int
  per_device_bytes: int
  replicated_bytes: int
  replicated: tuple[tuple[str, tuple[int, ...], int], ...]

  @property
  def replicated_fraction(self) -> float:
    return self.replicated_bytes / max(self.total_bytes, 1)

  def summary(self, top: int = 5) -> str:
    mb = lambda n: f"{n / 2 ** 20:.2f} MiB"  # noqa: E731
    lines = [f"parameters {mb(self.total_bytes)} on {self.devices} devices: {mb(self.per_device_bytes)} per device "
             f"(ideal {mb(self.total_bytes / self.devices)}); replicated {mb(self.replicated_bytes)} "
             f"({100 * self.replicated_fraction:.1f}%)"]
    for path, shape, n in self.replicated[:top]:
      lines.append(f"  replicated {path} {shape}: {mb(n)}")
    return "\n".join(lines)


def replication_report(params_abstract, shardings) -> ReplicationReport:
  """Bytes per device and bytes left replicated, for abstract (or concrete) params and their shardings."""
  total = per_device = replicated_bytes = 0
  replicated = []
  devices = 1
  for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(params_abstract), jax.tree_util.tree_leaves(shardings)):
    n = math.prod(a.shape) * np.dtype(a.dtype).itemsize
    devices = math.prod(s.mesh.shape.values())
    split = math.prod(s.mesh.shape[ax] for entry in s.spec if entry is not None
                      for ax in ((entry,) if isinstance(entry, str) else entry))
    total += n
    per_device += n // split
    if split == 1 and devices > 1:
      replicated_bytes += n
      replicated.append((jax.tree_util.keystr(path), tuple(a.shape), n))
  replicated.sort(key=lambda r: -r[2])
  return ReplicationReport(devices, total, per_device, replicated_bytes, tuple(replicated))


# ---- activations -------------------------------------------------------------------------------
_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("vtr_jax_sharding_rules", default=())


@contextlib.contextmanager
def activate(mesh, rules: Rules) -> Iterator[None]:
  """Trace under `mesh` (a Mesh or AbstractMesh) and `rules`: enter it inside the function being jitted.

  Activation constraints (`constrain`), `per_sample` and the kernels'
  `shard_map`s follow them. Entered inside the traced function, the mesh and
  rules are part of that function, so jit's cache can never serve a trace
  made under other rules.
  """
  abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
  token = _RULES.set(normalize_rules(rules))
  try:
    with jax.sharding.use_abstract_mesh(abstract):
      yield
  finally:
    _RULES.reset(token)


def _auto_mesh():
  """The active abstract mesh and its axes still under XLA's control (not manual), or (None, ())."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, ()
  return mesh, tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op without an active mesh and rules."""
  rules = _RULES.get()
  mesh, auto = _auto_mesh()
  if not rules or mesh is None:
    return x
  table = tuple((n, tuple(a for a in axes if a in auto)) for n, axes in rules)
  return jax.lax.with_sharding_constraint(x, spec(names, x.shape, mesh, table))


def split_axes(name: str, size: int, *, exclude: Sequence[str] = ()) -> tuple[str, ...]:
  """Axes of the active mesh, still automatic, that split a dimension of logical `name` and `size`.

  Follows the active rules (`activate`); () without a mesh or rules, or when
  no axis divides the size. Inside a `shard_map`, its manual axes do not count.
  """
  mesh, auto = _auto_mesh()
  if mesh is None:
    return ()
  return _split(name, size, mesh, _RULES.get(), [a for a in auto if a not in exclude])


def _split(name: str, size: int, mesh, rules: Rules, allowed: Sequence[str]) -> tuple[str, ...]:
  table = tuple((n, tuple(a for a in axes if a in allowed)) for n, axes in rules)
  entry = spec((name,), (size,), mesh, table)[0]
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def per_sample(fn: Callable) -> Callable:
  """`fn` run by each device on its own samples: `jax.shard_map` over the active batch axes.

  Every array among the arguments and results must be batch-leading
  ([B, ...], the same B); other argument leaves (Python numbers, strings,
  None, objects) reach `fn` as they are, and non-array results come back as
  they are (they must not depend on array values). Nothing the function
  computes from its array arguments crosses devices, so XLA cannot gather a
  score array to rank it. Arrays `fn` closes over (a decoder layer's weights,
  in the LLM-stage hook) enter whole on the batch axes: XLA gathers their
  FSDP shards as it does for any layer; the `tensor` axis stays automatic.
  Without an active mesh and rules, or when B does not split, `fn` runs
  unchanged.
  """
  def run(*args, **kwargs):
    if _auto_mesh()[0] is None or not _RULES.get():
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]
    sizes = {x.shape[0] if x.ndim else None for x in arrays}
    if len(sizes) != 1 or None in sizes:
      raise ShardingError(f"per_sample needs batch-leading arrays of one batch size, got shapes "
                          f"{[tuple(x.shape) for x in arrays]}")
    axes = split_axes(c.ACT_BATCH, sizes.pop())
    if not axes:
      return fn(*args, **kwargs)
    results = {}

    def body(*local):
      it = iter(local)
      local_args, local_kwargs = jax.tree_util.tree_unflatten(treedef, [next(it) if a else x
                                                                        for x, a in zip(leaves, is_array)])
      out = fn(*local_args, **local_kwargs)
      out_leaves, results["treedef"] = jax.tree_util.tree_flatten(out)
      results["is_array"] = [isinstance(x, jax.Array) for x in out_leaves]
      results["static"] = [None if a else x for x, a in zip(out_leaves, results["is_array"])]
      out_arrays = tuple(x for x, a in zip(out_leaves, results["is_array"]) if a)
      bad = [tuple(x.shape) for x in out_arrays if not x.ndim or x.shape[0] != local[0].shape[0]]
      if bad:
        raise ShardingError(f"per_sample results must be batch-leading (local batch {local[0].shape[0]}), got {bad}")
      return out_arrays

    batch = PartitionSpec(axes)
    out_arrays = jax.shard_map(body, in_specs=(batch,) * len(arrays), out_specs=batch, axis_names=frozenset(axes),
                               check_vma=False)(*arrays)  # Pallas outputs carry no varying-axes types
    it = iter(out_arrays)
    merged = [next(it) if a else s for a, s in zip(results["is_array"], results["static"])]
    return jax.tree_util.tree_unflatten(results["treedef"], merged)

  return run


# ---- batches and hosts -------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, rules: Rules, batch_size: int) -> NamedSharding:
  """Sharding of a batch-leading array of `batch_size` rows: split over every batch axis.

  Raises unless the batch splits over all of them (a batch that replicates
  over `data` would repeat work on every data-parallel device).
  """
  axes = _split(c.ACT_BATCH, batch_size, mesh, rules, mesh.axis_names)
  wanted = [a for a in dict(rules).get(c.ACT_BATCH, ()) if mesh.shape[a] > 1]
  if set(axes) != set(wanted):
    need = math.prod(mesh.shape[a] for a in wanted)
    raise ShardingError(f"batch size {batch_size} must be divisible by {need}, the product of the batch mesh axes "
                        f"{ {a: mesh.shape[a] for a in wanted} }")
  return NamedSharding(mesh, PartitionSpec(axes or None))


def process_rows(sharding: NamedSharding, batch_size: int) -> range:
  """The rows of a global batch whose shards live on this process's devices (a contiguous range)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*index[0].indices(batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ShardingError(f"process {jax.process_index()} holds rows {sorted(rows)} of the batch, not one range; "
                        "build the mesh with `make_mesh` so each process owns consecutive devices")
  return range(lo, hi)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
  """This process's rows (`process_rows`) of each entry -> global arrays [batch_size, ...] split by `sharding`."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(sharding, value, (batch_size,) + value.shape[1:])
  return out


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put(tree, shardings) -> Any:
  """Arrays -> global arrays in `shardings`.

  Host arrays (the same on every process) are sliced, so each device
  receives only its shard; arrays already on devices are resharded.
  """
  def one(x, s):
    if isinstance(x, jax.Array):
      return jax.device_put(x, s)
    return jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index])
  return jax.tree_util.tree_map(one, tree, shardings)


def fetch(tree) -> Any:
  """Every leaf as a NumPy array on every process (gathers across processes when needed)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """`jax.distributed.initialize` from arguments or the environment; returns whether it ran.

  Arguments fall back to VTR_COORDINATOR, VTR_NUM_PROCESSES and
  VTR_PROCESS_ID. With none of them set, nothing happens unless the
  platform detects a cluster itself (Cloud TPU pod slices, SLURM, Open MPI):
  set VTR_DISTRIBUTED=1 to call `jax.distributed.initialize()` with no
  arguments there. On CPU, cross-process collectives use gloo. Must run
  before any other JAX call that touches devices.
  """
  coordinator = coordinator or os.environ.get("VTR_COORDINATOR") or None
  num_processes = num_processes or _env_int("VTR_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("VTR_PROCESS_ID")
  if coordinator is None and num_processes is None and process_id is None:
    if os.environ.get("VTR_DISTRIBUTED", "") not in ("1", "true"):
      return False
    jax.distributed.initialize()
    return True
  missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                            ("process_id", process_id)) if v is None]
  if missing:
    raise ShardingError(f"multi-process runs need coordinator, num_processes and process_id; missing {missing} "
                        f"(got coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id})")
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ShardingError(f"{name}={value!r} is not an integer") from None
