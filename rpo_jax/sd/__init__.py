"""Stable Diffusion: the pipeline (CLIP text encoder, UNet, VAE), schedulers, DDIM sampling and
the CLIP tokenizer. Sits on ``models``, ``weights`` and ``core``."""
