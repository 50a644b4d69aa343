"""The RPO objective: NumPy parity, noise sharing, β, gradient decomposition, descent direction."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.rpo import objective
from rpo_jax.sd import schedulers
from rpo_jax.rpo.objective import ObjectiveConfig

B, H, W, C, L, D = 3, 4, 4, 2, 5, 6
AC = schedulers.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012).alphas_cumprod


def toy_apply(p, x, t, c):
    """A 'UNet' with two parameter leaves: per-channel scale a (C,) and scalar b."""
    return (x * p["a"] + p["b"] * jnp.mean(c, axis=(1, 2))[:, None, None, None]
            + 0.001 * t[:, None, None, None])


def toy_apply_np(p, x, t, c):
    return (x * np.asarray(p["a"], np.float64) + float(p["b"]) * c.mean(axis=(1, 2))[:, None, None, None]
            + 0.001 * t[:, None, None, None])


THETA = {"a": jnp.array([0.9, 0.2]), "b": jnp.array(0.3)}
FROZEN = {"a": jnp.array([0.8, 0.1]), "b": jnp.array(-0.2)}


def make_batch(seed=0, pref=(0.9, 0.2, 0.5)):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return {"ref_latents": f(B, H, W, C), "ref_context": f(B, L, D),
            "neg_latents": f(B, H, W, C), "neg_context": f(B, L, D) + 0.5,
            "pref_prob": jnp.asarray(pref, jnp.float32)}


def loss_fn(cfg, apply_fn=toy_apply):
    return jax.jit(functools.partial(objective.rpo_loss, apply_fn=apply_fn, alphas_cumprod=AC, cfg=cfg))


def grads_fn(cfg, term_grad_norms=True):
    return jax.jit(functools.partial(objective.loss_and_grads, apply_fn=toy_apply, alphas_cumprod=AC,
                                     cfg=cfg, term_grad_norms=term_grad_norms))


def numpy_rpo(params, ref_params, batch, rng, cfg):
    """Independent float64 computation; only ε, t and ℓ are taken from the module's rng helpers."""
    ny, ng, ty, tg = (np.asarray(a) for a in objective.noise_and_timesteps(rng, batch, cfg))
    labels = np.asarray(objective.draw_pair_labels(rng, batch, cfg), np.float64)
    ac = np.asarray(AC, np.float64)
    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}

    def target(z, n, t):
        a = ac[t][:, None, None, None]
        return {"epsilon": n, "v_prediction": np.sqrt(a) * n - np.sqrt(1 - a) * z,
                "sample": z}[cfg.prediction_type]

    def err(p, z, n, t, c):
        a = ac[t][:, None, None, None]
        x = np.sqrt(a) * z + np.sqrt(1 - a) * n
        return ((target(z, n, t) - toy_apply_np(p, x, t, c)) ** 2).mean(axis=(1, 2, 3))

    ey = err(params, b["ref_latents"], ny, ty, b["ref_context"])
    eg = err(params, b["neg_latents"], ng, tg, b["neg_context"])
    ry = err(ref_params, b["ref_latents"], ny, ty, b["ref_context"])
    rg = err(ref_params, b["neg_latents"], ng, tg, b["neg_context"])
    delta = (ry - ey) - (rg - eg)
    logsig = lambda v: -np.logaddexp(0.0, -v)
    l_pref = -np.mean(labels * logsig(cfg.beta * delta) + (1 - labels) * logsig(-cfg.beta * delta))
    l_sim = ey.mean()
    return {"loss": cfg.w_sim * l_sim + cfg.w_pref * l_pref, "l_sim": l_sim, "l_pref": l_pref,
            "delta_mean": delta.mean(), "delta_abs_mean": np.abs(delta).mean(),
            "beta_delta_abs_mean": cfg.beta * np.abs(delta).mean(),
            "label_mean": labels.mean(), "mse_model_ref": ey.mean(), "mse_model_neg": eg.mean(),
            "mse_frozen_ref": ry.mean(), "mse_frozen_neg": rg.mean(),
            "pref_prob_mean": b["pref_prob"].mean(), "_delta": delta,
            "_labels": labels}


