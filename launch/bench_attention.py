"""Benchmark attention kernels: einsum vs blocked (custom VJP) vs torch SDPA, forward and fwd+bwd.

Usage:
  python launch/bench_attention.py                       # the three default shapes
  python launch/bench_attention.py --shape 2,1024,8,40 --runs 10 --block-size 64

Each shape is B,L,H,D (self-attention, Lq = Lk = L).  Every function is jitted and run ``--warmup``
times before the median of ``--runs`` timed runs is reported in milliseconds.  fwd+bwd is
``jax.grad`` of ``sum(out * w)`` with respect to q, k and v (for torch, ``out.backward(w)``).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from rpo_jax.models.attention import einsum_attention
from rpo_jax.models.blocked_attention import DEFAULT_BLOCK_SIZE, blocked_attention

DEFAULT_SHAPES = ("4,1024,4,8", "2,1024,8,40", "2,4096,5,64")


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be B,L,H,D; got {text!r}")
    return parts


def _process_cpu_time() -> float:
    """User + system CPU seconds of this process, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


CLOCKS = {"wall": time.perf_counter, "cpu": _process_cpu_time}
_clock = CLOCKS["wall"]


def _median_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = _clock()
        fn()
        times.append((_clock() - t0) * 1e3)
    return statistics.median(times)


def _bench_jax(attn, q, k, v, w, warmup, runs):
    fwd = jax.jit(attn)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2)))
    fwd_ms = _median_ms(lambda: fwd(q, k, v).block_until_ready(), warmup, runs)
    bwd_ms = _median_ms(lambda: jax.block_until_ready(grad(q, k, v)), warmup, runs)
    return fwd_ms, bwd_ms


def _bench_torch(q, k, v, w, warmup, runs):
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    # (B, L, H, D) → (B, H, L, D), contiguous, as SDPA expects.
    conv = lambda x: torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous()
    tq, tk, tv, tw = (conv(x) for x in (q, k, v, w))

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv)

    leaves = [t.detach().requires_grad_(True) for t in (tq, tk, tv)]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        F.scaled_dot_product_attention(*leaves).backward(tw)

    return _median_ms(fwd, warmup, runs), _median_ms(fwd_bwd, warmup, runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=_parse_shape,
                        help="B,L,H,D (repeatable); default: " + " ".join(DEFAULT_SHAPES))
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip torch SDPA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="'wall' (default) or 'cpu': process CPU time summed over threads, "
                             "steadier than wall time on a shared machine but blind to parallelism")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    shapes = args.shape or [_parse_shape(s) for s in DEFAULT_SHAPES]

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; block_size={args.block_size}; "
          f"median of {args.runs} runs after {args.warmup} warmup; {args.clock} ms; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    header = (f"{'shape (B,L,H,D)':<18} {'einsum fwd':>10} {'blocked fwd':>11} {'sdpa fwd':>9} | "
              f"{'einsum f+b':>10} {'blocked f+b':>11} {'sdpa f+b':>9} | {'max |Δ|':>8}")
    print(header)
    print("-" * len(header))
    blocked = lambda q, k, v: blocked_attention(q, k, v, args.block_size)
    for b, l, h, d in shapes:
        keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
        q, k, v, w = (jax.random.normal(key, (b, l, h, d), jnp.float32) for key in keys)
        err = float(jnp.max(jnp.abs(jax.jit(blocked)(q, k, v) - jax.jit(einsum_attention)(q, k, v))))
        e_f, e_fb = _bench_jax(einsum_attention, q, k, v, w, args.warmup, args.runs)
        b_f, b_fb = _bench_jax(blocked, q, k, v, w, args.warmup, args.runs)
        t = None if args.no_torch else _bench_torch(q, k, v, w, args.warmup, args.runs)
        t_f, t_fb = (f"{t[0]:9.1f}", f"{t[1]:9.1f}") if t else (f"{'n/a':>9}", f"{'n/a':>9}")
        print(f"{f'{b},{l},{h},{d}':<18} {e_f:10.1f} {b_f:11.1f} {t_f} | "
              f"{e_fb:10.1f} {b_fb:11.1f} {t_fb} | {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
