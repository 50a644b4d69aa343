"""LoRA adapters (rpo_jax.models.lora, rpo_jax.weights.lora): the base model at initialisation,
parity with diffusers + PEFT in both directions (our file in diffusers, diffusers' file in
rpo-jax), the RPO loss's reference with adapters off, one train step that moves only adapters,
and errors."""
import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import max_rel_err, nchw, nhwc
from rpo_jax.core import config as config_lib, partitioning
from rpo_jax.models import base, lora, unet as unet_lib
from rpo_jax.rpo import adapters, objective, train
from rpo_jax.sd.pipeline import load_pipeline
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.testing import tiny
from rpo_jax.weights import lora as lora_file
from rpo_jax.weights.io import WeightsError

import pathlib

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")


def _unet(flavour="sd21", **changes):
    cfg = unet_lib.UNetConfig.from_dict({**tiny.unet_config(flavour), **changes})
    module = unet_lib.UNet2DConditionModel(cfg, attention_impl="einsum")
    params = base.random_params(base.abstract_params(module, *unet_lib.init_inputs(cfg)), seed=3)
    return module, params


def _random_adapters(module, cfg, seed=0):
    """PEFT-initialised adapters with every B (and A) perturbed, so each adapter matters."""
    abstract = lora.abstract_adapters(module, cfg, unet_lib.KEYMAP, *unet_lib.init_inputs(module.config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                        lora.init_adapters(abstract, seed))


def _inputs(seed=0, batch=2, size=8, width=32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, size, size, 4)).astype(np.float32), np.array([3, 917][:batch]),
            rng.standard_normal((batch, 7, width)).astype(np.float32))


_apply = jax.jit(lambda module, p, x, t, c: lora.apply(module, p, x, t, c), static_argnums=0)


