"""Time the λ-Harmonic reward: score N generated images against references and prompts.

Reports, per dual encoder (random tiny ALIGN / CLIP, or real folders via --align/--clip), the
median wall time of: host preprocessing (PIL resize/crop, as transformers), image embedding,
text embedding, and the whole reward (embeddings + r_λ), after a warm-up call that compiles.

  python launch/bench_reward.py --num-images 32 --image-size 512
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np


def _median_ms(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    from rpo_jax.reward import encoders, harmonic as reward
    from rpo_jax.testing import tiny_encoders

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512, help="side of the generated images")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--align", default=None, help="an ALIGN folder (default: random tiny)")
    parser.add_argument("--clip", default=None, help="a CLIP folder (default: random tiny)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp()
    folders = {"align": args.align or tiny_encoders.make_tiny_align(f"{tmp}/align"),
               "clip": args.clip or tiny_encoders.make_tiny_clip(f"{tmp}/clip")}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    refs = images[:4]
    prompts = [f"a [V] toy on the Moon {i % 8}" for i in range(args.num_images)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.num_images} images of "
          f"{args.image_size}px; median of {args.runs} runs after one warm-up")
    print(f"{'encoder':8} {'preprocess':>11} {'embed img':>10} {'embed txt':>10} {'reward':>8}  (ms)")
    for kind, folder in folders.items():
        enc = encoders.load_dual_encoder(folder)

        def score():
            img = enc.embed_images(images)
            ref = enc.embed_images(refs)
            txt = enc.embed_texts(prompts)
            return reward.lambda_harmonic_reward(img, ref, txt, 0.5)

        score()  # compile
        pre = _median_ms(lambda: enc.preprocess(images), args.runs)
        pixels = enc.preprocess(images)
        emb = _median_ms(lambda: enc._batched(lambda p, c: enc._image_fn(p, c["x"]), {"x": pixels}), args.runs)
        txt = _median_ms(lambda: enc.embed_texts(prompts), args.runs)
        total = _median_ms(score, args.runs)
        print(f"{kind:8} {pre:11.1f} {emb:10.1f} {txt:10.1f} {total:8.1f}")


if __name__ == "__main__":
    main()
