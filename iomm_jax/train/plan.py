"""Compile before you run: the memory plan of a generator stage's train step on a mesh.

``plan(config)`` builds the real stage-1/2 train step (``generator.make_step``, jitted by
``sharding.jit_step`` with the in/out shardings the stage loop uses) from abstract shapes only:
``jax.eval_shape`` of the trainable state and of the frozen MLLM / codec, ``ShapeDtypeStruct``
batches split over ``("data", "fsdp")``; no weights, tokenizer files or data are read. It lowers
and compiles the step for ``config.sharding.mesh`` on whatever devices this process has (fake CPU
devices: ``iomm-plan`` starts JAX with as many as the mesh needs) and reports

  * parameter counts (trainable: adapter, connector, generator; frozen: MLLM, codec; with LoRA
    (``config.model.lora``) the generator's adapters train and its base weights count as frozen,
    so the optimiser state and EMA hold the adapters only: ``params["lora"]``);
  * per-device bytes of the parameters, EMA, optimiser state, frozen weights and batch, from the
    shardings (exact: each leaf's shard shape x its itemsize);
  * XLA's ``memory_analysis()`` of the compiled step (arguments, outputs, aliased (donated)
    bytes, temporaries, generated code) and their total per device, against a budget.

The temporaries are those of the backend that compiled the step. On fake CPU devices that is XLA's
CPU backend, whose fusion, layouts and attention (no flash attention; bf16 matmuls may be
upcast) differ from GPU/TPU: a planning figure, not a measurement of the accelerator.

The condition length and vocabulary come from the tokenizer a run would use: the shapes-world
sentencepiece tokenizer is trained here (as stage 0 does, well under a second); an off-the-shelf
MLLM's tokenizer ships with its imported weights, so for those the vocabulary and image token id
are the variant's and the auxiliary prompt's length is estimated (``AUX_TOKENS_PER_WORD``); a few
tokens either way change the activations by under 1 %.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iomm_jax import sharding
from iomm_jax.assembly import context, workdirs
from iomm_jax.configs import loading, specs
from iomm_jax.data import pipeline
from iomm_jax.models import iomm
from iomm_jax.models import mllm as mllm_lib
from iomm_jax.models import mmdit as mmdit_lib
from iomm_jax.train import generator, loop

GIB = 2**30
RNG_BYTES = 8  # a threefry key (2 x uint32), replicated
# MLLM variants whose tokenizer comes with imported weights (not trained by stage 0).
OFF_THE_SHELF_MLLMS = ("internvl3_2b",)
AUX_TOKENS_PER_WORD = 1.2  # estimate for a BPE tokenizer on plain English (+ BOS and the colon)
CPU_NOTE = (
  "temporaries are XLA CPU-backend figures (fake devices): GPU/TPU fusion, layouts and "
  "attention kernels differ; treat them as an estimate"
)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """What the step's shapes need from the tokenizer."""

  vocab_size: int
  image_token_id: int
  cond_len: int
  null_ids: np.ndarray  # [cond_len] the null (CFG) condition
  null_valid: np.ndarray  # [cond_len] bool
  exact: bool  # False: cond_len estimated (no tokenizer at hand)


