"""The PyTorch side of ``rpo-jax bench``: the same RPO step, DDIM + CFG sampling loop and
λ-Harmonic reward written the usual way with diffusers / transformers.

torch, diffusers and transformers are optional (the ``bench`` extra): this module imports them
inside its functions, and ``rpo_jax.perf.bench`` imports this module only when a PyTorch side is
asked for.

Layouts: the cache arrays and latents the JAX side uses are channels-last (N, H, W, C); here they
become (N, C, H, W) once, at construction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DTYPES = ("float32", "bfloat16")


def settings(device: str | None = None) -> dict:
    """{'device', 'threads', 'version', 'device_name'} of the torch this process would use."""
    import torch  # optional: the bench's PyTorch side
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"device": device, "threads": torch.get_num_threads(), "version": torch.__version__,
            "device_name": name}


def synchronize(device: str) -> None:
    import torch  # optional: the bench's PyTorch side
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    import torch  # optional: the bench's PyTorch side
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset; None on CPU (no allocator
    statistics there)."""
    import torch  # optional: the bench's PyTorch side
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def save_random_unet(unet_config: dict, folder: Path, seed: int, perturb_from: Path | None = None) -> Path:
    """A diffusers UNet folder with random weights (``torch.manual_seed(seed)``), or, with
    ``perturb_from``, that folder's weights plus 0.01·N(0, 1) noise (a trained UNet that differs
    from the frozen one, so the loss sees Δ ≠ 0)."""
    import diffusers  # optional: the bench's PyTorch side
    import torch  # optional: the bench's PyTorch side
    torch.manual_seed(seed)
    if perturb_from is not None:
        unet = diffusers.UNet2DConditionModel.from_pretrained(perturb_from)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
    else:
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    unet.save_pretrained(folder)
    return folder


class TorchStep:
    """One RPO optimizer step with diffusers' ``UNet2DConditionModel``: frozen forward under
    ``no_grad``, trained forward + backward per micro-batch (gradients accumulated),
    ``clip_grad_norm_``, ``torch.optim.AdamW``. Options: bf16 autocast (``dtype='bfloat16'``),
    channels-last memory format, ``torch.compile`` of both UNets; SDPA attention is diffusers'
    default.

    cache: the ``rpo_jax.rpo.train.build_cache`` arrays (channels-last); pair_idx: (grad_accum, B)
    pair numbers, as the JAX step takes them.
    """

    def __init__(self, frozen: Path, trained: Path, schedule, cache: dict, pair_idx: np.ndarray, config, *,
                 device: str = "cpu", dtype: str = "float32", channels_last: bool = False,
                 compile: bool = False):
        import diffusers  # optional: the bench's PyTorch side
        import torch  # optional: the bench's PyTorch side
        self.torch, self.device = torch, device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.ref = diffusers.UNet2DConditionModel.from_pretrained(frozen).to(device, memory_format=fmt)
        self.ref.eval().requires_grad_(False)
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(trained).to(device, memory_format=fmt).train()
        t = config.train
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                     weight_decay=t.weight_decay)
        self.ref_fn, self.unet_fn = (torch.compile(self.ref), torch.compile(self.unet)) if compile else (self.ref, self.unet)
        self.max_grad_norm = t.max_grad_norm
        self.obj = config.objective
        self.autocast = dtype == "bfloat16"
        self.prediction_type = schedule.prediction_type
        self.alphas = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)
        self.T = schedule.num_train_timesteps
        nchw = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).contiguous().to(device)
        self.cache = {k: (nchw(v) if v.ndim == 4 else torch.as_tensor(v).to(device)) for k, v in cache.items()}
        self.num_negs = cache["neg_mean"].shape[0]
        self.idx = torch.as_tensor(pair_idx, dtype=torch.long, device=device)

    def _noisy(self, z, noise, t):
        a = self.alphas[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z, "sample": z}
        return x, target[self.prediction_type]

    def loss(self, zy, zg, cy, cg, noise_y, noise_g, t_y, t_g, labels):
        """L = w_sim·L_sim + w_pref·L_pref of one micro-batch (NCHW latents; as
        ``rpo_jax.rpo.objective.rpo_loss`` computes it)."""
        torch = self.torch
        xy, target_y = self._noisy(zy, noise_y, t_y)
        xg, target_g = self._noisy(zg, noise_g, t_g)
        x, target = torch.cat([xy, xg]), torch.cat([target_y, target_g])
        t, c = torch.cat([t_y, t_g]), torch.cat([cy, cg])
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                out_ref = self.ref_fn(x, t, c).sample
            out = self.unet_fn(x, t, c).sample
        e_ref = ((out_ref.float() - target) ** 2).mean(dim=(1, 2, 3))
        e = ((out.float() - target) ** 2).mean(dim=(1, 2, 3))
        B = zy.shape[0]
        delta = (e_ref[:B] - e[:B]) - (e_ref[B:] - e[B:])
        bd = self.obj.beta * delta
        l_pref = -(labels * torch.nn.functional.logsigmoid(bd)
                   + (1 - labels) * torch.nn.functional.logsigmoid(-bd)).mean()
        return self.obj.w_sim * e[:B].mean() + self.obj.w_pref * l_pref

    def fixed_loss(self, batch: dict, drawn: dict) -> float:
        """The loss of fixed inputs (channels-last arrays as the JAX side draws them)."""
        torch, dev = self.torch, self.device
        nchw = lambda a: torch.as_tensor(np.array(a)).permute(0, 3, 1, 2).to(dev)
        arr = lambda a, dtype=None: torch.as_tensor(np.array(a), dtype=dtype).to(dev)
        with torch.no_grad():
            return float(self.loss(nchw(batch["ref_latents"]), nchw(batch["neg_latents"]),
                                   arr(batch["ref_context"]), arr(batch["neg_context"]),
                                   nchw(drawn["noise_y"]), nchw(drawn["noise_g"]),
                                   arr(drawn["t_y"], torch.long), arr(drawn["t_g"], torch.long),
                                   arr(drawn["labels"])))

    def __call__(self) -> None:
        torch, c = self.torch, self.cache
        self.opt.zero_grad(set_to_none=True)
        accum = len(self.idx)
        for idx in self.idx:
            ri, ni = idx // self.num_negs, idx % self.num_negs
            zy = c["ref_mean"][ri] + c["ref_std"][ri] * torch.randn_like(c["ref_mean"][ri])
            zg = c["neg_mean"][ni] + c["neg_std"][ni] * torch.randn_like(c["neg_mean"][ni])
            cy = c["ref_context"].expand(len(idx), *c["ref_context"].shape)
            cg = c["prompt_context"][c["neg_prompt_index"][ni]]
            t = torch.randint(0, self.T, (2, len(idx)), device=self.device)
            labels = torch.bernoulli(c["pref_prob"][ri, ni])
            loss = self.loss(zy, zg, cy, cg, torch.randn_like(zy), torch.randn_like(zg), t[0], t[1], labels)
            (loss / accum).backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.opt.step()
        synchronize(self.device)


