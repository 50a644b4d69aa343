"""λ-Harmonic reward against a NumPy reference of the paper's definition (Miao et al. 2024)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.reward import harmonic as reward


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_reward(img, refs, txt, lam):
    s_img = np.array([np.mean([(np.dot(x, y) + 1) / 2 for y in refs]) for x in img])
    s_txt = np.array([(np.dot(x, t) + 1) / 2 for x, t in zip(img, txt)])
    return 1.0 / (lam / (s_img + 1e-8) + (1 - lam) / (s_txt + 1e-8)), s_img, s_txt


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_matches_numpy_reference(lam):
    rng = np.random.default_rng(0)
    img, refs, txt = (_unit(rng.standard_normal(s)) for s in [(6, 16), (4, 16), (6, 16)])
    expected, s_img, s_txt = _numpy_reward(img, refs, txt, lam)
    got = jax.jit(reward.lambda_harmonic_reward)(img, refs, txt, lam)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(reward.image_similarity(img, refs), s_img, rtol=1e-6)
    np.testing.assert_allclose(reward.text_similarity(img, txt), s_txt, rtol=1e-6)
    if lam == 0.0:
        np.testing.assert_allclose(got, s_txt, rtol=1e-5)  # λ=0 is text alignment alone
    if lam == 1.0:
        np.testing.assert_allclose(got, s_img, rtol=1e-5)  # λ=1 is subject fidelity alone
    assert np.all((0 <= got) & (got <= 1))


def test_epsilon_guard_and_bounds():
    # An image exactly opposite its prompt has S_txt = 0: the 1e-8 guard keeps r finite (≈ 0).
    x = np.array([[1.0, 0.0]])
    r = reward.lambda_harmonic_reward(x, x, -x, 0.5)
    assert np.isfinite(r).all() and float(r[0]) < 1e-7
    r0 = reward.harmonic(jnp.array([0.0]), jnp.array([0.0]), 0.0)
    assert np.isfinite(r0).all()


def test_batched_reference_sets_broadcast():
    rng = np.random.default_rng(1)
    img, refs, txt = (_unit(rng.standard_normal(s)) for s in [(3, 5, 8), (3, 2, 8), (3, 5, 8)])
    got = reward.lambda_harmonic_reward(img, refs, txt, 0.5)
    for b in range(3):
        np.testing.assert_allclose(got[b], _numpy_reward(img[b], refs[b], txt[b], 0.5)[0], rtol=1e-5)


def test_lambda_is_traced_under_jit():
    rng = np.random.default_rng(2)
    img, refs, txt = (_unit(rng.standard_normal(s)) for s in [(2, 8), (3, 8), (2, 8)])
    f = jax.jit(reward.lambda_harmonic_reward)
    np.testing.assert_allclose(f(img, refs, txt, jnp.float32(0.3)), _numpy_reward(img, refs, txt, 0.3)[0], rtol=1e-5)


def test_strip_identifier_and_check_lambda():
    assert reward.strip_identifier("a [V] dog on the Moon") == "a dog on the Moon"
    assert reward.strip_identifier("a photo of [V] dog") == "a photo of dog"
    assert reward.strip_identifier("a green [V]  backpack ") == "a green backpack"
    with pytest.raises(ValueError, match="reward.lambda_val must be in"):
        reward.check_lambda(1.5, "reward.lambda_val")
