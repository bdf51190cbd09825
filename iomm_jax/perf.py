"""Throughput accounting: the FLOPs of a compiled step and its model FLOP utilisation (MFU).

``step_flops`` reads XLA's cost analysis of the compiled step. Under SPMD the compiled module is
the per-device program, so its count is FLOPs per device per step (on one device, the step's).
The count is what XLA will execute: recomputed blocks (``model.remat``) count again, so with
remat it is closer to "hardware" than to "model" FLOPs, and the frozen MLLM's forward (and its
backward to the adapter's queries) counts like any other work of the step.

MFU = achieved TFLOP/s per device / the device's dense bf16 peak: ``config.train.peak_tflops``
when set, else ``PEAK_BF16_TFLOPS`` by ``jax.Device.device_kind`` (vendor datasheet figures,
dense, no sparsity), else unknown (no MFU is logged).
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak TFLOP/s per device (one GPU, one TPU chip), from the vendors' datasheets.
# Keys are matched case-insensitively as substrings of ``device_kind``; the first match wins, so
# more specific names come first. docs/PERF.md shows the same table.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
  ("H100 PCIe", 756.0),
  ("H100", 989.0),  # SXM / NVL / "H100 80GB HBM3"
  ("H200", 989.0),
  ("H20", 148.0),
  ("GH200", 989.0),
  ("B200", 2250.0),
  ("A100", 312.0),
  ("A10G", 125.0),
  ("L40S", 362.0),
  ("L4", 121.0),
  ("RTX 4090", 165.0),
  ("TPU v6", 918.0),  # Trillium (v6e)
  ("TPU v5p", 459.0),
  ("TPU v5 lite", 197.0),  # v5e
  ("TPU v5e", 197.0),
  ("TPU v4", 275.0),
  ("TPU v3", 123.0),
)


def peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
  """The per-device bf16 peak: ``configured`` if > 0, else the table's entry for
  ``device_kind``, else None (a CPU, or a card the table does not know)."""
  if configured > 0:
    return float(configured)
  kind = device_kind.lower()
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind:
      return tflops
  return None


def step_flops(jitted: Any, *args: Any) -> float | None:
  """FLOPs per device of one call of ``jitted(*args)``: XLA's cost analysis of the compiled
  executable (the same compilation the call uses, from JAX's cache once it has run), or None
  where the backend gives no count."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # a backend without cost analysis must not stop training
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return flops if flops > 0 else None


def throughput(
  steps_per_s: float, batch: int, flops: float | None, peak: float | None
) -> dict[str, float]:
  """samples/s (global), TFLOP/s per device and MFU (fraction of ``peak``) at ``steps_per_s``;
  the FLOP figures only where ``flops`` (per device per step) is known, MFU where ``peak`` is."""
  out = {"samples_per_s": steps_per_s * batch}
  if flops is not None:
    tflops = steps_per_s * flops / 1e12
    out["tflops_per_device"] = tflops
    if peak:
      out["mfu"] = tflops / peak
  return out