@pytest.mark.parametrize("label_mode", ["sampled", "soft"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_numpy(label_mode, share, prediction_type):
    cfg = ObjectiveConfig(prediction_type, beta=3.0, w_sim=0.7, w_pref=1.3,
                          share_noise_in_pair=share, label_mode=label_mode)
    batch, f = make_batch(), loss_fn(cfg)
    for seed in range(3):
        rng = jax.random.PRNGKey(seed)
        loss, m = f(THETA, FROZEN, batch, rng)
        ref = numpy_rpo(THETA, FROZEN, batch, rng, cfg)
        assert set(m) == {k for k in ref if not k.startswith("_")} | {"implicit_accuracy"}
        assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())
        np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
        for k, v in ref.items():
            if not k.startswith("_"):
                np.testing.assert_allclose(m[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        d, lab = ref["_delta"], ref["_labels"]
        assert np.all(d != 0)
        # agreement with ℓ = 1 (p > ½ in soft mode); p = ½ exactly (soft, pair 3) is a tie: ½
        agree = np.where(lab == 0.5, 0.5, ((d > 0) == (lab > 0.5)).astype(float))
        np.testing.assert_allclose(m["implicit_accuracy"], agree.mean(), atol=1e-6)
        if label_mode == "soft":
            np.testing.assert_allclose(ref["_labels"], batch["pref_prob"])


def test_sample_prediction_type_matches_numpy():
    cfg = ObjectiveConfig("sample", label_mode="soft")
    batch, rng = make_batch(1), jax.random.PRNGKey(7)
    loss, _ = loss_fn(cfg)(THETA, FROZEN, batch, rng)
    np.testing.assert_allclose(loss, numpy_rpo(THETA, FROZEN, batch, rng, cfg)["loss"], rtol=1e-5)


def test_noise_sharing_switch():
    batch = make_batch()
    rng = jax.random.PRNGKey(3)
    ny, ng, ty, tg = objective.noise_and_timesteps(rng, batch, ObjectiveConfig("epsilon", share_noise_in_pair=True))
    np.testing.assert_array_equal(ny, ng)
    np.testing.assert_array_equal(ty, tg)
    assert ny.shape == (B, H, W, C) and ty.shape == (B,) and ty.dtype == jnp.int32
    ny, ng, ty, tg = objective.noise_and_timesteps(rng, batch, ObjectiveConfig("epsilon"))
    assert not np.any(np.isclose(ny, ng))
    # timesteps of the two items of a pair differ somewhere (over enough draws)
    cfg = ObjectiveConfig("epsilon")
    draws = [objective.noise_and_timesteps(jax.random.PRNGKey(i), batch, cfg)[2:] for i in range(5)]
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in draws)
    # the items within one half differ too (no accidental broadcast)
    assert not np.allclose(ny[0], ny[1])
    # t ~ U{0..T-1}
    big = {**batch, "ref_latents": jnp.zeros((4000, 1, 1, 1)), "neg_latents": jnp.zeros((4000, 1, 1, 1))}
    t = np.concatenate(objective.noise_and_timesteps(rng, big, ObjectiveConfig("epsilon", num_train_timesteps=10))[2:])
    assert t.min() == 0 and t.max() == 9
    np.testing.assert_allclose(np.bincount(t) / t.size, 0.1, atol=0.02)


def test_same_rng_same_loss_different_rng_different_loss():
    cfg = ObjectiveConfig("epsilon")
    batch = make_batch()
    f = loss_fn(cfg)
    a = f(THETA, FROZEN, batch, jax.random.PRNGKey(0))[0]
    b = f(THETA, FROZEN, batch, jax.random.PRNGKey(0))[0]
    c = f(THETA, FROZEN, batch, jax.random.PRNGKey(1))[0]
    assert a == b and a != c


def test_beta_scales_and_zero_delta_gives_log2():
    batch, rng = make_batch(), jax.random.PRNGKey(0)
    l = [loss_fn(ObjectiveConfig("epsilon", beta=beta))(THETA, FROZEN, batch, rng)[1]
         for beta in (0.5, 1.0, 4.0)]
    prefs = [float(m["l_pref"]) for m in l]
    assert len(set(prefs)) == 3
    for m, beta in zip(l, (0.5, 1.0, 4.0)):
        np.testing.assert_allclose(m["beta_delta_abs_mean"], beta * m["delta_abs_mean"], rtol=1e-6)
    # β only touches the preference term
    np.testing.assert_allclose(l[0]["l_sim"], l[2]["l_sim"])
    # θ == frozen → Δ = 0 → L_pref = log 2 for any labels and β, accuracy ½ (ties)
    for mode in ("sampled", "soft"):
        cfg = ObjectiveConfig("epsilon", beta=100.0, label_mode=mode)
        _, m = loss_fn(cfg)(FROZEN, FROZEN, batch, rng)
        np.testing.assert_allclose(m["l_pref"], np.log(2.0), rtol=1e-6)
        assert m["delta_abs_mean"] == 0
        np.testing.assert_allclose(m["implicit_accuracy"], 0.5)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("label_mode", ["sampled", "soft"])
def test_grad_decomposition(share, label_mode):
    cfg = ObjectiveConfig("v_prediction", beta=2.0, w_sim=0.6, w_pref=1.7,
                          share_noise_in_pair=share, label_mode=label_mode)
    batch, rng = make_batch(2), jax.random.PRNGKey(11)
    loss_t, m_t, g_t = grads_fn(cfg, True)(THETA, FROZEN, batch, rng)
    loss_f, m_f, g_f = grads_fn(cfg, False)(THETA, FROZEN, batch, rng)
    np.testing.assert_allclose(loss_t, loss_f, rtol=1e-6)
    for k in m_f:
        np.testing.assert_allclose(m_t[k], m_f[k], rtol=1e-5, err_msg=k)
    assert set(m_t) == set(m_f) | {"grad_norm_sim", "grad_norm_pref"}
    assert "grad_norm_sim" not in m_f
    for k in g_t:
        np.testing.assert_allclose(g_t[k], g_f[k], rtol=1e-5, atol=1e-7)
    # each term alone, by jax.grad of the loss with the other weight zeroed
    only = lambda **w: jax.grad(lambda p: objective.rpo_loss(
        p, FROZEN, batch, rng, apply_fn=toy_apply, alphas_cumprod=AC,
        cfg=ObjectiveConfig("v_prediction", beta=2.0, share_noise_in_pair=share,
                            label_mode=label_mode, **w))[0])(THETA)
    g_sim, g_pref = only(w_sim=1.0, w_pref=0.0), only(w_sim=0.0, w_pref=1.0)
    np_norm = lambda g: np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values()))
    np.testing.assert_allclose(m_t["grad_norm_sim"], np_norm(g_sim), rtol=1e-5)
    np.testing.assert_allclose(m_t["grad_norm_pref"], np_norm(g_pref), rtol=1e-5)
    for k in g_t:
        np.testing.assert_allclose(g_t[k], cfg.w_sim * g_sim[k] + cfg.w_pref * g_pref[k],
                                   rtol=1e-5, atol=1e-7)
    norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in g_t.values()))
    np.testing.assert_allclose(m_t["grad_norm"], norm, rtol=1e-5)
    np.testing.assert_allclose(m_f["grad_norm"], norm, rtol=1e-5)


