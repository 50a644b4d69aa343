"""The paper's recipe with LoRA adapters instead of the full UNet (configs/dreambench_sd21.py
stays full fine-tuning, as the paper trains).

LoRA as the authors' SDXL script trains it: rank 32 (α 32) on every attention projection to_q /
to_k / to_v / to_out.0, AdamW lr 1e-5; everything else is configs/dreambench_sd21.py (SD 2.1 at
512 px, ALIGN reward, ≤ 400 steps, validation every 40). The frozen SD 2.1 UNet, which is also
the reference model (adapters off), is held once, in bfloat16 (train.ref_params_dtype); the
adapters train in float32.

Memory from the shapes (SD 2.1 UNet: 865.9 M parameters): full fine-tuning holds the trained UNet
(3.46 GB fp32), its AdamW moments (6.93 GB) and the frozen reference (3.46 GB); this config holds
the frozen UNet once (1.73 GB bf16), 6.64 M adapter parameters (26.6 MB) and their moments
(53.1 MB). The adapter file is ~26.6 MB (float32).

Command (one subject):
  rpo-jax train --config configs/dreambench_sd21_lora.py:subject=dog,dreambench=/data/dreambooth/dataset \\
      --config.pretrained=/models/stable-diffusion-2-1 --config.reward_model=/models/align-base \\
      --workdir runs/dog-lora
  rpo-jax export --workdir runs/dog-lora --out runs/dog-lora-adapters   # pytorch_lora_weights.safetensors
Then in PyTorch: pipe = StableDiffusionPipeline.from_pretrained(".../stable-diffusion-2-1");
pipe.load_lora_weights("runs/dog-lora-adapters").
Expected: not measured (no SD 2.1 / ALIGN weights or accelerator here); the learning rate is the
authors' SDXL value, not tuned for SD 2.1.

Arguments (`configs/dreambench_sd21_lora.py:KEY=VALUE,...`): subject (dog), lambda_val (0.5),
dreambench (dreambooth/dataset), rank (32), alpha (32.0), lr (1e-5).
"""
import dreambench_sd21

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, subject="dog", lambda_val=0.5, dreambench="dreambooth/dataset", rank=32,
                  alpha=32.0, lr=1e-5)
    c = dreambench_sd21.get_config(f"subject={a.subject},lambda_val={a.lambda_val},"
                                   f"dreambench={a.dreambench}")
    c.lora.update(enabled=True, rank=int(a.rank), alpha=float(a.alpha))
    c.train.update(lr=float(a.lr), ref_params_dtype="bfloat16")
    return c
