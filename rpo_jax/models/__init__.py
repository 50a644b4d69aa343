"""Flax Linen networks written for rpo_jax (UNet, VAE, CLIP text), channels-last."""