class TorchSampler:
    """diffusers' DDIM + classifier-free guidance denoising loop (``StableDiffusionPipeline``'s,
    with ``output_type='latent'``) over a UNet folder: [uncond; cond] as one batch,
    ``ε = ε_u + g·(ε_c − ε_u)``, ``DDIMScheduler.step``."""

    def __init__(self, unet_dir: Path, scheduler_config: dict, steps: int, guidance: float, *,
                 device: str = "cpu", dtype: str = "float32", compile: bool = False):
        import diffusers  # optional: the bench's PyTorch side
        import torch  # optional: the bench's PyTorch side
        self.torch, self.device = torch, device
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir).to(device).eval()
        self.unet_fn = torch.compile(self.unet) if compile else self.unet
        self.scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
        self.steps, self.guidance = steps, guidance
        self.autocast = dtype == "bfloat16"

    def __call__(self, init_latents: np.ndarray, cond: np.ndarray, uncond: np.ndarray) -> np.ndarray:
        """init_latents (B, h, w, C), cond / uncond (B, 77, D) → (B, h, w, C) float32 latents."""
        torch = self.torch
        x = torch.as_tensor(np.ascontiguousarray(init_latents)).permute(0, 3, 1, 2).contiguous().to(self.device)
        context = torch.as_tensor(np.concatenate([uncond, cond])).to(self.device)
        self.scheduler.set_timesteps(self.steps, device=self.device)
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            for t in self.scheduler.timesteps:
                out = self.unet_fn(torch.cat([x, x]), t, context).sample.float()
                out_u, out_c = out.chunk(2)
                x = self.scheduler.step(out_u + self.guidance * (out_c - out_u), t, x).prev_sample
        synchronize(self.device)
        return x.permute(0, 2, 3, 1).float().cpu().numpy()


class TorchReward:
    """The λ-Harmonic reward with transformers, as a PyTorch user computes it: the folder's
    tokenizer and PIL image processor (resize, crop, normalise from uint8 images),
    ``get_image_features`` / ``get_text_features``, L2-normalised, then
    r_λ = 1 / (λ / (S_img + ε) + (1 − λ) / (S_txt + ε)). ALIGN or CLIP folders."""

    def __init__(self, folder: Path, kind: str, *, device: str = "cpu"):
        import torch  # optional: the bench's PyTorch side
        import transformers  # optional: the bench's PyTorch side
        self.torch, self.device = torch, device
        if kind == "align":
            self.model = transformers.AlignModel.from_pretrained(folder)
            tokenizer = transformers.BertTokenizer.from_pretrained(folder)
            self.tokenize = lambda texts: tokenizer(texts, padding="max_length", max_length=64,
                                                    truncation=True, return_tensors="pt")
            self.process = transformers.EfficientNetImageProcessorPil.from_pretrained(folder)
        else:
            self.model = transformers.CLIPModel.from_pretrained(folder)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
            self.tokenize = lambda texts: tokenizer(texts, padding="max_length", truncation=True,
                                                    return_tensors="pt")
            self.process = transformers.CLIPImageProcessorPil.from_pretrained(folder)
        self.model = self.model.to(device).eval()

    def _normalized(self, out) -> Any:
        out = getattr(out, "pooler_output", out)
        return self.torch.nn.functional.normalize(out.float(), dim=-1)

    def _images(self, images: np.ndarray) -> Any:
        pixels = self.process([Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        return self._normalized(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def __call__(self, images: np.ndarray, references: np.ndarray, prompts: list[str], lam: float,
                 eps: float = 1e-8) -> np.ndarray:
        """images (N, H, W, 3) uint8, references (R, H, W, 3) uint8, one prompt per image → (N,)."""
        torch = self.torch
        with torch.no_grad():
            img, ref = self._images(images), self._images(references)
            tokens = {k: v.to(self.device) for k, v in self.tokenize(prompts).items()}
            txt = self._normalized(self.model.get_text_features(**tokens))
            s_img = ((img @ ref.T + 1) / 2).mean(dim=1)
            s_txt = ((img * txt).sum(dim=-1) + 1) / 2
            reward = 1.0 / (lam / (s_img + eps) + (1 - lam) / (s_txt + eps))
        synchronize(self.device)
        return reward.cpu().numpy()
