"""The mesh vocabulary of ``config.sharding``, without JAX: axis names, the concrete mesh shape
on a device count, the logical-axis rule table and the batch-divisibility check.

``iomm_jax.sharding`` builds meshes and shardings from these (and re-exports them); config
validation (``configs.loading``) uses them before JAX is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) axis of inputs is split over these

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Concrete (data, fsdp, tensor) sizes of ``config.sharding.mesh`` on ``num_devices``.

  At most one entry may be -1 (the remaining devices); the product must equal the device count.
  Errors name ``config.sharding.mesh`` and the device count.
  """
  sizes = tuple(int(s) for s in mesh)
  where = f"config.sharding.mesh={tuple(mesh)}"
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"{where} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{where}: sizes must be positive, with at most one -1 (the rest)")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ValueError(
      f"{where} needs a multiple of {fixed} devices; there are {num_devices} devices"
    )
  if -1 in sizes:
    sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
  elif fixed != num_devices:
    raise ValueError(
      f"{where} uses {fixed} devices; there are {num_devices} devices (use -1 for 'the rest')"
    )
  return sizes  # type: ignore[return-value]


def axis_rules(config: ml_collections.ConfigDict) -> Rules:
  """``config.sharding.logical_axis_rules`` as hashable (logical, mesh axes) pairs.

  Lists (a config read back from JSON) become tuples; an unknown mesh axis is an error.
  """
  out = []
  for name, axes in config.sharding.logical_axis_rules:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in axes if isinstance(axes, tuple) else (axes,):
      if a is not None and a not in MESH_AXES:
        raise ValueError(
          f"config.sharding.logical_axis_rules maps {name!r} to unknown mesh axis {a!r}; "
          f"mesh axes are {MESH_AXES}"
        )
    out.append((str(name), axes))
  return tuple(out)


def batch_shards(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways the batch is split: the data x fsdp size of the mesh."""
  data, fsdp, _ = mesh_shape(config.sharding.mesh, num_devices)
  return data * fsdp


def check_batch(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1):
  """The global batch must divide over the batch shards (data x fsdp) and the processes, and
  every process must own whole batch shards; errors name the keys involved."""
  b = config.train.batch_size
  data, fsdp, tensor = mesh_shape(config.sharding.mesh, num_devices)
  where = (
    f"config.sharding.mesh={tuple(config.sharding.mesh)} = (data {data}, fsdp {fsdp}, "
    f"tensor {tensor}) on {num_devices} devices"
  )
  if b <= 0 or b % (data * fsdp):
    raise ValueError(
      f"config.train.batch_size={b} does not divide over {data * fsdp} devices "
      f"(the data x fsdp batch shards of {where})"
    )
  if (data * fsdp) % num_processes:
    raise ValueError(
      f"{where}: the batch is split {data * fsdp} ways (data x fsdp), not a multiple of the "
      f"{num_processes} processes, so processes cannot read disjoint batch rows"
    )