def test_at_initialisation_the_lora_unet_is_the_base_unet_exactly():
    module, params = _unet()
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    abstract = lora.abstract_adapters(module, cfg, unet_lib.KEYMAP, *unet_lib.init_inputs(module.config))
    # one A and one B per attention projection, all with logical axis names
    specs = partitioning.logical_partition_specs(abstract)
    flat = traverse_util.flatten_dict(nn.unbox(abstract))
    assert len(flat) == 2 * 4 * 2 * 4  # A, B × 4 projections × attn1, attn2 × 4 transformer blocks
    assert {k[-2] for k in flat} == {"to_q", "to_k", "to_v", "to_out_0"}
    q = nn.unbox(abstract)["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]
    assert q["lora_A"].shape == (32, 4) and q["lora_B"].shape == (4, 32)  # context width 32 → 32
    spec = specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
    assert tuple(spec["lora_A"]) == ("embed", "lora_rank") and tuple(spec["lora_B"]) == ("lora_rank", "heads")
    shardings = partitioning.param_shardings(abstract, partitioning.make_mesh((1, 8, 1)))
    assert jax.tree.leaves(shardings)  # every adapter has a sharding under an FSDP mesh
    init = lora.init_adapters(abstract, seed=0)
    a = init["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["lora_A"]
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).std() > 0.05  # kaiming-uniform
    assert all(not np.any(v) for k, v in traverse_util.flatten_dict(init).items()
               if k[-1] == "lora_B")  # every B is zero
    x, t, c = _inputs()
    base_out = _apply(module, params, x, t, c)
    lora_out = _apply(module, lora.LoraParams(params, init, cfg, unet_lib.KEYMAP), x, t, c)
    np.testing.assert_array_equal(np.asarray(lora_out), np.asarray(base_out))
    # non-zero adapters change the output; merging them gives the same function
    p = lora.LoraParams(params, _random_adapters(module, cfg), cfg, unet_lib.KEYMAP)
    out = _apply(module, p, x, t, c)
    assert max_rel_err(out, base_out) > 0.1
    assert max_rel_err(_apply(module, lora.merge(p), x, t, c), out) < 1e-4


@pytest.mark.parametrize("flavour,targets", [
    ("sd21", "attn"), pytest.param("sd15", "attn_ff_conv", marks=pytest.mark.slow)])  # sd15: ~35 s
def test_our_file_loads_in_diffusers_with_the_same_outputs(tiny_pipeline_dirs, flavour, targets, tmp_path):
    """r=4, α=8 (≠ r), random non-zero adapters: diffusers' pipe.load_lora_weights of our export
    equals our LoRA UNet; sd15 also adapts the feed-forward and the ResNet / 1x1 convs."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pipe = load_pipeline(tiny_pipeline_dirs[flavour], attention_impl="einsum")
    cfg = lora.config_from_dict(dict(rank=4, alpha=8.0, targets=targets, dropout=0.0))
    p = lora.LoraParams(pipe.unet_params, _random_adapters(pipe.unet, cfg), cfg, unet_lib.KEYMAP)
    lora.save(p, tmp_path / lora_file.WEIGHTS_NAME)
    x, t, c = _inputs()
    ours = nchw(_apply(pipe.unet, p, x, t, c))
    tp = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline_dirs[flavour])
    tp.load_lora_weights(tmp_path)
    with torch.no_grad():
        ref = tp.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(c)).sample.numpy()
    err = max_rel_err(ours, ref)
    print(f"LoRA {flavour} {targets}: max rel err vs diffusers+PEFT {err:.2e}")
    assert err <= 1e-4
    assert tp.unet.peft_config["default_0"].lora_alpha == 8.0  # the metadata was read
    # and our own import of the file gives back the adapters and their scale
    again = lora.load(tmp_path, pipe.unet_params, unet_lib.KEYMAP)
    assert (again.config.rank, again.config.alpha) == (4, 8.0)
    for u, v in zip(jax.tree.leaves(again.adapters), jax.tree.leaves(p.adapters)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("style", ["diffusers_with_metadata", "peft_without_metadata"])
def test_a_file_diffusers_saved_gives_torchs_outputs(tiny_pipeline_dirs, style, tmp_path):
    """A torch UNet with PEFT adapters (add_adapter), saved by StableDiffusionPipeline.save_lora_weights:
    in diffusers' lora.down/lora.up keys with the LoraConfig metadata (α = 8, r = 4), or in PEFT's
    lora_A/lora_B keys without metadata (then α = r, diffusers' default; the adapter has α = r)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = tiny_pipeline_dirs["sd21"]
    tp = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    alpha = 8 if style == "diffusers_with_metadata" else 4
    torch.manual_seed(0)  # lora_A's gaussian init
    tp.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in tp.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    state = get_peft_model_state_dict(tp.unet)
    if style == "diffusers_with_metadata":
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata=tp.unet.peft_config["default"].to_dict())
    else:
        diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    keys = list(lora_file.read_lora_file(tmp_path).modules)
    assert len(keys) == 32  # 4 projections × attn1, attn2 × 4 transformer blocks
    x, t, c = _inputs()
    with torch.no_grad():
        ref = tp.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(c)).sample.numpy()
    pipe = load_pipeline(folder, attention_impl="einsum")
    p = lora.load(tmp_path, pipe.unet_params, unet_lib.KEYMAP)
    assert (p.config.rank, p.config.alpha) == (4, float(alpha))
    # merged (the same function, checked above; one compiled UNet for both cases)
    err = max_rel_err(nchw(_apply(pipe.unet, lora.merge(p), x, t, c)), ref)
    print(f"LoRA import ({style}): max rel err vs torch {err:.2e}")
    assert err <= 1e-4


