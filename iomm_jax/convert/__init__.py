"""Checkpoint conversion: real InternVL3 / FLUX VAE weights in, diffusers + PyTorch out."""
