"""Weight files (safetensors, sharded, .bin) and the PyTorch ↔ Flax layout conversion."""
import builtins
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from rpo_jax.weights import convert, io

KEYMAP = convert.KeyMap(list_names=frozenset({"blocks", "to_out"}), ignore=(r".*\.position_ids",))


def test_key_mapping():
    assert KEYMAP.torch_key(("blocks_0", "to_out_0", "kernel")) == "blocks.0.to_out.0.weight"
    assert KEYMAP.torch_key(("linear_1", "scale")) == "linear_1.weight"  # not a list name
    assert KEYMAP.torch_key(("emb", "embedding")) == "emb.weight"


def test_layouts_round_trip():
    rng = np.random.default_rng(0)
    params = {"blocks_0": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 5)), "bias": rng.standard_normal(5)},
                           "to_out_0": {"kernel": rng.standard_normal((4, 6))}}}
    state = convert.params_to_state_dict(params, KEYMAP)
    assert state["blocks.0.conv.weight"].shape == (5, 2, 3, 3)  # (out, in, kh, kw)
    assert state["blocks.0.to_out.0.weight"].shape == (6, 4)   # (out, in)
    state["x.position_ids"] = np.arange(3)  # ignored buffer
    back = convert.state_dict_to_params(state, params, KEYMAP, source="mem")
    np.testing.assert_array_equal(back["blocks_0"]["conv"]["kernel"], params["blocks_0"]["conv"]["kernel"])
    np.testing.assert_array_equal(back["blocks_0"]["to_out_0"]["kernel"], params["blocks_0"]["to_out_0"]["kernel"])


def test_one_by_one_conv_and_linear_are_interchangeable():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)  # Linear (out=3, in=2)
    target = {"p": {"kernel": np.zeros((1, 1, 2, 3), np.float32)}}  # 1x1 conv kernel
    out = convert.state_dict_to_params({"p.weight": w}, target, convert.KeyMap(frozenset()), source="m")
    np.testing.assert_array_equal(out["p"]["kernel"][0, 0], w.T)
    target = {"p": {"kernel": np.zeros((2, 3), np.float32)}}
    out = convert.state_dict_to_params({"p.weight": w[:, :, None, None]}, target,
                                       convert.KeyMap(frozenset()), source="m")
    np.testing.assert_array_equal(out["p"]["kernel"], w.T)


def test_sharded_safetensors_and_bf16(tmp_path):
    a = np.ones((2, 2), np.float32)
    b = np.ones(3, ml_dtypes.bfloat16)
    safetensors.numpy.save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    state, source = io.load_state_dict(tmp_path, io.TRANSFORMERS_WEIGHTS)
    assert source.endswith("model.safetensors.index.json")
    assert state["b"].dtype == ml_dtypes.bfloat16 and state["a"].shape == (2, 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(io.WeightsError, match="names shard model-00002-of-00002.safetensors"):
        io.load_state_dict(tmp_path, io.TRANSFORMERS_WEIGHTS)


def test_corrupt_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(io.WeightsError, match="cannot read safetensors file .*model.safetensors"):
        io.load_state_dict(tmp_path, io.TRANSFORMERS_WEIGHTS)


def test_bin_without_torch_says_so(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(io.WeightsError, match="needs torch, which is not installed"):
        io.load_state_dict(tmp_path, io.TRANSFORMERS_WEIGHTS)


def test_missing_config_and_weights_are_named(tmp_path):
    with pytest.raises(io.WeightsError, match="missing model config: .*config.json"):
        io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(io.WeightsError, match="config.json is not valid JSON"):
        io.read_config(tmp_path)
    with pytest.raises(io.WeightsError, match="no weights in .*diffusion_pytorch_model.safetensors"):
        io.find_weights(tmp_path, io.DIFFUSERS_WEIGHTS)