def test_bad_input_names_the_file_and_the_key(tmp_path):
    module, params = _unet()
    with pytest.raises(ValueError, match=r"lora.targets \['to_nothing'\] match no Dense or Conv"):
        lora.abstract_adapters(module, lora.LoraConfig(targets=("to_q", "to_nothing")), unet_lib.KEYMAP,
                               *unet_lib.init_inputs(module.config))
    for field, value, message in (("rank", 0, "lora.rank must be an int >= 1"),
                                  ("alpha", -1.0, "lora.alpha must be a number > 0"),
                                  ("dropout", 1.0, r"lora.dropout must be in \[0, 1\)")):
        d = {**dict(rank=4, alpha=4.0, targets="attn", dropout=0.0), field: value}
        with pytest.raises(ValueError, match=message):
            lora.config_from_dict(d)
    cfg = lora.LoraConfig(rank=2, alpha=2.0)
    good = lora.LoraParams(params, _random_adapters(module, cfg), cfg, unet_lib.KEYMAP)
    state = lora_file.adapters_to_state_dict(good.adapters, unet_lib.KEYMAP)
    key = next(k for k in state if k.endswith(".lora.down.weight"))
    up = key.removesuffix("lora.down.weight") + "lora.up.weight"

    def write(d, name):
        path = tmp_path / name
        lora_file.write_lora_file(d, path)
        return path

    cases = [
        ({**state, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight":
          state[key]}, "is not for the unet"),
        ({k: v for k, v in state.items() if not k.endswith("lora.up.weight")}, "has no up/lora_B matrix"),
        ({**state, "unet.conv_in.lora_magnitude_vector": state[key]}, "DoRA"),
        ({**state, "unet.mid_block.attentions.0.nope.lora.down.weight": state[key],
          "unet.mid_block.attentions.0.nope.lora.up.weight": state[up]},
         "'mid_block.attentions.0.nope' is not a Dense or Conv layer"),
        ({k: (v[:, :3] if k.endswith("lora.down.weight") else v) for k, v in state.items()},
         "the model's kernel"),
    ]
    for i, (d, message) in enumerate(cases):
        path = write(d, f"bad{i}.safetensors")
        with pytest.raises(WeightsError, match=message) as e:
            lora.load(path, params, unet_lib.KEYMAP)
        assert str(path) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no LoRA file in .*empty: looked for pytorch_lora_weights"):
        lora.load(tmp_path / "empty", params, unet_lib.KEYMAP)