def test_grad_norm_of_bfloat16_grads_is_float32():
    """bfloat16 leaves are upcast before the norm: optax alone would sum squares in bfloat16."""
    r = np.random.default_rng(0)
    tree = {"a": jnp.asarray(r.standard_normal((1000, 37)) * 300, jnp.bfloat16),
            "b": jnp.asarray(r.standard_normal(77) * 1e-3, jnp.bfloat16)}
    ref = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values()))
    n = objective._grad_norm(tree)
    assert n.dtype == jnp.float32
    np.testing.assert_allclose(n, ref, rtol=1e-6)
    # and through loss_and_grads with bfloat16 parameters
    theta = jax.tree.map(lambda x: x.astype(jnp.bfloat16), THETA)
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), FROZEN)
    for term_grad_norms in (True, False):
        _, m, g = grads_fn(ObjectiveConfig("epsilon"), term_grad_norms)(
            theta, frozen, make_batch(3), jax.random.PRNGKey(2))
        assert all(v.dtype == jnp.bfloat16 for v in g.values())
        assert m["grad_norm"].dtype == jnp.float32
        ref = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values()))
        # Inside jit XLA may skip rounding the combined gradient to bfloat16 before the norm
        # (excess precision): agreement to bfloat16's resolution, not float32's.
        np.testing.assert_allclose(m["grad_norm"], ref, rtol=4e-3)


