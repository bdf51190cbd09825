"""Own data: how well a generator draws the captions of the run's held-out records.

Real images have no detector, so the score is a retrieval in the frozen MLLM's own image space
(the ViT + projector tokens, mean-pooled and L2-normalised; the generator never trains them):
one image is generated per held-out caption, and it counts as right when its nearest held-out
*real* image (cosine) carries the same caption (case and spacing ignored). ``chance`` is what a
generator drawing a random held-out image would score (the mean share of held-out records that
share each caption), so ``caption_match`` is read against it. With one distinct caption per
record the score is a strict instance retrieval; with class-like captions ("a photo of a
sneaker") it is the class accuracy of the samples.

Beside it, ``feature_fd``: the Fréchet distance between the generated and the real held-out
images in the same feature space (small sets make it biased upward; compare runs at one
``num_images``), and ``real_split_fd``: the same distance between two halves of the real images,
the floor a perfect generator would approach.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from iomm_jax import inference
from iomm_jax.configs import specs
from iomm_jax.data import sources
from iomm_jax.models import iomm


def image_features(ctx, images: np.ndarray, batch: int = 64) -> np.ndarray:
  """float64 [N, D]: mean-pooled frozen vision tokens of uint8 ``images``, unit length."""
  fn = jax.jit(lambda x: iomm.vision_tokens(ctx.model, ctx.frozen["mllm"], x).mean(axis=1))
  out = [np.asarray(fn(images[i : i + batch]), np.float64) for i in range(0, len(images), batch)]
  f = np.concatenate(out)
  return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
  mu = a.mean(0) - b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # trace of sqrt(ca cb) from the eigenvalues of the product (real, >= 0 up to rounding)
  eig = np.linalg.eigvals(ca @ cb)
  tr = float(np.sum(np.sqrt(np.clip(eig.real, 0.0, None))))
  return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * tr)


def _norm(caption: str) -> str:
  return " ".join(caption.lower().split())


def score(
  captions: list[str], generated: np.ndarray, real_features: np.ndarray, gen_features: np.ndarray
) -> dict[str, Any]:
  """The report of ``evaluate`` from the features (module docstring)."""
  n = len(captions)
  keys = [_norm(c) for c in captions]
  nearest = np.argmax(gen_features @ real_features.T, axis=1)
  hit = np.array([keys[j] == keys[i] for i, j in enumerate(nearest)], np.float64)
  chance = float(np.mean([sum(k == q for q in keys) / n for k in keys]))
  p = float(hit.mean())
  half = n // 2
  return {
    "caption_match": p,
    "caption_match_se": float(np.sqrt(p * (1 - p) / n)) if n > 1 else float("nan"),
    "chance": chance,
    "feature_fd": frechet(gen_features, real_features) if n > 2 else float("nan"),
    "real_split_fd": frechet(real_features[:half], real_features[half:])
    if half > 2
    else float("nan"),
    "distinct_captions": len(set(keys)),
    "num_images": n,
    "correct": [bool(h) for h in hit],
    "prompts": list(captions),
    "empty": float(np.mean([np.ptp(g) < 8 for g in generated])),
  }


def evaluate(
  config, ctx, params, num_images: int = 64, seed: int = 0, batch_size: int = 32, mesh=None
) -> tuple[dict[str, Any], np.ndarray, list[np.ndarray]]:
  """(report, generated images, real images) for up to ``num_images`` captioned held-out
  records of ``config.data`` (``sources.heldout``)."""
  spec = specs.from_config(config)
  held = sources.heldout(spec, num_images)
  captions = [c for _, c in held]
  real = np.stack([image for image, _ in held])
  gen = inference.sample_prompts(
    spec.sample, ctx, params, captions, seed, batch_size=batch_size, mesh=mesh
  )
  report = score(captions, gen, image_features(ctx, real), image_features(ctx, gen))
  return report, gen, list(real)