@pytest.fixture(scope="module")
def step_setup():
    config = config_lib.resolve(CONFIG, ["--config.train.term_grad_norms=False", "--config.lora.enabled=True",
                                         "--config.lora.alpha=8.0"])
    # one level of the tiny UNet (down, mid and up blocks with attention): compiles in half the time
    module, params = _unet(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D"], attention_head_dim=[2])
    rng = np.random.default_rng(0)
    cache = {
        "ref_mean": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        "ref_std": np.full((2, 8, 8, 4), 0.1, np.float32),
        "neg_mean": rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
        "neg_std": np.full((4, 8, 8, 4), 0.1, np.float32),
        "ref_context": rng.standard_normal((77, 32)).astype(np.float32),
        "prompt_context": rng.standard_normal((2, 77, 32)).astype(np.float32),
        "neg_prompt_index": np.arange(4, dtype=np.int32) % 2,
        "pref_prob": rng.uniform(0.3, 0.7, (2, 4)).astype(np.float32),
    }
    alphas = jnp.asarray(NoiseSchedule.from_dict(tiny.scheduler_config("sd21")).alphas_cumprod)
    return config, module, params, cache, alphas


def test_rpo_loss_with_lora_has_the_adapters_off_unet_as_reference(step_setup):
    config, module, params, cache, alphas = step_setup
    cfg = adapters.lora_config(config)
    ad = _random_adapters(module, cfg)
    obj = train.objective_config(config, "v_prediction")
    batch = {"ref_latents": cache["ref_mean"], "ref_context": np.stack([cache["ref_context"]] * 2),
             "neg_latents": cache["neg_mean"][:2], "neg_context": cache["prompt_context"][:2],
             "pref_prob": cache["pref_prob"][0, :2]}
    base_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
    adapted = adapters.adapter_apply_fn(module, cfg)
    key = jax.random.PRNGKey(1)

    @jax.jit
    def losses(ad, params):
        with_lora = objective.rpo_loss(ad, params, batch, key, alphas_cumprod=alphas, cfg=obj,
                                       apply_fn=lambda a, x, t, c: adapted(a, params, x, t, c, None),
                                       ref_apply_fn=base_fn)[1]
        plain = objective.rpo_loss(params, params, batch, key, alphas_cumprod=alphas, cfg=obj,
                                   apply_fn=base_fn)[1]
        return with_lora, plain

    with_lora, plain = losses(ad, params)
    for k in ("mse_frozen_ref", "mse_frozen_neg"):  # the reference: the base UNet, adapters off
        np.testing.assert_allclose(with_lora[k], plain["mse_model_" + k[11:]], rtol=1e-6)
    assert abs(float(with_lora["mse_model_ref"]) - float(plain["mse_model_ref"])) > 1e-4  # θ: adapters on


def test_a_lora_train_step_moves_only_the_adapters(step_setup):
    """The state holds adapters and their Adam moments only (no second UNet-sized tree); one step
    changes every adapter (float32) on a bfloat16 base, which stays as it was."""
    config, module, params, cache, alphas = step_setup
    cfg = adapters.lora_config(config)
    mesh = partitioning.make_mesh((1, 1, 1))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = base.abstract_params(module, *unet_lib.init_inputs(module.config))
    shardings = partitioning.param_shardings(abstract, mesh)
    ad, ad_shardings = adapters.init_adapters(module, cfg, mesh, partitioning.DEFAULT_RULES, 0)
    ad = jax.tree.map(lambda a: a + 0.01, ad)  # non-zero B, so A gets gradients too
    tx = train.make_optimizer(config)
    state = train.TrainState(step=jax.device_put(jnp.int32(0), replicated), params=ad,
                             opt_state=train.init_opt_state(tx, ad, ad_shardings, replicated),
                             rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(0)), replicated))
    n_base = lora.count(params)[0]
    assert all(np.size(x) < n_base / 10 for x in jax.tree.leaves(state))
    assert lora.count(state)[0] < 4 * lora.count(ad)[0]  # adapters + 2 Adam moments + scalars
    base16 = jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params), shardings)
    base_before = jax.tree.map(np.array, base16)
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=lambda q, x, t, c: module.apply({"params": q}, x, t, c),
        adapter_fn=adapters.adapter_apply_fn(module, cfg), alphas_cumprod=alphas,
        obj_cfg=train.objective_config(config, "v_prediction"), tx=tx, term_grad_norms=False,
        batch_sharding=None))
    new_state, metrics = step(state, base16, jax.device_put(cache, replicated),
                              jnp.asarray([[0, 5]], jnp.int32))
    assert jax.tree.structure(new_state.params) == jax.tree.structure(ad)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new_state.params, ad)
    assert all(jax.tree.leaves(moved))
    for a, b in zip(jax.tree.leaves(base16), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_config_section_presets_and_workdirs_from_before_lora():
    on = config_lib.resolve(CONFIG, ["--config.lora.enabled=True", "--config.lora.targets=attn_ff"])
    assert adapters.lora_config(on).targets == lora.TARGET_PRESETS["attn_ff"]
    off = config_lib.resolve(CONFIG)
    assert adapters.lora_config(off) is None
    new = config_lib.to_json_dict(off)
    old = {k: v for k, v in new.items() if k != "lora"}  # a config.json written before LoRA existed
    assert train.config_diff(old, new) == []  # resumes
    assert train.config_diff(old, config_lib.to_json_dict(on)) == ["lora"]  # LoRA on: another run
    assert adapters.lora_config(old) is None
    with pytest.raises(ValueError, match="lora.rank must be an int >= 1"):
        train.check_config(config_lib.resolve(CONFIG, ["--config.lora.enabled=True",
                                                       "--config.lora.rank=0"]))
