"""The train step under data-parallel, FSDP and mixed meshes equals the single-device step, and
its two micro-batch loops (unrolled, lax.scan) give the same update."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.core import config as config_lib, partitioning
from rpo_jax.testing import tiny
from rpo_jax.rpo import train
from rpo_jax.models import base, unet

import pathlib

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def setup():
    # Adam's first update is lr·g/(|g|+ε): with the recipe's ε = 1e-8 it is ≈ ±lr for every
    # gradient, and for the few gradients near ε the order of cross-device reductions decides it.
    # A larger ε keeps the update smooth in g, so params can be compared tightly.
    config = config_lib.resolve(CONFIG, ["--config.train.term_grad_norms=False", "--config.train.eps=1e-3"])
    cfg = unet.UNetConfig.from_dict(tiny.unet_config("sd21"))
    module = unet.UNet2DConditionModel(cfg, attention_impl="einsum")
    abstract = base.abstract_params(module, *unet.init_inputs(cfg))
    params = base.random_params(abstract, seed=3)
    rng = np.random.default_rng(0)
    nr, nn_, p = 4, 8, 8
    cache = {
        "ref_mean": rng.standard_normal((nr, 8, 8, 4)).astype(np.float32),
        "ref_std": np.full((nr, 8, 8, 4), 0.1, np.float32),
        "neg_mean": rng.standard_normal((nn_, 8, 8, 4)).astype(np.float32),
        "neg_std": np.full((nn_, 8, 8, 4), 0.1, np.float32),
        "ref_context": rng.standard_normal((77, 32)).astype(np.float32),
        "prompt_context": rng.standard_normal((p, 77, 32)).astype(np.float32),
        "neg_prompt_index": np.arange(nn_, dtype=np.int32) % p,
        "pref_prob": rng.uniform(0.3, 0.7, (nr, nn_)).astype(np.float32),
    }
    from rpo_jax.sd.schedulers import NoiseSchedule
    alphas = jnp.asarray(NoiseSchedule.from_dict(tiny.scheduler_config("sd21")).alphas_cumprod)
    return config, module, abstract, params, cache, alphas


def _one_step(setup, mesh_shape, idx=None, unroll=True):
    config, module, abstract, params, cache, alphas = setup
    mesh = partitioning.make_mesh(mesh_shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = partitioning.param_shardings(abstract, mesh)
    p = jax.device_put(params, shardings)
    tx = train.make_optimizer(config)
    state = train.TrainState(step=jax.device_put(jnp.int32(0), replicated), params=p,
                             opt_state=train.init_opt_state(tx, p, shardings, replicated),
                             rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(0)), replicated))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=lambda q, x, t, c: module.apply({"params": q}, x, t, c),
        alphas_cumprod=alphas, obj_cfg=train.objective_config(config, "v_prediction"), tx=tx,
        term_grad_norms=False, batch_sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
        unroll=unroll),
        in_shardings=(state_shardings, shardings, replicated, replicated),
        out_shardings=(state_shardings, replicated))
    if idx is None:
        idx = jnp.arange(8, dtype=jnp.int32)[None] * 3 % 32  # one micro-batch of 8 pairs
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        new_state, metrics = step(state, p, jax.device_put(cache, replicated), idx)
    return jax.device_get(new_state.params), jax.device_get(metrics), new_state


@pytest.fixture(scope="module")
def single(setup):
    return _one_step(setup, (1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(setup, single, mesh_shape):
    params0, metrics0, _ = single
    params, metrics, state = _one_step(setup, mesh_shape)
    for k in ("loss", "l_sim", "l_pref", "delta_mean", "grad_norm"):
        np.testing.assert_allclose(metrics[k], metrics0[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    if mesh_shape[1] > 1:  # FSDP really shards the weights (and the optimizer state with them)
        kernel = state.params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"]
        assert kernel.sharding.spec != PartitionSpec(None, None)


def test_unrolled_and_scanned_micro_batches_give_the_same_update(setup, single):
    idx = jnp.arange(12, dtype=jnp.int32).reshape(3, 4) * 5 % 32  # grad_accum 3 × 4 pairs
    unrolled_params, unrolled_metrics, _ = _one_step(setup, (1, 1, 1), idx, unroll=True)
    scanned_params, scanned_metrics, _ = _one_step(setup, (1, 1, 1), idx, unroll=False)
    for k in ("loss", "l_sim", "l_pref", "delta_mean", "grad_norm", "update_norm"):
        np.testing.assert_allclose(unrolled_metrics[k], scanned_metrics[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(unrolled_params), jax.tree.leaves(scanned_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and three micro-batches are not one: the step really took the other pairs
    assert unrolled_metrics["loss"] != single[1]["loss"]


@pytest.mark.parametrize("loop, backend, unroll", [("auto", "cpu", True), ("auto", "tpu", False),
                                                   ("auto", "gpu", False), ("scan", "cpu", False),
                                                   ("unroll", "tpu", True)])
def test_micro_batch_loop_setting(loop, backend, unroll):
    assert train.unroll_micro_batches(loop, backend) is unroll


@pytest.mark.parametrize("backend, donate", [("cpu", False), ("tpu", True), ("gpu", True), (None, False)])
def test_the_state_is_donated_except_on_the_cpu_backend(backend, donate):
    assert train.donate_state(backend) is donate  # this suite runs on the CPU backend


def test_the_cpu_step_copies_no_trained_parameter(setup):
    """Donated, XLA:CPU copies every trained parameter at the start of the step
    (train.donate_state); the CPU step takes fresh output buffers instead and copies none."""
    config, module, *_ = setup
    mesh = partitioning.make_mesh((1, 1, 1))
    cache = train.cache_shapes(4, 8, 8, (8, 8, 4), (77, 32))
    args, shardings = train.abstract_train_inputs(config, module, mesh, cache)
    from rpo_jax.sd.schedulers import NoiseSchedule
    schedule = NoiseSchedule.from_dict(tiny.scheduler_config("sd21"))

    step = train.jit_train_step(config, module, schedule, mesh, *shardings, backend="cpu")
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        hlo = step.lower(*args).compile().as_text()
    assert "%state_params" in hlo  # the parameters keep their names in the HLO text
    # (with donation, backend="tpu" here, XLA:CPU copies every one: docs/performance.md, Notes)
    assert hlo.count("copy(%state_params") == 0
