"""Logical-axis partitioning: every parameter has a spec; sharded execution matches one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import max_rel_err
from rpo_jax.core import partitioning
from rpo_jax.testing import tiny
from rpo_jax.models import base, clip_text, unet, vae


def _models():
    u = unet.UNetConfig.from_dict(tiny.unet_config("sd21"))
    v = vae.VAEConfig.from_dict(tiny.vae_config())
    t = clip_text.CLIPTextConfig.from_dict(tiny.text_encoder_config("sd21"))
    return {"unet": (unet.UNet2DConditionModel(u), unet.init_inputs(u)),
            "vae": (vae.AutoencoderKL(v), vae.init_inputs(v)),
            "text_encoder": (clip_text.CLIPTextModel(t), clip_text.init_inputs(t))}


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder"])
def test_every_param_has_a_partition_spec_under_default_rules(name):
    module, inputs = _models()[name]
    abstract = base.abstract_params(module, *inputs)
    specs = partitioning.logical_partition_specs(abstract)
    shapes = nn.unbox(abstract)
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape)
        mesh_axes = nn.logical_to_mesh_axes(tuple(spec), partitioning.DEFAULT_RULES)
        assert len(mesh_axes) == len(shape.shape)  # every logical name has a rule


def test_unnamed_params_are_reported():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    with pytest.raises(ValueError, match="without logical axis names"):
        partitioning.logical_partition_specs(base.abstract_params(Bare(), jnp.zeros((1, 2))))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_sharded_unet_matches_single_device(mesh_shape):
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    module, _ = _models()["unet"]
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 4))
    t = jnp.arange(8) * 100
    ctx = jax.random.normal(jax.random.PRNGKey(1), (8, 77, 32))
    abstract = base.abstract_params(module, x, t, ctx)
    params = base.random_params(abstract)
    ref = jax.jit(module.apply)({"params": params}, x, t, ctx)

    mesh = partitioning.make_mesh(mesh_shape)
    shardings = partitioning.param_shardings(abstract, mesh)
    sharded = jax.device_put(params, shardings)
    batch = partitioning.batch_sharding(mesh, 4)
    fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c),
                 in_shardings=(shardings, batch, partitioning.batch_sharding(mesh, 1),
                               partitioning.batch_sharding(mesh, 3)),
                 out_shardings=batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        out = fn(sharded, x, t, ctx)
    assert max_rel_err(out, ref) < 1e-5
    if mesh_shape[1] > 1:  # FSDP really splits weights
        kernel = sharded["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        assert kernel.sharding.spec != PartitionSpec(None, None)


def test_indivisible_axes_fall_back_to_replication():
    mesh = partitioning.make_mesh((1, 8, 1))
    module, inputs = _models()["unet"]
    shardings = partitioning.param_shardings(base.abstract_params(module, *inputs), mesh)
    conv_out = shardings["conv_out"]["kernel"]  # (3, 3, 32, 4): 4 output channels, 8 devices
    assert isinstance(conv_out, NamedSharding) and conv_out.spec == PartitionSpec(None, None, None, None)


def test_make_mesh_validates_shape():
    assert partitioning.make_mesh((2, -1, 1)).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        partitioning.make_mesh((2, 8, 1))
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        partitioning.make_mesh((3, -1, 1))
    assert partitioning.make_mesh((1, 1, 1)).devices.size == 1  # the first device
    with pytest.raises(ValueError, match="3 entries"):
        partitioning.make_mesh((8,))


def test_rules_from_config_override_defaults_and_are_checked():
    rules = partitioning.rules_from_config([("heads", "fsdp"), ("mlp", ["fsdp", "tensor"])])
    assert rules[0] == ("heads", "fsdp") and rules[1] == ("mlp", ("fsdp", "tensor"))
    assert rules[2:] == partitioning.DEFAULT_RULES
    mesh = partitioning.make_mesh((1, 8, 1))
    module, inputs = _models()["unet"]
    shardings = partitioning.param_shardings(base.abstract_params(module, *inputs), mesh, rules)
    to_q = shardings["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    # Rules apply in order: the config's 'heads' → fsdp claims the axis before the default 'embed' → fsdp.
    assert to_q.spec == PartitionSpec(None, "fsdp")
    assert partitioning.rules_from_config(()) == partitioning.DEFAULT_RULES
    with pytest.raises(ValueError, match=r"logical_axis_rules\[0\]: unknown mesh axes \['model'\]"):
        partitioning.rules_from_config([("heads", "model")])
    with pytest.raises(ValueError, match=r"logical_axis_rules\[0\] must be"):
        partitioning.rules_from_config(["heads"])
