"""The query-block attention kernel (``rpo_jax.models.blocked_attention``) against einsum attention.

Correctness only, on small shapes; timings live in ``launch/bench_attention.py``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.models.attention import dot_product_attention, einsum_attention
from rpo_jax.models.blocked_attention import DEFAULT_BLOCK_SIZE, blocked_attention


def _inputs(b, lq, lk, h, d, seed=0, dtype=jnp.float32):
    kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, lq, h, d), jnp.float32)
    k = jax.random.normal(kk, (b, lk, h, d), jnp.float32)
    v = jax.random.normal(kv, (b, lk, h, d), jnp.float32)
    w = jax.random.normal(kw, (b, lq, h, d), jnp.float32)  # weights of the scalar loss
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def _reference(q, k, v):
    """Plain softmax(q kᵀ / sqrt(D)) v in the inputs' dtype (no upcast), via autodiff-able einsums."""
    return einsum_attention(q, k, v, upcast=False)


def _grads(attn, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_grads_close(got, want, rtol=1e-5):
    for name, g, r in zip("qkv", got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert g.shape == r.shape, name
        err = np.max(np.abs(g - r)) / np.max(np.abs(r))
        assert err < rtol, f"d{name}: relative error {err:.2e}"


# (B, Lq, Lk, H, D, block_size): self-attention with Lq a multiple of the block, cross-attention
# with the text encoder's 77 keys, Lq not a multiple of the block, Lq smaller than one block.
SHAPES = [
    (2, 128, 128, 2, 8, 32),
    (2, 256, 256, 3, 16, 64),
    (2, 64, 77, 4, 8, 32),
    (1, 100, 100, 2, 8, 32),
    (2, 90, 77, 2, 40, 32),
    (1, 20, 50, 1, 4, 32),
    (1, 33, 33, 2, 8, 16),
]


@pytest.mark.parametrize("b,lq,lk,h,d,block", SHAPES)
def test_matches_einsum(b, lq, lk, h, d, block):
    q, k, v, w = _inputs(b, lq, lk, h, d, seed=1)
    out, vjp = jax.vjp(lambda q, k, v: blocked_attention(q, k, v, block), q, k, v)
    ref, ref_vjp = jax.vjp(_reference, q, k, v)
    assert out.shape == (b, lq, h, d) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)
    _assert_grads_close(vjp(w), ref_vjp(w))


def test_default_block_size_and_large_logits():
    # Scaled-up inputs give peaked softmaxes (logits ~ 100); the lse-based recomputation must not
    # overflow, and the default block size must handle Lq = 3 blocks + 5.
    q, k, v, w = _inputs(1, 3 * DEFAULT_BLOCK_SIZE + 5, 64, 2, 8, seed=2)
    q, k = q * 6.0, k * 6.0
    out = blocked_attention(q, k, v)
    # fp32 rounding of logits this size (|s| up to ~180) alone moves the output by ~5e-6, so
    # compare against a float64 softmax rather than against the fp32 einsum.
    q64, k64, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    ref64 = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref64, atol=2e-5, rtol=0)
    got = _grads(blocked_attention, q, k, v, w)
    want = _grads(_reference, q, k, v, w)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in got)
    _assert_grads_close(got, want, rtol=2e-5)


def test_under_jit():
    q, k, v, w = _inputs(2, 96, 96, 2, 8, seed=3)
    fwd = jax.jit(blocked_attention, static_argnames="block_size")
    np.testing.assert_allclose(np.asarray(fwd(q, k, v, block_size=32)),
                               np.asarray(_reference(q, k, v)), atol=2e-6, rtol=0)
    grad = jax.jit(lambda q, k, v: _grads(lambda *a: blocked_attention(*a, 32), q, k, v, w))
    _assert_grads_close(grad(q, k, v), _grads(_reference, q, k, v, w))


def test_batch_elements_are_independent():
    # The batch axis is handled natively (no vmap): each element equals a batch-of-one call.
    q, k, v, _ = _inputs(3, 64, 48, 2, 8, seed=4)
    out = blocked_attention(q, k, v, 32)
    for i in range(3):
        single = blocked_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], 32)
        np.testing.assert_allclose(np.asarray(out[i:i + 1]), np.asarray(single), atol=1e-6, rtol=0)


def test_second_call_with_other_block_size_recompiles_cleanly():
    q, k, v, w = _inputs(1, 64, 64, 1, 8, seed=5)
    a = _grads(lambda *t: blocked_attention(*t, 16), q, k, v, w)
    b = _grads(lambda *t: blocked_attention(*t, 64), q, k, v, w)
    _assert_grads_close(a, b)


def test_bfloat16_runs_and_stays_close():
    q, k, v, w = _inputs(2, 80, 80, 2, 16, seed=6, dtype=jnp.bfloat16)
    out = blocked_attention(q, k, v, 32)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    ref = einsum_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 5e-2
    got = _grads(lambda *t: blocked_attention(*t, 32), q, k, v, w)
    want = _grads(einsum_attention, *(t.astype(jnp.float32) for t in (q, k, v)), w)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        g, r = np.asarray(g, np.float32), np.asarray(r)
        assert np.all(np.isfinite(g))
        assert np.max(np.abs(g - r)) / np.max(np.abs(r)) < 5e-2


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(1, 16, 16, 2, 8)
    with pytest.raises(ValueError):
        blocked_attention(q, k[..., :4], v)
    with pytest.raises(ValueError):
        blocked_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError):
        blocked_attention(q, k, v, block_size=0)


def test_dispatch_uses_blocked_kernel():
    # dot_product_attention(impl='blocked', upcast=True) upcasts, runs the kernel, casts back.
    q, k, v, w = _inputs(1, 64, 64, 2, 8, seed=7)
    out = dot_product_attention(q, k, v, impl="blocked", upcast=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v)), atol=2e-6, rtol=0)
    got = _grads(lambda *t: dot_product_attention(*t, impl="blocked"), q, k, v, w)
    _assert_grads_close(got, _grads(_reference, q, k, v, w))
