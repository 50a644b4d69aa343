"""RPO with LoRA adapters on the toy world: configs/toy.py with only the adapters trained.

The same run as configs/toy.py (negatives, 300 steps of 4 pairs, validation every 50 steps,
held-out evaluation), but the UNet's weights stay frozen and LoRA adapters (PEFT's layout, rank
8, α 8) train instead, on the attention projections, the feed-forward layers and the ResNet
convolutions (preset attn_ff_conv: 348,160 parameters against the UNet's 4,087,780), at a 30x
larger learning rate (3e-3). The frozen UNet is also the RPO reference (adapters off): one UNet
in memory.

Command:
  rpo-jax train --config configs/toy_lora.py --workdir runs/toy_lora
  rpo-jax export --workdir runs/toy_lora --out runs/toy_lora-adapters    # pytorch_lora_weights.safetensors
(`rpo-jax sample --lora runs/toy_lora-adapters ...` applies it; docs/lora.md).
Expected (2 CPU cores shared with other jobs: training 594 s, ~13 min in all; measured 2026-12-04), base → LoRA RPO
(step 100, the best validation reward r_0.5 0.635; base 0.597) on the held-out prompts: CLIP-I
0.353 → 0.615, CLIP-T 0.454 → 0.351, r_0.5 0.645 → 0.701, oracle subject rate 0 → 0.375, oracle
scene accuracy 0.94 → 0.72 (full fine-tuning, configs/toy.py: 0.626, 0.416, 0.690, 0.453, 0.766).
Optimizer state 2.8 MB against 32.7 MB; adapter file 1.4 MB against the UNet's 8.2 MB (float16).
Attention-only adapters (targets=attn) learn less: docs/lora.md.

Arguments (`configs/toy_lora.py:KEY=VALUE,...`): lambda_val (0.5), seed (0), rank (8), alpha (8.0),
lr (3e-3), targets (attn_ff_conv; a preset of docs/lora.md: attn, attn_ff, attn_ff_conv).
"""
import toy

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, lambda_val=0.5, seed=0, rank=8, alpha=8.0, lr=3e-3, targets="attn_ff_conv")
    c = toy.get_config(f"lambda_val={a.lambda_val},seed={a.seed}")
    c.lora.update(enabled=True, rank=int(a.rank), alpha=float(a.alpha), targets=(a.targets,))
    c.train.lr = float(a.lr)
    return c
