"""RPO with LoRA adapters on the toy world: configs/toy.py with only the adapters trained.

The same run as configs/toy.py (negatives, 300 steps of 4 pairs, validation every 50 steps,
held-out evaluation), but the UNet's weights stay frozen and LoRA adapters (PEFT's layout, rank
8, α 8) on the attention projections to_q / to_k / to_v / to_out.0 train instead, at a 10x larger
learning rate (1e-3), as LoRA usually needs. The frozen UNet is also the RPO reference (adapters
off): one UNet in memory.

Command:
  rpo-jax train --config configs/toy_lora.py --workdir runs/toy_lora
  rpo-jax export --workdir runs/toy_lora --out runs/toy_lora-adapters    # pytorch_lora_weights.safetensors
(`rpo-jax sample --lora runs/toy_lora-adapters ...` applies it; docs/lora.md).
Expected: see docs/lora.md (measured numbers beside full fine-tuning's).

Arguments (`configs/toy_lora.py:KEY=VALUE,...`): lambda_val (0.5), seed (0), rank (8), alpha (8.0),
lr (1e-3), targets (attn; a preset of docs/lora.md: attn, attn_ff, attn_ff_conv).
"""
import toy

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, lambda_val=0.5, seed=0, rank=8, alpha=8.0, lr=1e-3, targets="attn")
    c = toy.get_config(f"lambda_val={a.lambda_val},seed={a.seed}")
    c.lora.update(enabled=True, rank=int(a.rank), alpha=float(a.alpha), targets=(a.targets,))
    c.train.lr = float(a.lr)
    return c
