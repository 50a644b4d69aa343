"""Tiny random checkpoints in the real diffusers / transformers formats, for tests and for
``tiny:`` specs: a tiny SD pipeline, ALIGN, CLIP and DINO, and the architectures they share with
the full-size models. Sits on ``rpo`` (the paper's prompts feed the tiny WordPiece vocabulary)."""
