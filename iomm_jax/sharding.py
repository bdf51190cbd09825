"""Device meshes and parameter / batch shardings from ``config.sharding``.

The mesh has three axes, ``("data", "fsdp", "tensor")``, sized by ``config.sharding.mesh`` (one
-1 takes the remaining devices). Parameters carry logical axis names (``models/layers.py``);
``config.sharding.logical_axis_rules`` maps them onto mesh axes, as in MaxText:

  * parameters and optimiser state are created already sharded: ``jax.jit`` of the initialiser
    with ``out_shardings`` read off the boxed (``nn.LogicallyPartitioned``) abstract tree, so no
    unsharded copy is ever materialised on one device;
  * frozen parameters (MLLM, codec) are placed by the same rules, without optimiser state;
  * the batch is split over ``("data", "fsdp")`` on its leading axis; each process hands over its
    own rows (``jax.make_array_from_process_local_data``);
  * activations are constrained at block boundaries (``layers.with_logical_constraint``) where
    a jitted step built by ``jit_step`` (``with_rules``) binds the mesh and the rules;
  * checkpoints restore straight into the shards of the current mesh, whatever mesh saved them
    (``abstract_target``; ``placing_on`` for restores made deep inside other code).

A mesh axis whose size does not divide a dimension leaves that dimension replicated (e.g. a
vocabulary of 259 ids over tensor=2), so every rule table works on every model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iomm_jax.configs.mesh import (  # noqa: F401  (re-exported: the mesh vocabulary)
  BATCH_AXES,
  MESH_AXES,
  Rules,
  axis_rules,
  batch_shards,
  check_batch,
  mesh_shape,
)

_PLACEMENT: list[tuple[Mesh, Rules]] = []  # stack of ``placing_on`` contexts (innermost last)


# ----------------------------------------------------------------------------- mesh


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh of ``config.sharding.mesh`` over ``devices`` (default:
  all devices of all processes), with Auto (GSPMD) axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config.sharding.mesh, len(devices))
  return jax.make_mesh(
    shape,
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def sampling_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A data-parallel (n, 1, 1) mesh over ``devices`` (default: all devices of all processes),
  for sampling: parameters replicated, each device generating its own rows
  (``generate.generate(..., mesh=...)``)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices).reshape(len(devices), 1, 1), MESH_AXES)


def single_device_mesh(device: Any | None = None) -> Mesh:
  """A (1, 1, 1) mesh on ``device`` (default: this process's first device)."""
  device = jax.local_devices()[0] if device is None else device
  return Mesh(np.array([device]).reshape(1, 1, 1), MESH_AXES)


# ----------------------------------------------------------------------------- logical -> mesh


def mesh_axes_for(
  shape: Sequence[int], names: Sequence[str | None], rules: Rules, sizes: dict[str, int]
) -> PartitionSpec:
  """Mesh axes of an array of ``shape`` with logical ``names`` under ``rules``
  (``nn.logical_to_mesh_axes``), leaving a dimension replicated where its mesh axes'
  total size (from ``sizes``, mesh axis -> size) does not divide it."""
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    group = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(sizes[a] for a in group if a is not None)
    out.append(axes if axes is not None and dim % n == 0 else None)
  return PartitionSpec(*out)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_shardings(boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings of a boxed (possibly abstract) tree, in the tree's unboxed structure.

  A ``nn.LogicallyPartitioned`` leaf is placed by its logical names (``nn.get_partition_spec``
  + ``rules``); a plain leaf (a step counter, an optimiser count) is replicated.
  """
  sizes = dict(mesh.shape)
  specs = nn.get_partition_spec(boxed)

  def one(leaf, spec):
    if not _is_box(leaf):
      return NamedSharding(mesh, PartitionSpec())
    if not hasattr(leaf.value, "shape"):  # a leafless placeholder (optax's MaskedNode)
      return leaf.value
    return NamedSharding(mesh, mesh_axes_for(leaf.value.shape, tuple(spec), rules, sizes))

  return jax.tree_util.tree_map(one, boxed, specs, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading axis split over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def unbox(tree: Any) -> Any:
  """The values of a boxed tree, without the sharding constraint ``nn.meta.unbox`` applies
  under a mesh (so it also works on abstract trees and outside ``jit``)."""
  return jax.tree_util.tree_map(
    lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
  )


def abstract_target(abstract: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` s with concrete NamedShardings: an Orbax restore target that
  lands each array directly in its shards on the current mesh."""
  abstract = unbox(abstract)
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def place(tree: Any, shardings: Any) -> Any:
  """Puts a tree of host-complete arrays (every process holds the whole value, e.g. just loaded
  from a file) into ``shardings``; an array already placed so is left as it is."""

  def one(x, s):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    host = to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree_util.tree_map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of ``x`` as numpy on every process, also where its shards live on devices
  of other processes (gathered then)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- batches


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, global_size: int) -> dict[str, Any]:
  """This process's rows of a batch -> global arrays split over ("data", "fsdp").

  Each process passes its own ``global_size / process_count`` rows (the input pipeline reads a
  disjoint slice per process).
  """
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
    for k, v in batch.items()
  }


# ----------------------------------------------------------------------------- rules in scope


@contextlib.contextmanager
def placing_on(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within it, parameters restored from checkpoints (``context.restore_params``) land directly
  in their shards on ``mesh``, placed by their logical axes under ``rules``."""
  _PLACEMENT.append((mesh, rules))
  try:
    yield
  finally:
    _PLACEMENT.pop()


def placement() -> tuple[Mesh, Rules] | None:
  """The innermost ``placing_on`` (mesh, rules), or None."""
  return _PLACEMENT[-1] if _PLACEMENT else None


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
  """``fn`` traced with ``mesh`` (abstract) and ``rules`` bound, so that the activation
  constraints inside it apply wherever the jitted function is called from."""

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def jit_step(
  step: Callable, mesh: Mesh, rules: Rules, state_shardings: Any, frozen_shardings: Any
) -> Callable:
  """``jax.jit`` of ``step(state, batch, frozen, rng) -> (state, metrics)`` with explicit in/out
  shardings (state sharded per rules and donated, batch split over data x fsdp, frozen params
  sharded, rng and metrics replicated)."""
  rep = replicated(mesh)
  return jax.jit(
    with_rules(step, mesh, rules),
    in_shardings=(state_shardings, batch_sharding(mesh), frozen_shardings, rep),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )


def describe(shardings: Any) -> dict[str, list[Any]]:
  """'path/to/leaf' -> its PartitionSpec as a list (None, a mesh axis, or a list of mesh axes per
  dimension), for logs and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  key = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  entry = lambda a: list(a) if isinstance(a, tuple) else a
  spec = lambda s: getattr(s, "spec", ())  # a single-device sharding: nothing split
  return {"/".join(key(k) for k in path): [entry(a) for a in spec(s)] for path, s in flat}