def token_layout(config: ml_collections.ConfigDict) -> TokenLayout:
  """The vocabulary, image token id and condition length a run of ``config`` would have."""
  m = config.model
  mcfg = mllm_lib.get_mllm_config(m.mllm)
  if m.mllm in OFF_THE_SHELF_MLLMS:
    aux = math.ceil(AUX_TOKENS_PER_WORD * len(m.aux_prompt.split())) + 1
    cond_len = pipeline.condition_length(aux, mcfg.num_image_tokens, m.max_text_len)
    null_ids = np.zeros((cond_len,), np.int32)
    null_valid = np.arange(cond_len) < 1
    return TokenLayout(
      mcfg.text.vocab_size, mcfg.image_token_id, cond_len, null_ids, null_valid, False
    )
  tokenizer = context.train_tokenizer(config, "")
  conditioner = pipeline.Conditioner(tokenizer, mcfg.num_image_tokens, m.aux_prompt, m.max_text_len)
  null_ids, null_valid = conditioner.null_condition()
  return TokenLayout(
    tokenizer.vocab_size,
    tokenizer.img_context_id,
    conditioner.cond_len,
    null_ids,
    null_valid,
    True,
  )


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` s (its shard of each)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def resident_bytes(state: Any, batch: Any, frozen: Any) -> int:
  """Per-device bytes of the step's inputs: state, batch, frozen weights and the rng key."""
  return per_device_bytes((state, batch, frozen)) + RNG_BYTES


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _sharded(tree: Any, shard: Any) -> Any:
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard), tree
  )


def plan(
  config: ml_collections.ConfigDict, budget_gib: float = 80.0, compile: bool = True
) -> dict[str, Any]:
  """Lowers and compiles ``config``'s generator train step on its mesh; returns the report
  (see the module docstring). ``config.sharding.mesh`` must be explicit (no -1) and this
  process must have at least that many devices. ``compile=False``: only the byte counts of the
  shardings (seconds); the XLA figures and the verdict are then None."""
  mesh_sizes = tuple(int(s) for s in config.sharding.mesh)
  if any(s <= 0 for s in mesh_sizes):
    raise ValueError(f"config.sharding.mesh={mesh_sizes}: planning needs explicit positive sizes")
  n = math.prod(mesh_sizes)
  if jax.device_count() < n:
    raise ValueError(
      f"the mesh {mesh_sizes} needs {n} devices; this process has {jax.device_count()} "
      "(iomm-plan starts JAX with enough fake CPU devices)"
    )
  if config.stage not in ("pretrain", "finetune"):
    raise ValueError(f"config.stage={config.stage!r}: planning covers 'pretrain' and 'finetune'")
  loading.validate(config, n, require_inputs=False)
  layout = token_layout(config)
  model = iomm.build(specs.from_config(config).model, layout.vocab_size, layout.image_token_id)
  mesh = sharding.make_mesh(config, jax.devices()[:n])
  rules = sharding.axis_rules(config)

  optimizer, step = generator.make_step(config, model, layout.null_ids, layout.null_valid)
  init = generator.init_fn(model, config, layout.cond_len)
  boxed_state, state_sh = loop.abstract_state(
    init, optimizer, mesh, rules, workdirs.keeps_ema(config)
  )
  frozen_sh = generator.frozen_shardings(model, mesh, rules)
  state = sharding.abstract_target(boxed_state, state_sh)
  frozen = generator.abstract_frozen(model, frozen_sh)
  abstract_batch = generator.abstract_batch(model, config.train.batch_size, layout.cond_len)
  batch = _sharded(abstract_batch, sharding.batch_sharding(mesh))
  rng = _sharded(jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated(mesh))

  xla, total, seconds = None, None, None
  if compile:
    jitted = sharding.jit_step(step, mesh, rules, state_sh, frozen_sh)
    xla, seconds = _compile(jitted, (state, batch, frozen, rng))
    # Live at once: everything resident (the state, batch and all frozen weights, also those the
    # step never reads and XLA prunes from its arguments, e.g. the MLLM's lm_head and the VAE
    # decoder), the outputs that do not reuse a donated argument buffer, temporaries and code.
    resident = max(xla["argument"], resident_bytes(state, batch, frozen))
    total = resident + xla["output"] - xla["alias"] + xla["temp"] + xla["generated_code"]
  data, fsdp, tensor = mesh_sizes
  bytes_ = {
    "params": per_device_bytes(state.params),
    "ema": per_device_bytes(state.ema),  # 0 without an EMA copy (train.ema_decay = 0)
    "opt_state": per_device_bytes(state.opt_state),
    "frozen": per_device_bytes(frozen),
    "batch": per_device_bytes(batch),
  }
  bytes_["state_and_inputs"] = resident_bytes(state, batch, frozen)
  notes = [CPU_NOTE] if compile and jax.devices()[0].platform == "cpu" else []
  if not layout.exact:
    notes.append(
      f"condition length {layout.cond_len} estimated (the tokenizer of config.model.mllm="
      f"{config.model.mllm!r} ships with its weights, which planning does not read)"
    )
  return {
    "stage": config.stage,
    "generator": config.model.generator,
    "mllm": config.model.mllm,
    "image_size": config.model.image_size,
    "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
    "devices": n,
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "batch": config.train.batch_size,
    "batch_per_shard": config.train.batch_size // (data * fsdp),
    "grad_accum": config.train.grad_accum,
    "micro_batch_per_shard": config.train.batch_size // (data * fsdp) // config.train.grad_accum,
    "cond_len": layout.cond_len,
    "remat": config.model.remat,
    "attention": config.model.attention,
    "optimizer": config.optim.name,
    "params": {
      "trainable": {k: _count(v) for k, v in state.params.items()},
      "trainable_total": _count(state.params),
      "frozen": {k: _count(v) for k, v in frozen.items()},
      "frozen_total": _count(frozen),
      "lora": _lora_report(model, state.params),
    },
    "bytes_per_device": bytes_,
    "xla": xla,
    "total_per_device": total,
    "budget_bytes": int(budget_gib * GIB),
    "fits": None if total is None else total <= budget_gib * GIB,
    "compile_s": seconds,
    "notes": notes,
  }


def _lora_report(model: iomm.IOMM, params: Any) -> dict[str, Any] | None:
  """The generator's LoRA settings and its count of adapter parameters (None without LoRA)."""
  lora = model.generator.lora
  if lora is None:
    return None
  flat = jax.tree_util.tree_flatten_with_path(params["generator"])[0]
  adapters = sum(math.prod(x.shape) for path, x in flat if path[-1].key in mmdit_lib.LORA_LEAVES)
  return {
    "rank": lora.rank,
    "alpha": lora.alpha or lora.rank,
    "targets": list(lora.targets),
    "trainable": list(lora.trainable),
    "adapter_params": adapters,
  }


def _compile(jitted: Any, args: tuple) -> tuple[dict[str, int], dict[str, float]]:
  """XLA's memory analysis of ``jitted`` compiled for ``args``, and the seconds it took."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  t2 = time.perf_counter()
  xla = {
    "argument": int(mem.argument_size_in_bytes),
    "output": int(mem.output_size_in_bytes),
    "alias": int(mem.alias_size_in_bytes),
    "temp": int(mem.temp_size_in_bytes),
    "generated_code": int(mem.generated_code_size_in_bytes),
  }
  return xla, {"lower": round(t1 - t0, 2), "compile": round(t2 - t1, 2)}


def _gib(b: int) -> str:
  return f"{b / GIB:9.3f}"


def _lora_lines(lora: dict[str, Any] | None) -> list[str]:
  """The report's LoRA line (none without LoRA)."""
  if lora is None:
    return []
  full = f", in full: {', '.join(lora['trainable'])}" if lora["trainable"] else ""
  return [
    f"LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {', '.join(lora['targets'])}: "
    f"{lora['adapter_params']:,} adapter parameters train{full}; the generator's other "
    "weights are frozen (no gradient, optimizer state or EMA)"
  ]


def format_report(r: dict[str, Any]) -> str:
  """The report as a short human-readable table (GiB per device)."""
  m, p, b, x = r["mesh"], r["params"], r["bytes_per_device"], r["xla"]
  budget = r["budget_bytes"]
  lines = [
    f"stage {r['stage']}: generator {r['generator']}, MLLM {r['mllm']}, {r['image_size']} px, "
    f"condition {r['cond_len']} tokens, optimizer {r['optimizer']}, remat {r['remat']}, "
    f"attention {r['attention']}",
    f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({r['devices']} "
    f"{r['platform']} devices, jax {r['jax']}); global batch {r['batch']} "
    f"({r['batch_per_shard']} per data x fsdp shard)"
    + (
      f", {r['grad_accum']} micro-batches of {r['micro_batch_per_shard']} per shard"
      if r["grad_accum"] > 1
      else ""
    ),
    "parameters: trainable {:,} ({}), frozen {:,} ({})".format(
      p["trainable_total"],
      ", ".join(f"{k} {v:,}" for k, v in p["trainable"].items()),
      p["frozen_total"],
      ", ".join(f"{k} {v:,}" for k, v in p["frozen"].items()),
    ),
    *_lora_lines(p["lora"]),
    "",
    "per device                         GiB",
    f"  parameters (trainable)     {_gib(b['params'])}",
    f"  EMA                        {_gib(b['ema'])}",
    f"  optimizer state            {_gib(b['opt_state'])}",
    f"  frozen weights             {_gib(b['frozen'])}",
    f"  batch                      {_gib(b['batch'])}",
  ]
  if x is None:
    lines += [
      f"  state + inputs             {_gib(b['state_and_inputs'])}",
      "",
      "not compiled (--no-compile): no temporaries, no verdict",
    ]
  else:
    total = r["total_per_device"]
    lines += [
      f"  resident (sum of the above){_gib(b['state_and_inputs'])}",
      f"  XLA arguments (read)       {_gib(x['argument'])}",
      f"  XLA outputs (- donated)    {_gib(x['output'] - x['alias'])}",
      f"  XLA temporaries            {_gib(x['temp'])}",
      f"  XLA generated code         {_gib(x['generated_code'])}",
      f"  total                      {_gib(total)}",
      "",
      f"{'FITS' if r['fits'] else 'DOES NOT FIT'}: {total / GIB:.2f} GiB of {budget / GIB:.0f} "
      f"GiB per device ({100 * total / budget:.0f} %); compiled in "
      f"{r['compile_s']['compile']:.0f} s (lowered in {r['compile_s']['lower']:.0f} s)",
    ]
  lines += [f"note: {n}" for n in r["notes"]]
  return "\n".join(lines)
