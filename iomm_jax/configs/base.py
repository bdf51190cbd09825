"""The base experiment config: every key with its default and a one-line comment.

Experiment files under ``experiments/`` start from ``get_base_config()`` and override keys;
nothing reads a key that is not defined here (configs are locked). Defaults follow the paper's
IOMM-B recipe where it gives one (paper.md §3) and the embedded shapes world otherwise.
"""

from __future__ import annotations

import ml_collections

AUX_PROMPT = "Generate an image that is identical to the reference image:"
STAGES = ("mllm", "pretrain", "finetune")


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the complete, unlocked base config."""
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"  # which loop: "mllm" (stage 0), "pretrain" (1), "finetune" (2)
  c.seed = 0  # seeds parameters, data order and all training randomness

  c.model = m = ml_collections.ConfigDict()
  m.mllm = "tiny"  # MLLM_VARIANTS name (frozen understanding model)
  m.generator = "tiny"  # MMDIT_VARIANTS name (the MM-DiT generator)
  # fields of that variant replaced, e.g. "num_layers=3,num_single_layers=3" (MMDiTConfig)
  m.generator_overrides = ""
  m.pooled = "mean"  # generator's pooled vector: "mean" of the context tokens or "none" (zeros)
  m.condition = "rqa"  # "rqa" (Residual Query Adapter), "queries" (MetaQuery style) or "raw"
  m.num_queries = 256  # learned query tokens appended to the MLLM input
  m.adapter_heads = 12  # RQA cross-attention heads
  m.adapter_layers = 1  # RQA blocks
  m.adapter_mlp_ratio = 4.0  # RQA MLP width / model width
  m.connector = "linear"  # MLLM hidden -> generator context: "linear", "mlp" or "transformer"
  m.connector_layers = 2  # layers of a "transformer" connector
  m.connector_heads = 8  # heads of a "transformer" connector
  m.codec = "pixel"  # latent codec: "pixel" (space-to-depth) or "vae" (FLUX AutoencoderKL)
  m.codec_factor = 2  # space-to-depth factor of the pixel codec
  m.vae = "flux"  # VAE_VARIANTS name when codec == "vae"
  m.vae_checkpoint = ""  # directory of converted VAE weights ("" = random init, tests only)
  m.image_size = 32  # generated image side in pixels
  m.prediction = "velocity"  # generator output: "velocity" (FLUX, paper) or "x" (clean sample)
  m.x_pred_t_min = 0.05  # prediction "x": velocity = (x_t - x) / max(t, x_pred_t_min)
  m.max_text_len = 24  # token limit of a text prompt (longer prompts are an error)
  m.aux_prompt = AUX_PROMPT  # fixed auxiliary prompt of image-only conditions (paper §2.2)
  m.attention = "xla"  # generator attention kernel: "xla" (any backend) or "cudnn" (GPU, bf16)
  m.remat = "none"  # recompute blocks in the backward pass: "none", "block" or "dots" (layers.py)
  m.dtype = "float32"  # compute dtype of the trainable modules
  m.param_dtype = "float32"  # storage dtype of the trainable parameters
  m.mllm_dtype = "float32"  # compute and storage dtype of the frozen MLLM
  m.mllm_from = ""  # workdir of a stage-0 run (or converted MLLM checkpoint dir) to freeze
  m.mllm_init = "checkpoint"  # "checkpoint" (from mllm_from) or "random" (ablation)
  # stage 0's tokenizer: a tokenizer.model (or a workdir holding one) to copy, else "" to train
  # one on the data's captions (the shapes grammar, or own records) with this soft vocabulary
  m.tokenizer_from = ""
  m.tokenizer_vocab = 256
  # LoRA on the generator's block projections (stage 2; mmdit.LoRAConfig): with rank > 0 the base
  # generator weights are frozen (passed beside the MLLM, no gradient, no optimiser state, no
  # EMA) and reloaded from train.init_from at every start; the adapters, the RQA and the
  # connector train. export-torch folds the adapters into the kernels.
  m.lora = ml_collections.ConfigDict()
  m.lora.rank = 0  # adapter rank r (0 = off: full fine-tuning)
  m.lora.alpha = 0.0  # the update is scaled by alpha / r (0: alpha = r, scale 1)
  # wrapped layers: groups "attn" (q/k/v/out projections of both streams and the single blocks'
  # proj_out) and "mlp" (MLP in/out), or fnmatch patterns over mmdit.LORA_LAYERS' block paths
  m.lora.targets = ("attn", "mlp")
  # generator parameter path prefixes trained in full beside the adapters, e.g.
  # ("context_embedder", "time_text_embed/text_embedder"); must cover what init_from
  # re-initialises (a FLUX checkpoint's condition embedders of another width)
  m.lora.trainable = ()

  c.data = d = ml_collections.ConfigDict()
  d.source = "shapes"  # "shapes" (embedded procedural world), "array_record" or "tfds"
  d.path = ""  # "array_record": an iomm-prepare output folder; "tfds": builder dir or data_dir
  d.tfds_name = ""  # "tfds": dataset name in data_dir=path ("" = path is a builder directory)
  d.tfds_split = "train"  # "tfds": the split trained on
  d.image_key = "image"  # "tfds": the image feature
  d.caption_key = "caption"  # "tfds": the caption feature (missing = image-only)
  # own data: the last N records of the source, never trained on, for the sample grids,
  # iomm-eval and the probes (the shapes world holds out prompts instead: data.holdout)
  d.holdout_records = 0
  d.features = ""  # iomm-cache-features folder: read instead of source/path ("": encode online)
  d.vae_latent = "mean"  # VAE target latent: posterior "mean" or a "sample" (online and cached)
  d.canvas = 32  # shapes world: canvas side in pixels
  d.grid = 2  # shapes world: objects sit in a grid x grid layout of cells
  # shapes world: its shapes (data.shapes.KNOWN_SHAPES) and the hold-out version that splits
  # each category's prompts into training and evaluation ones (v2: >= 8 evaluation prompts each)
  d.shapes = ("circle", "square", "triangle", "diamond", "ring", "frame", "rectangle", "oval")
  d.holdout = "v2"
  d.num_pairs = 2000  # stage 2: size of the fixed curated text-image pair set
  d.dense_captions = 0.0  # stage 2: share of pairs captioned densely (every object described)
  d.image_only_source = "pairs"  # stage 2 image-only half: "pairs" (captions dropped) or "stream"
  d.num_workers = 0  # grain worker processes (0 = in the training process)
  d.read_threads = 1  # grain threads reading (rendering) batches in the training process
  d.prefetch = 4  # batches read ahead (per thread, and per worker process)

  c.diffusion = f = ml_collections.ConfigDict()
  f.mask_ratio = 0.85  # r: share of condition image tokens zeroed (paper: 0.85 for B/L)
  f.mix_ratio = 0.5  # lambda: share of image-only samples in stage 2 (paper: 0.5)
  f.cond_dropout = 0.1  # probability of the null condition, for classifier-free guidance
  f.t_sampler = "uniform"  # training time distribution: "uniform" (paper) or "logit_normal"
  f.logit_mean = 0.0  # logit-normal mean
  f.logit_std = 1.0  # logit-normal std
  f.t_shift = 1.0  # time shift applied to training times (1 = none)

  c.sample = s = ml_collections.ConfigDict()
  s.num_steps = 25  # ODE steps
  s.solver = "euler"  # "euler" or "heun"
  s.cfg_scale = 4.0  # classifier-free guidance scale (1 = off)
  s.shift = 1.0  # sampling time-grid shift
  s.use_ema = True  # sample with EMA parameters
  s.num_grid = 8  # prompts in the training-time sample grid (0: no grid is sampled)
  s.per_prompt = 4  # images per prompt in the sample grid

  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"  # "adamw" or "muon"
  o.lr = 1e-4  # peak learning rate (paper: 1e-4)
  o.b1 = 0.9  # beta1 (paper: 0.9)
  o.b2 = 0.95  # beta2 (paper: 0.95)
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.0  # decoupled weight decay (paper: 0)
  o.clip_norm = 1.0  # global gradient-norm clip (paper: 1.0; 0 = off)
  o.schedule = "constant"  # "constant", "cosine" or "linear" after warmup
  o.warmup_steps = 0  # linear warmup steps
  o.final_lr_fraction = 0.0  # end LR / peak LR for decaying schedules

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 32  # global batch size
  t.num_steps = 1000  # total training steps of this stage
  t.ema_decay = 0.999  # EMA decay (paper: 0.999); 0 = no EMA copy kept, samples use the params
  t.ema_warmup = True  # use min(decay, (1 + step) / (10 + step)) so short runs track
  t.grad_accum = 1  # micro-batches per update (batch_size / grad_accum rows each, one update)
  t.peak_tflops = 0.0  # per-device bf16 peak for the logged MFU (0: by device kind, perf.py)
  # stage 2: a stage-1 workdir, a diffusers FluxTransformer2DModel (or FLUX pipeline) folder, or
  # "scratch" (random init)
  t.init_from = ""
  t.log_every = 50  # steps between metric writes
  t.ckpt_every = 500  # steps between checkpoints (and one at the end)
  t.keep_checkpoints = 2  # checkpoints kept in the workdir
  t.sample_every = 0  # steps between sample grids (0 = only at the end)
  t.max_nonfinite = 10  # stop after this many non-finite updates in a row

  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh = (-1, 1, 1)  # (data, fsdp, tensor) sizes; -1 = the remaining devices
  c.sharding.logical_axis_rules = (  # logical axis -> mesh axes
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("modulation", "tensor"),
  )
  return c
