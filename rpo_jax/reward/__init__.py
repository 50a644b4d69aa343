"""The reward: dual encoders (ALIGN, CLIP, DINO), the λ-Harmonic reward and the WordPiece
tokenizer. Sits on ``sd`` (the CLIP tokenizer), ``models``, ``weights`` and ``core``."""