def test_frozen_params_get_no_gradient():
    cfg = ObjectiveConfig("epsilon")
    batch, rng = make_batch(), jax.random.PRNGKey(0)
    g = jax.grad(lambda q: objective.rpo_loss(THETA, q, batch, rng, apply_fn=toy_apply,
                                              alphas_cumprod=AC, cfg=cfg)[0])(FROZEN)
    assert all(float(jnp.abs(v).max()) == 0 for v in g.values())


def test_one_apply_call_per_model_on_2b_items():
    calls = []

    def counting_apply(p, x, t, c):
        calls.append((x.shape, t.shape, c.shape))
        return toy_apply(p, x, t, c)

    cfg = ObjectiveConfig("epsilon")
    objective.rpo_loss(THETA, FROZEN, make_batch(), jax.random.PRNGKey(0), apply_fn=counting_apply,
                       alphas_cumprod=AC, cfg=cfg)
    assert calls == [((2 * B, H, W, C), (2 * B,), (2 * B, L, D))] * 2
    calls.clear()
    objective.loss_and_grads(THETA, FROZEN, make_batch(), jax.random.PRNGKey(0),
                             apply_fn=counting_apply, alphas_cumprod=AC, cfg=cfg)
    assert len(calls) == 2  # one frozen forward, one vjp forward; two pullbacks reuse it


@pytest.mark.parametrize("label, sign", [(1.0, 1.0), (0.0, -1.0)])
def test_descent_moves_delta_towards_the_label(label, sign):
    # p ∈ {0, 1} makes sampled labels deterministic; w_sim = 0 isolates L_pref.
    cfg = ObjectiveConfig("epsilon", beta=50.0, w_sim=0.0, w_pref=1.0, share_noise_in_pair=True)
    batch = make_batch(pref=(label,) * B)
    rng = jax.random.PRNGKey(5)
    step = grads_fn(cfg)
    params = {"a": FROZEN["a"] + 0.01, "b": FROZEN["b"] + 0.01}
    _, m0, _ = step(params, FROZEN, batch, rng)
    np.testing.assert_allclose(m0["label_mean"], label)
    deltas = [float(m0["delta_mean"])]
    for _ in range(20):
        _, m, g = step(params, FROZEN, batch, rng)
        params = jax.tree_util.tree_map(lambda p, d: p - 0.02 * d, params, g)
        deltas.append(float(m["delta_mean"]))
    _, m_end, _ = step(params, FROZEN, batch, rng)
    assert sign * (float(m_end["delta_mean"]) - deltas[0]) > 0.01
    assert m_end["l_pref"] < m0["l_pref"]
    if label == 1.0:  # the reference got easier for θ relative to the frozen model
        assert m_end["mse_model_ref"] - m_end["mse_frozen_ref"] < m0["mse_model_ref"] - m0["mse_frozen_ref"] \
            or m_end["mse_model_neg"] - m_end["mse_frozen_neg"] > m0["mse_model_neg"] - m0["mse_frozen_neg"]
    assert m_end["implicit_accuracy"] == 1.0


def test_labels_sampled_mean_and_soft():
    p = jnp.array([0.05, 0.3, 0.5, 0.9])
    batch = {"pref_prob": p}
    cfg = ObjectiveConfig("epsilon")
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    labels = jax.vmap(lambda k: objective.draw_pair_labels(k, batch, cfg))(keys)
    assert set(np.unique(labels)) <= {0.0, 1.0} and labels.dtype == jnp.float32
    np.testing.assert_allclose(labels.mean(0), p, atol=0.018)  # 5σ of 20000 Bernoulli draws
    soft = objective.draw_pair_labels(keys[0], batch, ObjectiveConfig("epsilon", label_mode="soft"))
    np.testing.assert_array_equal(soft, p)
    # through the loss: label_mean over rng draws tracks mean p
    full = make_batch(pref=(0.2, 0.6, 0.9))
    f = jax.jit(jax.vmap(lambda k: loss_fn(cfg)(THETA, FROZEN, full, k)[1]["label_mean"]))
    np.testing.assert_allclose(f(keys[:4000]).mean(), np.mean([0.2, 0.6, 0.9]), atol=0.02)


