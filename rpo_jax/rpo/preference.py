"""RPO's preference data: negatives from the frozen base model, their rewards, and pair labels.

For a subject (3-6 reference photos, a class noun, live or object) RPO samples K images for each
of 8 novel training prompts with the frozen base pipeline (DDIM + CFG) and scores every negative
g (with its prompt p) and every reference y (against every prompt) with the λ-Harmonic reward at
λ_train (default 0: text alignment only; the identifier is kept in label prompts):

  r_gen[g] = r(g, p_g; R)          r_ref[y, p] = r(y, p; R)

Every (reference, negative) combination is a training pair; its label ℓ ~ Bernoulli(σ(r_ref −
r_gen)) (ℓ = 1: the reference is preferred) is drawn on device, fresh each time the pair is used
(:func:`draw_labels`), or set to the probability itself in 'soft' mode.

On disk (``WORKDIR/negatives/``)::

    manifest.json         settings, fingerprint, prompts, rewards, per-image seeds, label stats
    references/NN.png     the reference photos as scored and trained on (square, model resolution)
    images/PP-KK.png      negative KK of training prompt PP

A re-run with the same settings (same pipeline files, reward model, photos, sampler settings)
reuses the folder; any changed setting regenerates it. The folder is replaced atomically.

DreamBooth with prior preservation (``objective.mode='dreambooth'``) trains on class images
instead of negatives: N images the frozen base model samples from the class prompt ("a photo of a
{class}") with the same fixed-noise sampler (image j from seed ``prior.seed``, prompt 0, image j),
made by the same machinery (:func:`generate_class_images`: manifest, fingerprint, reuse,
atomic replacement) in ``WORKDIR/class_images/`` (manifest.json, images/NNNN.png).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rpo_jax.core import distributed, fsutil, images as images_lib, logs
from rpo_jax.reward import harmonic as reward_lib
from rpo_jax.rpo.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, REFERENCE_PROMPT
from rpo_jax.sd.sampling import NOISE, sample_image_sets

log = logs.get_logger(__name__)

MANIFEST_VERSION = 2  # 2: negatives use the shared fixed-noise sampler (seed, prompt, image)
NEGATIVES_DIR = "negatives"
CLASS_IMAGES_DIR = "class_images"
CLASS_PROMPT = "a photo of a {cls}"  # DreamBooth's class prompt (template of prior.prompt)


class DualEncoderLike(Protocol):
    """What the reward needs from ALIGN / CLIP (see rpo_jax.reward.encoders.DualEncoder)."""

    def embed_images(self, images: Any) -> jnp.ndarray: ...  # (N, D), L2-normalised

    def embed_texts(self, texts: Sequence[str]) -> jnp.ndarray: ...  # (N, D), L2-normalised


@dataclasses.dataclass(frozen=True)
class Subject:
    """A subject to personalise: reference photos, class noun, and whether it is alive."""
    name: str
    class_noun: str
    live: bool
    reference_dir: Path
    identifier: str = reward_lib.IDENTIFIER
    prompt_templates: tuple[str, ...] = ()   # () → the paper's 8 for the subject kind
    reference_template: str = ""             # "" → REFERENCE_PROMPT

    def format(self, template: str) -> str:
        """A prompt template with {identifier} and {cls} filled in."""
        return template.format(identifier=self.identifier, cls=self.class_noun)

    def training_prompts(self) -> list[str]:
        """The training prompts (by default the paper's 8 novel prompts), with the identifier."""
        templates = self.prompt_templates or (LIVE_PROMPTS if self.live else OBJECT_PROMPTS)
        return [self.format(t) for t in templates]

    def reference_prompt(self) -> str:
        return self.format(self.reference_template or REFERENCE_PROMPT)


# ---- rewards and labels ---------------------------------------------------------------------

def score(encoder: DualEncoderLike, negatives: np.ndarray, negative_prompt_index: np.ndarray,
          references: np.ndarray, prompts: Sequence[str], lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(r_gen (Nn,), r_ref (Nr, P)) with the λ-Harmonic reward at ``lam``.

    negatives (Nn, H, W, 3) and references (Nr, H, W, 3) are uint8 images;
    negative_prompt_index (Nn,) indexes ``prompts``.
    """
    ref = encoder.embed_images(references)
    neg = encoder.embed_images(negatives)
    txt = encoder.embed_texts(list(prompts))
    r_gen = reward_lib.lambda_harmonic_reward(neg, ref, txt[np.asarray(negative_prompt_index)], lam)
    # every reference against every prompt: (Nr, P)
    r_ref = jax.vmap(lambda t: reward_lib.lambda_harmonic_reward(
        ref, ref, jnp.broadcast_to(t, ref.shape), lam), out_axes=1)(txt)
    return np.asarray(r_gen, np.float64), np.asarray(r_ref, np.float64)


def pair_probabilities(r_ref: jnp.ndarray, r_gen: jnp.ndarray,
                       negative_prompt_index: jnp.ndarray) -> jnp.ndarray:
    """p[i, j] = σ(r_ref[i, prompt(j)] − r_gen[j]): (Nr, P), (Nn,), (Nn,) → (Nr, Nn)."""
    return jax.nn.sigmoid(jnp.take(r_ref, negative_prompt_index, axis=1) - r_gen[None, :])


LABEL_MODES = ("sampled", "soft")


def check_label_mode(mode: str, name: str = "labels.mode") -> str:
    """``mode`` if it is one of :data:`LABEL_MODES`; else ValueError naming ``name``."""
    if mode not in LABEL_MODES:
        raise ValueError(f"{name} must be one of {list(LABEL_MODES)}, got {mode!r}")
    return mode


def draw_labels(key: jax.Array, probabilities: jnp.ndarray, mode: str = "sampled") -> jnp.ndarray:
    """Labels for pairs with preference probabilities p (any shape), float32.

    'sampled': ℓ ~ Bernoulli(p), fresh for every key (use ``fold_in(key, step)``);
    'soft': ℓ = p (the expected label; a lower-variance variant, not the paper's).
    """
    if check_label_mode(mode, "label mode") == "sampled":
        return jax.random.bernoulli(key, probabilities).astype(jnp.float32)
    return jnp.asarray(probabilities, jnp.float32)


# ---- fingerprints ---------------------------------------------------------------------------

SAMPLE_BYTES = 1 << 20  # folder_fingerprint hashes this much at the start and end of each file


def _file_digest(path: Path, sample: int | None = None) -> str:
    """sha256 of the file's bytes (with ``sample``: of its size and its first and last
    ``sample`` bytes); an unreadable file is an :class:`rpo_jax.core.images.ImageError`-style
    one-line ValueError naming it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if sample is None:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                size = os.fstat(f.fileno()).st_size
                h.update(str(size).encode())
                h.update(f.read(sample))
                if size > sample:
                    f.seek(max(sample, size - sample))
                    h.update(f.read(sample))
    except OSError as e:
        raise images_lib.ImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    return h.hexdigest()


def folder_fingerprint(folder: str | os.PathLike) -> list:
    """Identity of a model folder by content, not place: every file's path relative to
    ``folder`` and a digest of its size, first and last MiB. A copied or moved folder (or a
    workdir holding its ``tiny:`` assets) keeps its fingerprint; changed weights change it."""
    folder = Path(folder)
    return sorted([p.relative_to(folder).as_posix(), _file_digest(p, SAMPLE_BYTES)]
                  for p in folder.rglob("*") if p.is_file() and p.name != ".complete")


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def reusable_manifest(out_dir: Path, fp: str, file_lists: Sequence[str]) -> dict | None:
    """The manifest in ``out_dir`` when it has fingerprint ``fp`` and every file its
    ``file_lists`` entries name exists (a folder made with the same settings); else None."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    files = [out_dir / r["file"] for key in file_lists for r in old.get(key, [])]
    if old.get("fingerprint") == fp and files and all(f.is_file() for f in files):
        return old
    return None


# ---- generation -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NegativesSettings:
    """What determines the negatives; any change regenerates them."""
    k: int = 4
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    lambda_train: float = 0.0
    resolution: int = 0  # 0: the pipeline's default resolution
    batch_size: int = 8

    def check(self) -> None:
        for name in ("k", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"negatives.{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        reward_lib.check_lambda(self.lambda_train, "reward.lambda_train")


def generate_negatives(pipe, encoder: DualEncoderLike, subject: Subject, workdir: str | os.PathLike,
                       settings: NegativesSettings, *, identity: dict | None = None, mesh=None,
                       progress: bool = True) -> dict:
    """Create (or reuse) ``workdir/negatives`` for ``subject``; returns the manifest dict.

    Args:
      pipe: the frozen base :class:`rpo_jax.sd.pipeline.StableDiffusion`.
      encoder: the reward's dual encoder.
      identity: JSON-able description of the pipeline and reward model (their
        :func:`folder_fingerprint`: content, not place), part of the fingerprint so changed
        weights regenerate and a moved workdir reuses its negatives.
      mesh: optional device mesh; sampling batches are sharded over its 'data' (and 'fsdp') axes.
    """
    settings.check()
    out_dir = Path(workdir).absolute() / NEGATIVES_DIR
    resolution = settings.resolution or pipe.default_resolution
    ref_paths = images_lib.list_images(subject.reference_dir)
    prompts = subject.training_prompts()
    fp_settings = {
        "version": MANIFEST_VERSION,
        "settings": dataclasses.asdict(settings) | {"resolution": resolution},
        "subject": {"class_noun": subject.class_noun, "live": subject.live,
                    "identifier": subject.identifier, "prompts": prompts,
                    "reference_prompt": subject.reference_prompt()},
        "references": [[p.name, _file_digest(p)] for p in ref_paths],
        "identity": identity or {},
    }
    fp = fingerprint(fp_settings)
    # Several processes: all read the folder as it is now (no process writes it before the
    # sampling they all take part in), so they agree on reusing or sampling.
    distributed.barrier(f"negatives checked {out_dir}")
    old = reusable_manifest(out_dir, fp, ("references", "negatives"))
    if old is not None:
        if progress:
            log.info(f"[negatives] reusing {len(old['negatives'])} negatives in {out_dir} "
                     "(same settings)")
        return old

    t0 = time.perf_counter()
    references, _ = images_lib.load_reference_images(subject.reference_dir, size=resolution)
    prompt_index = np.repeat(np.arange(len(prompts)), settings.k)
    negatives = sample_image_sets(
        pipe, pipe.unet_params, prompts, num_images=settings.k,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        seed=settings.seed, negative_prompt=settings.negative_prompt, resolution=resolution,
        batch_size=settings.batch_size, mesh=mesh, progress=progress, desc="negatives")
    negatives = negatives.reshape((-1,) + negatives.shape[2:])
    t_sample = time.perf_counter() - t0
    r_gen, r_ref = score(encoder, negatives, prompt_index, references, prompts, settings.lambda_train)
    t_score = time.perf_counter() - t0 - t_sample
    probs = np.asarray(pair_probabilities(jnp.asarray(r_ref), jnp.asarray(r_gen),
                                          jnp.asarray(prompt_index)))
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "fingerprint_inputs": fp_settings,
        "subject": {"name": subject.name, "class_noun": subject.class_noun, "live": subject.live,
                    "reference_dir": str(Path(subject.reference_dir).absolute())},
        "identifier": subject.identifier,
        "reference_prompt": subject.reference_prompt(),
        "prompts": prompts,
        "resolution": resolution,
        "noise": NOISE,
        "references": [{"file": f"references/{i:02d}.png", "source": str(p.absolute()),
                        "rewards": [float(r) for r in r_ref[i]]} for i, p in enumerate(ref_paths)],
        "negatives": [{"file": f"images/{p:02d}-{i % settings.k:02d}.png", "prompt": prompts[p],
                       "prompt_index": int(p), "seed": settings.seed, "index": int(i),
                       "reward": float(r_gen[i])} for i, p in enumerate(prompt_index)],
        "label_probability": {"min": float(probs.min()), "mean": float(probs.mean()),
                              "max": float(probs.max()), "pairs": int(probs.size)},
        "reward_stats": {"r_gen_mean": float(r_gen.mean()), "r_ref_mean": float(r_ref.mean())},
        "seconds": {"sample": round(t_sample, 2), "score": round(t_score, 2)},
    }
    with fsutil.atomic_dir(out_dir, overwrite=True) as tmp:
        (tmp / "references").mkdir()
        (tmp / "images").mkdir()
        for rec, image in zip(manifest["references"], references):
            Image.fromarray(image).save(tmp / rec["file"])
        for rec, image in zip(manifest["negatives"], negatives):
            Image.fromarray(image).save(tmp / rec["file"])
        fsutil.write_json(manifest, tmp / "manifest.json")
    distributed.barrier(f"negatives written {out_dir}")  # process 0 wrote them; the others read
    return manifest


@dataclasses.dataclass(frozen=True)
class ClassImagesSettings:
    """What determines DreamBooth's class images; any change regenerates them."""
    num_images: int = 200        # N (diffusers' DreamBooth script: 200; the paper's DreamBooth ~1000)
    prompt: str = CLASS_PROMPT   # template with {cls}
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    resolution: int = 0  # 0: the pipeline's default resolution
    batch_size: int = 8

    def check(self) -> None:
        for name in ("num_images", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                key = "prior.num_images" if name == "num_images" else f"negatives.{name}"
                raise ValueError(f"{key} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        self.class_prompt("class")

    def class_prompt(self, class_noun: str) -> str:
        """The prompt template filled with the class noun ("a photo of a dog")."""
        try:
            prompt = self.prompt.format(cls=class_noun)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"config key 'prior.prompt': template {self.prompt!r} may only use "
                             f"{{cls}} ({e!r})") from e
        if not prompt.strip():
            raise ValueError("config key 'prior.prompt' is empty")
        return prompt


def generate_class_images(pipe, class_noun: str, workdir: str | os.PathLike,
                          settings: ClassImagesSettings, *, identity: dict | None = None,
                          mesh=None, progress: bool = True) -> dict:
    """Create (or reuse) ``workdir/class_images``: ``settings.num_images`` samples of the frozen
    base pipeline ``pipe`` for the class prompt, image j from :func:`initial_noise` (seed, 0, j)
    (:func:`rpo_jax.sd.sampling.sample_image_sets`, as the negatives); returns the manifest.

    ``identity``: JSON-able description of the pipeline (its :func:`folder_fingerprint`), part of
    the fingerprint with the class prompt, N, seed and sampler settings: any change regenerates
    the folder (replaced atomically, never half-written); an unchanged one is reused.
    """
    settings.check()
    out_dir = Path(workdir).absolute() / CLASS_IMAGES_DIR
    resolution = settings.resolution or pipe.default_resolution
    prompt = settings.class_prompt(class_noun)
    fp_settings = {"version": MANIFEST_VERSION, "kind": "class_images",
                   "settings": dataclasses.asdict(settings) | {"resolution": resolution},
                   "class_prompt": prompt, "identity": identity or {}}
    fp = fingerprint(fp_settings)
    distributed.barrier(f"class images checked {out_dir}")  # as in generate_negatives
    old = reusable_manifest(out_dir, fp, ("images",))
    if old is not None:
        if progress:
            log.info(f"[class images] reusing {len(old['images'])} class images in {out_dir} "
                     "(same settings)")
        return old
    t0 = time.perf_counter()
    images = sample_image_sets(
        pipe, pipe.unet_params, [prompt], num_images=settings.num_images,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        seed=settings.seed, negative_prompt=settings.negative_prompt, resolution=resolution,
        batch_size=settings.batch_size, mesh=mesh, progress=progress, desc="class images")[0]
    manifest = {
        "version": MANIFEST_VERSION, "fingerprint": fp, "fingerprint_inputs": fp_settings,
        "class_noun": class_noun, "prompt": prompt, "resolution": resolution, "noise": NOISE,
        "images": [{"file": f"images/{j:04d}.png", "seed": settings.seed, "prompt_index": 0,
                    "index": j} for j in range(len(images))],
        "seconds": {"sample": round(time.perf_counter() - t0, 2)},
    }
    with fsutil.atomic_dir(out_dir, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        for rec, image in zip(manifest["images"], images):
            Image.fromarray(image).save(tmp / rec["file"])
        fsutil.write_json(manifest, tmp / "manifest.json")
    distributed.barrier(f"class images written {out_dir}")  # process 0 wrote them; the others read
    log.info(f"[class images] {len(images)} images of {prompt!r} in {out_dir} "
             f"({manifest['seconds']['sample']} s)")
    return manifest


def _read_manifest(folder: Path, remedy: str) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {folder.name} data: {path} does not exist ({remedy})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete {folder} to make it again") from e


def _load_images(folder: Path, records: Sequence[dict]) -> np.ndarray:
    return np.stack([images_lib.load_image(folder / r["file"]) for r in records])


@dataclasses.dataclass
class PreferenceData:
    """The preference data of a workdir as arrays, ready to cache latents and draw pairs.

    references (Nr, H, W, 3) uint8; negatives (Nn, H, W, 3) uint8; negative_prompt_index (Nn,);
    r_ref (Nr, P); r_gen (Nn,); prompts (P,); reference_prompt; negative_prompts: the prompts
    negative_prompt_index points into (RPO: the training prompts).

    DreamBooth mode (:meth:`from_class_images`): the "negatives" are the N class images, all with
    the class prompt (negative_prompts = [class prompt]), and there are no rewards (r_ref, r_gen
    zeros, unused); references, prompts and reference prompt are as RPO's (validation uses them).
    """
    references: np.ndarray
    negatives: np.ndarray
    negative_prompt_index: np.ndarray
    r_ref: np.ndarray
    r_gen: np.ndarray
    prompts: list[str]
    reference_prompt: str
    manifest: dict
    negative_prompts: list[str] | None = None  # None: the training prompts

    def __post_init__(self):
        if self.negative_prompts is None:
            self.negative_prompts = list(self.prompts)

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> "PreferenceData":
        folder = Path(workdir) / NEGATIVES_DIR
        manifest = _read_manifest(folder, "run `rpo-jax negatives` first")
        load = lambda recs: _load_images(folder, recs)
        return cls(
            references=load(manifest["references"]),
            negatives=load(manifest["negatives"]),
            negative_prompt_index=np.array([r["prompt_index"] for r in manifest["negatives"]]),
            r_ref=np.array([r["rewards"] for r in manifest["references"]], np.float32),
            r_gen=np.array([r["reward"] for r in manifest["negatives"]], np.float32),
            prompts=list(manifest["prompts"]),
            reference_prompt=manifest["reference_prompt"],
            manifest=manifest,
        )

    @classmethod
    def from_class_images(cls, workdir: str | os.PathLike, subject: Subject) -> "PreferenceData":
        """DreamBooth's training data: the subject's photos (resized to the class images'
        resolution, as the negatives' references are) and ``workdir/class_images``."""
        folder = Path(workdir) / CLASS_IMAGES_DIR
        manifest = _read_manifest(folder, "it is made by `rpo-jax train` with objective.mode=dreambooth")
        references, _ = images_lib.load_reference_images(subject.reference_dir, size=manifest["resolution"])
        class_images = _load_images(folder, manifest["images"])
        n = len(class_images)
        return cls(references=references, negatives=class_images,
                   negative_prompt_index=np.zeros(n, np.int64),
                   r_ref=np.zeros((len(references), 1), np.float32), r_gen=np.zeros(n, np.float32),
                   prompts=subject.training_prompts(), reference_prompt=subject.reference_prompt(),
                   manifest=manifest, negative_prompts=[manifest["prompt"]])

    @property
    def num_pairs(self) -> int:
        return len(self.references) * len(self.negatives)

    def pair(self, index: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Pair number(s) → (reference index, negative index); pairs enumerate all Nr × Nn."""
        return np.divmod(np.asarray(index), len(self.negatives))

    def probabilities(self) -> jnp.ndarray:
        """(Nr, Nn) σ(r_ref − r_gen) for every pair."""
        return pair_probabilities(jnp.asarray(self.r_ref), jnp.asarray(self.r_gen),
                                  jnp.asarray(self.negative_prompt_index))


def check_config(config) -> None:
    """Fail early, naming the key, on values the preference-data job cannot use."""
    reward_lib.check_lambda(config.reward.lambda_train, "reward.lambda_train")
    reward_lib.check_lambda(config.reward.lambda_val, "reward.lambda_val")
    check_label_mode(config.labels.mode, "labels.mode")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
    if not config.subject.class_noun.strip():
        raise ValueError("subject.class_noun is empty")
    negatives_settings(config).check()
    class_images_settings(config).check()
    refresh = config.negatives.refresh_every
    if not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 0:
        raise ValueError(f"negatives.refresh_every must be an int >= 0 (0: off), got {refresh!r}")
    if refresh and config.objective.mode != "rpo":
        raise ValueError(f"negatives.refresh_every={refresh} (online RPO) needs objective.mode='rpo', "
                         f"got {config.objective.mode!r}")


def class_images_settings(config) -> ClassImagesSettings:
    """DreamBooth's class images: ``prior.*``, sampled like the negatives (``negatives.*``)."""
    p, n = config.prior, config.negatives
    if not isinstance(p.num_images, int) or isinstance(p.num_images, bool):
        raise ValueError(f"prior.num_images must be an int >= 1, got {p.num_images!r}")
    return ClassImagesSettings(num_images=p.num_images, prompt=p.prompt, seed=p.seed,
                               num_inference_steps=n.num_inference_steps,
                               guidance_scale=n.guidance_scale, negative_prompt=n.negative_prompt,
                               resolution=config.resolution, batch_size=n.batch_size)


def negatives_settings(config) -> NegativesSettings:
    n = config.negatives
    return NegativesSettings(k=n.k, seed=n.seed, num_inference_steps=n.num_inference_steps,
                             guidance_scale=n.guidance_scale, negative_prompt=n.negative_prompt,
                             lambda_train=config.reward.lambda_train, resolution=config.resolution,
                             batch_size=n.batch_size)


def subject_from_config(config, reference_dir: Path) -> Subject:
    """The config's ``subject`` section as a :class:`Subject` (prompt templates checked)."""
    s = config.subject
    subject = Subject(s.name, s.class_noun, bool(s.live), reference_dir, s.identifier,
                      tuple(s.prompts), s.reference_prompt)
    for key, templates in (("subject.prompts", subject.prompt_templates),
                           ("subject.reference_prompt", (subject.reference_template,))):
        for t in templates:
            try:
                subject.format(t)
            except (KeyError, IndexError) as e:
                raise ValueError(f"config key {key!r}: template {t!r} may only use {{identifier}} "
                                 f"and {{cls}} ({e})") from e
    return subject
