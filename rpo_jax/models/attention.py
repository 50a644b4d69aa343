"""Multi-head attention: the diffusers ``Attention`` layer and its interchangeable kernels.

The kernel is a config choice (``attention_impl``) because the fastest formulation differs by
backend (see the project's measured notes):
  'einsum'   plain softmax(q kᵀ / sqrt(d)) v; best for short sequences and on accelerators;
  'blocked'  query-block attention with a memory-lean custom VJP (see ``blocked_attention``);
             about 3x faster than 'einsum' for the backward pass of long (≥ 1024 token)
             self-attention on XLA:CPU;
  'dpa'      ``jax.nn.dot_product_attention`` (cuDNN's fused flash attention on NVIDIA GPUs for
             bfloat16 / float16 inputs, XLA's implementation elsewhere); computes in the inputs'
             dtype (no upcast), as PyTorch's SDPA does in diffusers;
  'auto'     on CPU: 'blocked' for self-attention longer than ``BLOCKED_MIN_LENGTH`` tokens, else
             'einsum'; on GPU: 'dpa' for unmasked attention; elsewhere (TPU): 'einsum'.
All kernels take q (B, Lq, H, D), k and v (B, Lk, H, D) and return (B, Lq, H, D).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rpo_jax.models import layers
from rpo_jax.models.blocked_attention import blocked_attention

ATTENTION_IMPLS = ("einsum", "blocked", "dpa", "auto")
BLOCKED_MIN_LENGTH = 512


def einsum_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                     upcast: bool = True, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """softmax(q kᵀ / sqrt(D) + mask) v.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D).
      upcast: compute scores and softmax in float32 (diffusers' ``upcast_attention`` /
        ``upcast_softmax``); the output is cast back to q's dtype.
      mask: optional additive mask broadcastable to (B, H, Lq, Lk).
    Returns: (B, Lq, H, D).
    """
    scale = q.shape[-1] ** -0.5
    compute_dtype = jnp.float32 if upcast else q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute_dtype), k.astype(compute_dtype)) * scale
    if mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def auto_impl(backend: str, query_length: int, masked: bool) -> str:
    """The kernel 'auto' picks (see the module docstring)."""
    if backend == "cpu":
        return "blocked" if (not masked and query_length >= BLOCKED_MIN_LENGTH) else "einsum"
    return "dpa" if (backend in ("gpu", "cuda", "rocm") and not masked) else "einsum"


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, impl: str = "auto",
                          upcast: bool = True, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Dispatch to the kernel named ``impl`` (one of ``ATTENTION_IMPLS``); shapes as above."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = auto_impl(jax.default_backend(), q.shape[1], mask is not None)
    if impl == "dpa":
        bias = None if mask is None else jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                            bias=None if bias is None else bias.astype(q.dtype))
    if impl == "blocked":
        if mask is not None:
            raise ValueError("attention_impl='blocked' does not take a mask; use 'einsum'")
        out_dtype = q.dtype
        if upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        return blocked_attention(q, k, v).astype(out_dtype)
    return einsum_attention(q, k, v, upcast=upcast, mask=mask)


class Attention(nn.Module):
    """diffusers' ``Attention`` (self- or cross-attention), channels-last.

    Parameters: to_q, to_k, to_v (bias per ``qkv_bias``), to_out_0 (with bias), and, for the VAE's
    spatial attention, an optional ``group_norm`` before the projections.

    Attributes:
      heads: number of heads; dim_head: width of each; the fused width is heads * dim_head.
      out_features: output width (the query width).
      residual: add the input to the output (the VAE mid-block attention does).
    """
    heads: int
    dim_head: int
    out_features: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    residual: bool = False
    upcast: bool = False
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: (B, L, Cq); context: (B, Lk, Ck) for cross-attention, else None. Returns (B, L, out)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        if self.norm_groups is not None:
            x = layers.group_norm(self.norm_groups, self.norm_eps, name="group_norm", **kw)(x)
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = layers.dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = layers.dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = layers.dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_v", **kw)(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        out = dot_product_attention(split(q), split(k), split(v), impl=self.impl, upcast=self.upcast)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = layers.dense(self.out_features, ("heads", "embed"), name="to_out_0", **kw)(out)
        return out + residual if self.residual else out