def test_soft_accuracy_uses_p_above_half():
    cfg = ObjectiveConfig("epsilon", label_mode="soft")
    batch, rng = make_batch(pref=(0.9, 0.2, 0.7)), jax.random.PRNGKey(0)
    _, m = loss_fn(cfg)(THETA, FROZEN, batch, rng)
    d = numpy_rpo(THETA, FROZEN, batch, rng, cfg)["_delta"]
    np.testing.assert_allclose(m["implicit_accuracy"], np.mean((d > 0) == np.array([True, False, True])))


@pytest.mark.parametrize("changes, field", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(w_sim=-0.1), "w_sim"), (dict(w_pref=-1.0), "w_pref"),
    (dict(w_sim=0.0, w_pref=0.0), "w_sim"), (dict(label_mode="hard"), "label_mode"),
    (dict(prediction_type="eps"), "prediction_type"), (dict(num_train_timesteps=0), "num_train_timesteps"),
])
def test_check_names_the_field(changes, field):
    cfg = ObjectiveConfig(**{"prediction_type": "epsilon", **changes})
    with pytest.raises(ValueError, match=field):
        cfg.check()
    with pytest.raises(ValueError, match=field):
        objective.rpo_loss(THETA, FROZEN, make_batch(), jax.random.PRNGKey(0), apply_fn=toy_apply,
                           alphas_cumprod=AC, cfg=cfg)


def test_config_is_hashable_and_valid_defaults():
    a, b = ObjectiveConfig("epsilon"), ObjectiveConfig("epsilon")
    assert hash(a) == hash(b) and a == b
    a.check()
    ObjectiveConfig("epsilon", beta=np.float32(2.0), w_sim=1, num_train_timesteps=np.int64(10)).check()
    assert (a.beta, a.w_sim, a.w_pref, a.share_noise_in_pair, a.label_mode, a.num_train_timesteps) == \
        (1.0, 1.0, 1.0, False, "sampled", 1000)


def test_shape_errors():
    cfg = ObjectiveConfig("epsilon")
    batch = make_batch()
    call = lambda b, ac=AC, c=cfg: objective.rpo_loss(THETA, FROZEN, b, jax.random.PRNGKey(0),
                                                      apply_fn=toy_apply, alphas_cumprod=ac, cfg=c)
    with pytest.raises(ValueError, match="neg_latents"):
        call({**batch, "neg_latents": batch["neg_latents"][:, :2]})
    with pytest.raises(ValueError, match="pref_prob"):
        call({**batch, "pref_prob": batch["pref_prob"][:2]})
    with pytest.raises(KeyError, match="neg_context"):
        call({k: v for k, v in batch.items() if k != "neg_context"})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        call(batch, c=ObjectiveConfig("epsilon", num_train_timesteps=500))


def test_tiny_unet_runs_under_jit(tiny_pipeline_dirs):
    """The real (tiny) UNet through loss_and_grads: finite loss, both terms contribute."""
    from rpo_jax.sd.pipeline import load_pipeline

    folder = tiny_pipeline_dirs["sd21"]
    pipe = load_pipeline(folder, dtype=jnp.float32)
    unet, params = pipe.unet, pipe.unet_params
    sched = pipe.schedule
    h = pipe.default_resolution // pipe.vae_scale_factor
    cin = unet.config.in_channels
    ctx = pipe.encode_prompts(["a photo of [V] dog", "a [V] dog on the Moon"])
    r = np.random.default_rng(0)
    batch = {"ref_latents": jnp.asarray(r.standard_normal((1, h, h, cin)), jnp.float32),
             "neg_latents": jnp.asarray(r.standard_normal((1, h, h, cin)), jnp.float32),
             "ref_context": ctx[:1], "neg_context": ctx[1:], "pref_prob": jnp.array([0.7])}
    apply_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c)
    cfg = ObjectiveConfig(sched.prediction_type, num_train_timesteps=sched.num_train_timesteps)
    f = jax.jit(functools.partial(objective.loss_and_grads, apply_fn=apply_fn,
                                  alphas_cumprod=sched.alphas_cumprod, cfg=cfg))
    perturbed = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    loss, m, g = f(perturbed, params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert m["grad_norm_sim"] > 0 and m["grad_norm_pref"] > 0
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)


# ---- DreamBooth with prior preservation (mode='dreambooth') ----------------------------------

