"""``rpo-jax toy pretrain --out DIR``: train the toy world's models from scratch on a CPU.

Stages, each written atomically to its own folder under DIR and skipped when already complete
(so a killed run resumes at the stage it was in):

  oracle/    the oracle judges (:mod:`rpo_jax.toy.oracle`), supervised on exact render labels
  clip/      a tiny CLIPModel (ViT image tower + CLIP text tower), contrastive: plays CLIP for
             evaluation, and its text tower is the pipeline's text encoder
  align/     a tiny AlignModel (EfficientNet + BERT), contrastive: plays ALIGN, the reward model
  pipeline/  a miniature Stable Diffusion in the diffusers layout: the VAE (32 px RGB ↔ 16x16x4
             latents), then the UNet (v-prediction, DDIM config of SD 2.1) trained on VAE latents
             of world renders with randomly shortened captions (10% empty, for guidance)
  subject/   the toy subject: reference photos and prompts (:mod:`rpo_jax.toy.subject`)
  gate.png   the quality gate: base-model samples on the held-out prompts; their oracle
             accuracy goes to report.json ("gate"), beside every stage's settings and seconds

Both dual encoders learn image-text matching (multi-positive: a caption that leaves out colour or
scene matches every image consistent with it) plus image-image matching of two renders of the
same object in different places and scenes; half of every batch is groups of objects that differ
only in shape, so that shape matters to them (and to the text tower the UNet is conditioned on).
Neither ever sees the subject.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tqdm.auto import tqdm

from rpo_jax.core import fsutil, images as images_lib, logs
from rpo_jax.sd import schedulers
from rpo_jax.testing import tiny, tiny_encoders
from rpo_jax.models import align, clip, clip_text, efficientnet, unet as unet_lib, vae as vae_lib
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.reward.wordpiece import BertTokenizer
from rpo_jax.sd.pipeline import load_pipeline
from rpo_jax.sd.tokenizer import CLIPTokenizer
from rpo_jax.toy import oracle as oracle_lib, subject as subject_lib, world
from rpo_jax.weights import io

log = logs.get_logger(__name__)

STAGES = ("oracle", "clip", "align", "pipeline", "subject", "gate")
LATENT_SIZE = world.IMAGE_SIZE // 2


@dataclasses.dataclass(frozen=True)
class Budget:
    """Optimizer steps and batch sizes per stage (``scale`` multiplies every step count)."""
    oracle_steps: int = 600
    oracle_batch: int = 128
    clip_steps: int = 2500     # its ViT learns shape last: 0.55 zero-shot shape accuracy at 1000
    align_steps: int = 1000
    encoder_batch: int = 96
    vae_steps: int = 1500
    vae_batch: int = 32
    unet_steps: int = 6000     # shape is learned last: gate shape accuracy 0.38 at 2000, 0.675 here
    unet_batch: int = 64
    unet_dataset: int = 32768
    gate_images_per_prompt: int = 4

    def scaled(self, scale: float) -> "Budget":
        s = lambda n: max(2, int(round(n * scale)))
        return dataclasses.replace(self, oracle_steps=s(self.oracle_steps),
                                   clip_steps=s(self.clip_steps), align_steps=s(self.align_steps),
                                   vae_steps=s(self.vae_steps),
                                   unet_steps=s(self.unet_steps),
                                   unet_dataset=max(256, int(self.unet_dataset * min(scale, 1.0))))


# ---- a small generic trainer ------------------------------------------------------------------

def fit(loss_fn: Callable, params: Any, batches: Iterator, steps: int, *, lr: float, desc: str,
        progress: bool = True, frozen: Callable[[tuple], bool] = lambda path: False,
        ema_decay: float = 0.0, seed: int = 0, weight_decay: float = 1e-4) -> tuple[Any, list]:
    """AdamW (warmup + cosine) on ``loss_fn(params, batch, rng) -> (loss, metrics)``.

    ``frozen(path)`` marks leaves that never change (e.g. BatchNorm statistics). With
    ``ema_decay`` > 0 the returned params are the exponential moving average. Returns (params,
    history of (step, metrics) every 50 steps).
    """

    labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if frozen(p) else "train", params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(200, steps // 10)), steps, lr * 0.1)
    tx = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(1.0),
                                                     optax.adamw(schedule, weight_decay=weight_decay)),
                                "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.array, params) if ema_decay else None  # a copy: both are donated

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, ema, batch, key, n):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            d = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt_state, ema, {"loss": loss, **metrics}

    key = jax.random.PRNGKey(seed)
    history = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    last = (0, time.perf_counter())
    for i in bar:
        params, opt_state, ema, metrics = step(params, opt_state, ema, next(batches),
                                               jax.random.fold_in(key, i), jnp.float32(i))
        if i % 50 == 0 or i == steps - 1:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            if i > last[0]:  # seconds per step since the last log (the first includes compiling)
                m["step_seconds"] = (now - last[1]) / (i - last[0])
            last = (i, now)
            history.append((i, m))
            bar.set_postfix({k: f"{v:.4f}" for k, v in m.items()}, refresh=False)
    bar.close()
    return (ema if ema_decay else params), history


def _unboxed_init(module: nn.Module, *inputs, seed: int = 0) -> Any:
    return nn.unbox(jax.jit(lambda k: module.init(k, *inputs)["params"])(jax.random.PRNGKey(seed)))


# ---- oracle ------------------------------------------------------------------------------------

def train_oracle(out: Path, budget: Budget, seed: int, progress: bool) -> dict:
    module = oracle_lib.OracleNet()
    rng = np.random.default_rng([seed, 1])

    def batches():
        while True:
            specs = oracle_lib.training_specs(rng, budget.oracle_batch)
            images = world.render_batch(specs)
            half = len(images) // 2
            images[:half] = oracle_lib.degrade(images[:half], rng)
            yield oracle_lib.to_input(images), oracle_lib.labels_of(specs)

    loss = lambda p, b, k: oracle_lib.loss_fn(p, module, b[0], b[1])
    params = _unboxed_init(module, jnp.zeros((1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)), seed=seed)
    params, history = fit(loss, params, batches(), budget.oracle_steps, lr=2e-3, desc="oracle",
                          progress=progress, seed=seed)
    oracle_lib.save(params, out, module)
    judges = oracle_lib.load(out)
    specs = oracle_lib.training_specs(np.random.default_rng([seed, 2]), 1024)
    return {"fresh_render_accuracy": oracle_lib.accuracy(judges, world.render_batch(specs), specs),
            "final_loss": history[-1][1]["loss"]}


# ---- dual encoders -----------------------------------------------------------------------------

def clip_config() -> dict:
    """The toy CLIP: text 2x32 (the pipeline's text encoder), ViT 3x64 on 4-px patches, proj 64."""
    cfg = tiny_encoders.clip_config()
    cfg["projection_dim"] = 64
    cfg["text_config"].update(hidden_act="gelu", projection_dim=64, pad_token_id=0)
    cfg["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, projection_dim=64)
    return cfg


def align_config(vocab_size: int) -> dict:
    """The toy ALIGN: BERT 2x32 over the world's WordPiece vocabulary, EfficientNet to 96 dims."""
    cfg = tiny_encoders.align_config(vocab_size)
    cfg["vision_config"].update(width_coefficient=0.5, hidden_dim=96,
                                num_block_repeats=[1, 2, 2])
    cfg["projection_dim"] = tiny_encoders._vision_width(cfg)
    return cfg


def _caption_fields(rng: np.random.Generator, spec: world.Spec) -> tuple[str, tuple]:
    """A random caption of ``spec`` and what it states: (caption, (colour|None, shape, scene|None))."""
    with_colour, with_scene = rng.random() >= 0.25, rng.random() >= 0.15
    text = world.caption(spec, with_colour=with_colour, with_scene=with_scene, phrase=int(rng.integers(2)))
    return text, (spec.colour if with_colour else None, spec.shape, spec.scene if with_scene else None)


def _matches(specs: list, stated: list) -> np.ndarray:
    """(N images, N captions) 1 where the image is consistent with what the caption states."""
    m = np.zeros((len(specs), len(stated)), np.float32)
    for i, s in enumerate(specs):
        for j, (colour, shape, scene) in enumerate(stated):
            m[i, j] = (s.shape == shape and (colour is None or s.colour == colour)
                       and (scene is None or s.scene == scene))
    return m


def _twin(rng: np.random.Generator, spec: world.Spec) -> world.Spec:
    """The same object (shape and colours) elsewhere, at another size, on another scene."""
    other = world.random_spec(rng, allow_held_out=True)
    return dataclasses.replace(other, shape=spec.shape, colour=spec.colour, palette=spec.palette)


def _multi_positive_ce(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    t = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1e-9)
    return -(t * jax.nn.log_softmax(logits, -1)).sum(-1).mean()


def _shape_group(rng: np.random.Generator, n: int) -> list[world.Spec]:
    """``n`` objects of one colour (or palette) on one scene, each a different shape: negatives
    that only the shape tells apart."""
    base = world.random_spec(rng, unnamed_rate=0.3, allow_held_out=True)
    return [dataclasses.replace(world.random_spec(rng, allow_held_out=True), shape=world.SHAPES[i],
                                colour=base.colour, palette=base.palette, scene=base.scene)
            for i in rng.choice(len(world.SHAPES), n, replace=False)]


def _encoder_specs(rng: np.random.Generator, batch: int, group: int = 4) -> list[world.Spec]:
    """Half random objects, half :func:`_shape_group` groups of ``group``. Without the groups a
    batch is told apart by colour and scene alone, and the encoders never learn shape (measured:
    the text tower then gave 'a red square' and 'a red ring' cosine 0.99, and the UNet it
    conditions drew shapes at chance)."""
    specs = [world.random_spec(rng, unnamed_rate=0.3, allow_held_out=True) for _ in range(batch - batch // 2)]
    while len(specs) < batch:
        specs += _shape_group(rng, min(group, batch - len(specs)))
    return specs


def _dual_encoder_batches(rng, batch: int, preprocess: Callable, tokenize: Callable):
    cache: dict[str, dict] = {}
    while True:
        specs = _encoder_specs(rng, batch)
        twins = [_twin(rng, s) for s in specs]
        caps = [_caption_fields(rng, s) for s in specs]
        for text, _ in caps:
            if text not in cache:
                cache[text] = {k: v[0] for k, v in tokenize([text]).items()}
        tokens = {k: np.stack([cache[t][k] for t, _ in caps]) for k in cache[caps[0][0]]}
        same = np.asarray([[a.shape == b.shape and a.colour == b.colour and a.palette == b.palette
                            for b in specs] for a in specs], np.float32)
        yield {"x": preprocess(world.render_batch(specs)), "x2": preprocess(world.render_batch(twins)),
               "tokens": tokens, "match": _matches(specs, [f for _, f in caps]), "same": same}


def _contrastive_loss(image_fn, text_fn, scale: float):
    def loss(params, b, key):
        l2 = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        img, img2 = l2(image_fn(params, b["x"])), l2(image_fn(params, b["x2"]))
        txt = l2(text_fn(params, b["tokens"]))
        it = scale * img @ txt.T
        ii = scale * img @ img2.T
        l_text = 0.5 * (_multi_positive_ce(it, b["match"]) + _multi_positive_ce(it.T, b["match"].T))
        l_image = 0.5 * (_multi_positive_ce(ii, b["same"]) + _multi_positive_ce(ii.T, b["same"]))
        top1 = (b["match"][jnp.arange(it.shape[0]), it.argmax(1)]).mean()
        return l_text + l_image, {"l_text": l_text, "l_image": l_image, "top1": top1}
    return loss


def train_clip(out: Path, budget: Budget, seed: int, progress: bool) -> dict:
    cfg = clip_config()
    config = clip.CLIPConfig.from_dict(cfg, "toy clip config")
    module = clip.CLIPModel(config)
    tokenizer = CLIPTokenizer.default(pad_token="!")
    pp = clip.CLIPImagePreprocess.from_dict({
        "size": {"shortest_edge": world.IMAGE_SIZE},
        "crop_size": {"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}}, "toy clip")
    preprocess = functools.partial(clip.preprocess_images, pp=pp)
    params = _unboxed_init(module, *clip.init_inputs(config), seed=seed)
    scale = 20.0
    params["logit_scale"] = jnp.asarray(np.log(scale), jnp.float32)
    loss = _contrastive_loss(
        lambda p, x: module.apply({"params": p}, x, method=clip.CLIPModel.get_image_features),
        lambda p, t: module.apply({"params": p}, t["input_ids"], method=clip.CLIPModel.get_text_features),
        scale)
    batches = _dual_encoder_batches(np.random.default_rng([seed, 3]), budget.encoder_batch, preprocess,
                                    lambda texts: {"input_ids": tokenizer(texts)["input_ids"]})
    params, history = fit(loss, params, batches, budget.clip_steps, lr=1e-3, desc="clip",
                          progress=progress, seed=seed,
                          frozen=lambda path: _leaf_name(path) == "logit_scale")
    clip.save_clip(params, cfg, out)
    tokenizer.save_pretrained(out)
    pp.save_pretrained(out)
    return {"final": history[-1][1]}


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", last))


def _align_vocab_texts() -> list[str]:
    texts = []
    for colour in world.COLOUR_NAMES:
        for shape in world.SHAPES:
            for phrases in world.SCENES.values():
                texts += [f"a {colour} {shape} {p}" for p in phrases]
    return texts + [f"a photo of {subject_lib.IDENTIFIER} {subject_lib.CLASS_NOUN}"]


def train_align(out: Path, budget: Budget, seed: int, progress: bool) -> dict:

    cfg = align_config(tiny_encoders.write_wordpiece_tokenizer(_align_vocab_texts(), out))
    tokenizer = BertTokenizer.from_pretrained(out)
    config = align.AlignConfig.from_dict(cfg, "toy align config")
    module = align.AlignModel(config)
    params = _unboxed_init(module, *align.init_inputs(config), seed=seed)
    # FrozenBatchNorm statistics stay at the identity (mean 0, var 1): the affine part trains.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if _leaf_name(p) == "mean" else
        (jnp.ones_like(v) if _leaf_name(p) == "var" else v), params)
    scale = 20.0
    params["temperature"] = jnp.asarray(1.0 / scale, jnp.float32)
    pp_dict = tiny_encoders.align_preprocessor_config(world.IMAGE_SIZE)
    pp = efficientnet.AlignImagePreprocess.from_dict(pp_dict)
    preprocess = functools.partial(efficientnet.preprocess_images, pp=pp)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    tokenize = lambda texts: {k: np.asarray(v) for k, v in tokenizer(texts).items() if k in keys}
    loss = _contrastive_loss(
        lambda p, x: module.apply({"params": p}, x, method=align.AlignModel.get_image_features),
        lambda p, t: module.apply({"params": p}, **t, method=align.AlignModel.get_text_features),
        scale)
    batches = _dual_encoder_batches(np.random.default_rng([seed, 4]), budget.encoder_batch, preprocess,
                                    tokenize)
    params, history = fit(loss, params, batches, budget.align_steps, lr=2e-3, desc="align",
                          progress=progress, seed=seed,
                          frozen=lambda path: _leaf_name(path) in ("mean", "var", "temperature"))
    align.save_align(params, cfg, out)
    io.write_json(pp_dict, out / "preprocessor_config.json")
    return {"final": history[-1][1]}


# ---- the miniature Stable Diffusion -----------------------------------------------------------

def vae_config() -> dict:
    """AutoencoderKL 32x32x3 ↔ 16x16x4 (one downsampling), channels (32, 64). Measured at 1500
    steps: mean absolute reconstruction error 5.4/255 on world renders, against 11.6/255 for
    channels (16, 32) at 1200 steps, whose blur the UNet then learned to draw."""
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": tiny._DIFFUSERS_VERSION,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 16,
        "act_fn": "silu", "sample_size": world.IMAGE_SIZE, "scaling_factor": 1.0,
        "mid_block_add_attention": False,
    }


def unet_config(cross_attention_dim: int) -> dict:
    """UNet2DConditionModel on 16x16x4 latents: channels (32, 64, 128), cross-attention at 8x8
    and 4x4 (self-attention at 16x16 would double the CPU cost), v-prediction by the scheduler."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": tiny._DIFFUSERS_VERSION,
        "sample_size": LATENT_SIZE, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64, 128], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": [1, 2, 4],
        "use_linear_projection": True, "upcast_attention": False, "norm_num_groups": 16,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    }


def _vae_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Training images of the autoencoder: the world, unnamed palettes, and (5%) the subject — an
    autoencoder is a generic image codec, like SD's, which has seen every kind of photo."""
    specs = [world.subject_spec(rng, world.SCENE_NAMES[rng.integers(len(world.SCENE_NAMES))], variation=2.0)
             if rng.random() < 0.05 else world.random_spec(rng, unnamed_rate=0.3, allow_held_out=True)
             for _ in range(n)]
    return world.render_batch(specs)


def train_vae(budget: Budget, seed: int, progress: bool) -> tuple[vae_lib.AutoencoderKL, Any, dict, dict]:
    cfg = vae_config()
    config = vae_lib.VAEConfig.from_dict(cfg, "toy vae config")
    module = vae_lib.AutoencoderKL(config)
    rng = np.random.default_rng([seed, 5])

    def batches():
        while True:
            yield jnp.asarray(_vae_images(rng, budget.vae_batch), jnp.float32) / 127.5 - 1.0

    def loss(params, x, key):
        mean, logvar = module.apply({"params": params}, x, method=vae_lib.AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = module.apply({"params": params}, z, method=vae_lib.AutoencoderKL.decode)
        kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        l1 = jnp.abs(recon - x).mean()
        mse = jnp.square(recon - x).mean()
        return l1 + mse + 1e-6 * kl, {"l1": l1, "kl": kl}

    params = _unboxed_init(module, *vae_lib.init_inputs(config), seed=seed)
    params, history = fit(loss, params, batches(), budget.vae_steps, lr=1e-3, desc="vae",
                          progress=progress, seed=seed)
    # scaling_factor = 1 / std of the latents, as SD's 0.18215 was chosen
    x = jnp.asarray(_vae_images(np.random.default_rng([seed, 6]), 512), jnp.float32) / 127.5 - 1.0
    mean, _ = jax.jit(lambda p, x: module.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))(params, x)
    cfg["scaling_factor"] = float(1.0 / np.std(np.asarray(mean)))
    return module, params, cfg, {"final": history[-1][1], "scaling_factor": cfg["scaling_factor"]}


def _caption_table(tokenizer: CLIPTokenizer) -> tuple[list[str], dict[str, int]]:
    """Every caption the UNet is trained on (all colour/scene omissions and phrases), "" first."""
    captions = [""]
    for colour in (None,) + world.COLOUR_NAMES:
        for shape in world.SHAPES:
            spec = world.Spec(shape, colour, "gray")
            captions.append(world.caption(spec, with_scene=False))
            for scene in world.SCENE_NAMES:
                for phrase in range(2):
                    captions.append(world.caption(dataclasses.replace(spec, scene=scene), phrase=phrase))
    captions = list(dict.fromkeys(captions))
    return captions, {c: i for i, c in enumerate(captions)}


def train_unet(vae_module, vae_params, vae_cfg: dict, text_module, text_params, tokenizer,
               schedule: NoiseSchedule, budget: Budget, seed: int, progress: bool) -> tuple[Any, dict, dict]:
    """Train the UNet on cached VAE latents of ``budget.unet_dataset`` world renders."""

    text_dim = text_module.config.hidden_size
    cfg = unet_config(text_dim)
    config = unet_lib.UNetConfig.from_dict(cfg, "toy unet config")
    module = unet_lib.UNet2DConditionModel(config)
    rng = np.random.default_rng([seed, 7])

    # cached latents (posterior mean and std, scaled) of a fixed set of renders
    specs = [world.random_spec(rng, unnamed_rate=0.2) for _ in range(budget.unet_dataset)]
    encode = jax.jit(lambda p, x: module_encode(vae_module, p, x))
    means, stds = [], []
    for i in tqdm(range(0, len(specs), 256), desc="latents", disable=not progress):
        x = jnp.asarray(world.render_batch(specs[i:i + 256]), jnp.float32) / 127.5 - 1.0
        m, s = encode(vae_params, x)
        means.append(np.asarray(m) * vae_cfg["scaling_factor"])
        stds.append(np.asarray(s) * vae_cfg["scaling_factor"])
    means, stds = np.concatenate(means), np.concatenate(stds)

    # text embeddings of every caption the training can draw
    captions, index = _caption_table(tokenizer)
    ids = tokenizer(captions)["input_ids"]
    embed = jax.jit(lambda p, t: clip_text.encode_prompt_embeddings(text_module, p, t))
    context = np.concatenate([np.asarray(embed(text_params, jnp.asarray(ids[i:i + 128])))
                              for i in range(0, len(ids), 128)])

    def batches():
        while True:
            idx = rng.integers(0, len(specs), budget.unet_batch)
            cap = [0 if rng.random() < 0.1 else index[_caption_fields(rng, specs[i])[0]] for i in idx]
            yield {"mean": means[idx], "std": stds[idx], "context": context[np.asarray(cap)]}

    alphas = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def loss(params, b, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = b["mean"] + b["std"] * jax.random.normal(k1, b["mean"].shape)
        noise = jax.random.normal(k2, x0.shape)
        t = jax.random.randint(k3, (x0.shape[0],), 0, schedule.num_train_timesteps)
        x_t = schedulers.add_noise(alphas, x0, noise, t)
        target = schedulers.training_target(schedule.prediction_type, alphas, x0, noise, t)
        pred = module.apply({"params": params}, x_t, t, b["context"])
        return jnp.square(pred - target).mean(), {}

    params = _unboxed_init(module, *unet_lib.init_inputs(config), seed=seed)
    params, history = fit(loss, params, batches(), budget.unet_steps, lr=3e-4, desc="unet",
                          progress=progress, seed=seed, ema_decay=0.999, weight_decay=1e-2)
    return params, cfg, {"final": history[-1][1], "dataset": len(specs), "history": history[::4]}


def module_encode(vae_module, params, x):
    mean, logvar = vae_module.apply({"params": params}, x, method=vae_lib.AutoencoderKL.encode)
    return mean, jnp.exp(0.5 * logvar)


def build_pipeline(out: Path, clip_dir: Path, budget: Budget, seed: int, progress: bool) -> dict:
    """Train the VAE and UNet, and write the diffusers folder with the CLIP text tower."""
    t0 = time.perf_counter()
    vae_module, vae_params, vcfg, vae_report = train_vae(budget, seed, progress)
    vae_seconds = time.perf_counter() - t0
    text_module, text_params, text_cfg = clip_text.load_clip_text(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    schedule = NoiseSchedule.from_dict(tiny.scheduler_config("sd21"))
    unet_params, ucfg, unet_report = train_unet(vae_module, vae_params, vcfg, text_module, text_params,
                                                tokenizer, schedule, budget, seed, progress)
    with fsutil.atomic_dir(out, overwrite=True) as tmp:  # on disk: see store_half, KEEP_FLOAT32
        unet_lib.save_unet(unet_params, ucfg, tmp / "unet")
        vae_lib.save_vae(vae_params, vcfg, tmp / "vae")
        clip_text.save_clip_text(text_params, text_cfg, tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        io.write_json(tiny.scheduler_config("sd21"), tmp / "scheduler" / "scheduler_config.json")
        io.write_json(tiny.model_index("sd21"), tmp / "model_index.json")
    return {"vae": vae_report, "vae_seconds": round(vae_seconds, 1), "unet": unet_report,
            "unet_seconds": round(time.perf_counter() - t0 - vae_seconds, 1)}


# ---- quality gate ------------------------------------------------------------------------------

def quality_gate(pipeline_dir: Path, oracle_dir: Path, *, images_per_prompt: int = 4,
                 num_inference_steps: int = 25, guidance_scale: float = 5.0, seed: int = 0) -> dict:
    """Sample the base model on every held-out (colour, shape, scene) prompt and judge it.

    Returns per-attribute oracle accuracy (chance: colour 1/6, shape 1/5, scene 1/9) and n.
    """

    pipe = load_pipeline(pipeline_dir)
    judges = oracle_lib.load(oracle_dir)
    combos = sorted(world.HELD_OUT)
    specs = [world.Spec(shape, colour, scene) for colour, shape, scene in combos]
    prompts = [world.caption(s) for s in specs]
    images = pipe.generate(prompts, num_images_per_prompt=images_per_prompt, seed=seed,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    truth = [s for s in specs for _ in range(images_per_prompt)]
    verdict = judges.judge(images)
    acc = {k: float(np.mean([v == getattr(t, k) for v, t in zip(verdict[k], truth)]))
           for k in ("colour", "shape", "scene")}
    return {"accuracy": acc, "n": len(truth), "prompts": len(prompts),
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "images": images}


# Stored float32, not float16: transformers 5 loads a checkpoint in its stored dtype, so a float16
# text encoder breaks diffusers' default (float32 UNet/VAE) pipeline call, and a float16 ALIGN
# model its float32 processor pixels. (The pipeline's text encoder holds the CLIP text tower's
# float16 values, so float32 there changes no number.) CLIP runs in float16 and stays so.
KEEP_FLOAT32 = {"pipeline": ("text_encoder",), "align": (".",)}


def store_half(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Rewrite every float32 tensor of the safetensors files under ``folder`` as float16 (what
    ships: half the bytes; loaders cast back to float32), except in the subfolders ``keep``
    ("." for ``folder`` itself)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        if path.parent.relative_to(folder).as_posix() in keep:
            continue
        state, _ = io.load_state_dict(path.parent, (path.name[: -len(".safetensors")],))
        io.save_state_dict({k: v.astype(np.float16) if v.dtype == np.float32 else v
                            for k, v in state.items()}, path)


# ---- the job -----------------------------------------------------------------------------------

def pretrain(out_dir, *, scale: float = 1.0, seed: int = 0, progress: bool = True,
             stages: tuple[str, ...] = STAGES) -> dict:
    """Run (or resume) every stage into ``out_dir``; returns the report (also ``report.json``)."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget().scaled(scale)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(budget=dataclasses.asdict(budget), seed=seed, scale=scale)

    def stage(name: str, fn: Callable[[Path], dict]) -> None:
        if name not in stages:
            return
        target = out / name
        if (target / ".complete").is_file():
            log.info(f"[pretrain] {name}: done earlier, kept ({target})")
            return
        t0 = time.perf_counter()
        if name == "pipeline":  # writes its own folder atomically
            result = fn(target)
            store_half(target, KEEP_FLOAT32.get(name, ()))
        else:
            with fsutil.atomic_dir(target, overwrite=True) as tmp:
                result = fn(tmp)
                store_half(tmp, KEEP_FLOAT32.get(name, ()))
        (target / ".complete").touch()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report[name] = result
        io.write_json(report, report_path)
        log.info(f"[pretrain] {name}: {result['seconds']}s → {target}")

    stage("oracle", lambda d: train_oracle(d, budget, seed, progress))
    stage("clip", lambda d: train_clip(d, budget, seed, progress))
    stage("align", lambda d: train_align(d, budget, seed, progress))
    stage("pipeline", lambda d: build_pipeline(d, out / "clip", budget, seed, progress))
    stage("subject", lambda d: subject_lib.write_subject(d, seed=seed))
    if "gate" in stages:
        t0 = time.perf_counter()
        gate = quality_gate(out / "pipeline", out / "oracle",
                            images_per_prompt=budget.gate_images_per_prompt, seed=seed)
        images_lib.save_grid(gate.pop("images"), out / "gate.png", rows=len(world.HELD_OUT))
        gate["seconds"] = round(time.perf_counter() - t0, 1)
        report["gate"] = gate
        io.write_json(report, report_path)
        log.info(f"[pretrain] quality gate on {gate['prompts']} held-out prompts × "
              f"{budget.gate_images_per_prompt}: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in gate["accuracy"].items()))
    return report