def numpy_dreambooth(params, batch, rng, cfg):
    """Independent float64 L = w_sim·L_sim + prior_weight·L_prior; ε and t from the module's rng
    helpers; the neg_* items are the class images."""
    ny, nc, ty, tc = (np.asarray(a, np.float64) for a in objective.noise_and_timesteps(rng, batch, cfg))
    ty, tc = ty.astype(int), tc.astype(int)
    ac = np.asarray(AC, np.float64)
    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}

    def err(z, n, t, c):
        a = ac[t][:, None, None, None]
        x = np.sqrt(a) * z + np.sqrt(1 - a) * n
        target = {"epsilon": n, "v_prediction": np.sqrt(a) * n - np.sqrt(1 - a) * z}[cfg.prediction_type]
        return ((target - toy_apply_np(params, x, t, c)) ** 2).mean(axis=(1, 2, 3))

    l_sim = err(b["ref_latents"], ny, ty, b["ref_context"]).mean()
    l_prior = err(b["neg_latents"], nc, tc, b["neg_context"]).mean()
    return {"loss": cfg.w_sim * l_sim + cfg.prior_weight * l_prior, "l_sim": l_sim,
            "l_prior": l_prior, "mse_model_ref": l_sim, "mse_model_prior": l_prior}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dreambooth_matches_numpy(prediction_type):
    cfg = ObjectiveConfig(prediction_type, w_sim=0.8, mode="dreambooth", prior_weight=1.7)
    batch = make_batch(3)
    del batch["pref_prob"]  # DreamBooth has no labels
    for seed in range(3):
        rng = jax.random.PRNGKey(seed)
        loss, m = loss_fn(cfg)(THETA, FROZEN, batch, rng)
        ref = numpy_dreambooth(THETA, batch, rng, cfg)
        assert set(m) == set(ref)
        for k, v in ref.items():
            np.testing.assert_allclose(m[k], v, rtol=1e-5, err_msg=k)
        # the frozen model plays no part
        np.testing.assert_array_equal(loss, loss_fn(cfg)(THETA, THETA, batch, rng)[0])
        # the gradient is the weighted sum of the two terms' gradients (term_grad_norms)
        loss_t, m_t, g_t = grads_fn(cfg, True)(THETA, FROZEN, batch, rng)
        _, _, g_f = grads_fn(cfg, False)(THETA, FROZEN, batch, rng)
        np.testing.assert_allclose(loss_t, ref["loss"], rtol=1e-5)
        assert {"grad_norm_sim", "grad_norm_prior", "grad_norm"} <= set(m_t)
        for k in g_t:
            np.testing.assert_allclose(g_t[k], g_f[k], rtol=1e-5, atol=1e-7)


def test_dreambooth_prior_weight_zero_is_l_sim_alone_exactly():
    """λ_prior = 0: the same loss as L_sim alone (RPO mode with w_pref = 0), bit for bit, and the
    same gradient (to float32 rounding: XLA fuses the two programs differently)."""
    batch, rng = make_batch(4), jax.random.PRNGKey(5)
    db = ObjectiveConfig("v_prediction", mode="dreambooth", prior_weight=0.0)
    sim_only = ObjectiveConfig("v_prediction", w_pref=0.0)
    for term_norms in (True, False):
        loss_d, m_d, g_d = grads_fn(db, term_norms)(THETA, FROZEN, batch, rng)
        loss_s, m_s, g_s = grads_fn(sim_only, term_norms)(THETA, FROZEN, batch, rng)
        np.testing.assert_array_equal(loss_d, m_d["l_sim"])
        np.testing.assert_array_equal(loss_d, loss_s)
        for k in g_d:
            np.testing.assert_allclose(g_d[k], g_s[k], rtol=1e-6, atol=1e-9)
    # and a nonzero weight changes it
    other = grads_fn(ObjectiveConfig("v_prediction", mode="dreambooth"), False)(THETA, FROZEN, batch, rng)[0]
    assert other != loss_s


@pytest.mark.parametrize("fields, message", [
    ({"mode": "dpo"}, "mode must be one of ['rpo', 'dreambooth']"),
    ({"mode": "dreambooth", "prior_weight": -1.0}, "prior_weight must be a finite number >= 0"),
    ({"mode": "dreambooth", "prior_weight": 0.0, "w_sim": 0.0}, "w_sim and prior_weight are both 0"),
])
def test_dreambooth_config_checks(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ObjectiveConfig("epsilon", **fields).check()
