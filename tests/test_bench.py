"""rpo-jax bench: both sides compute the same thing before anything is timed, and the reports
hold what was measured. Nothing here checks a time."""
import json

import numpy as np
import pytest

from rpo_jax.cli import main
from rpo_jax.perf import bench, devices

pytest.importorskip("torch")
pytest.importorskip("diffusers")

FAST = dict(runs=2, warmup=0, settle=0.0, sampling_steps=2, sampling_images=2, reward_images=4)


def test_step_and_sampling_agree_with_pytorch_and_reports_are_written(tmp_path):
    rows = bench.run(["tiny"], [1, 2], ["step", "sampling"], bench.Options(**FAST), tmp_path)
    step1, step2, sampling = rows
    for row in (step1, step2):
        assert row["loss_jax"] == pytest.approx(row["loss_torch"], rel=1e-4)
        assert row["flops"] > 0 and row["jax_memory"]["total_bytes"] > 0
        assert set(row["stats"]) == {"jax", "torch"} and len(row["seconds"]["torch"]) == 2
        assert row["ratio"] == pytest.approx(row["stats"]["jax"]["median"] / row["stats"]["torch"]["median"])
        s = row["stats"]["jax"]
        assert s["images_per_second"] == pytest.approx(row["images_per_step"] / s["median"])
        assert s["tflops"] == pytest.approx(row["flops"] / s["median"] / 1e12)
    assert step2["grad_accum"] == 2 and step2["pairs"] == 2 * step1["pairs"]
    assert step2["flops"] > 1.5 * step1["flops"]  # two micro-batches: about twice the work
    assert sampling["max_abs_latent_diff"] < 1e-3
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["what"] for r in saved["rows"]] == [r["what"] for r in rows]
    assert saved["environment"]["backend"] == "cpu" and saved["environment"]["peak_tflops"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("\n| tiny:") == 3 and "JAX / PyTorch" in md
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_loss_mismatch_stops_the_bench(monkeypatch, tmp_path):
    from rpo_jax.perf import torch_ref

    real = torch_ref.TorchStep.fixed_loss
    monkeypatch.setattr(torch_ref.TorchStep, "fixed_loss", lambda self, b, d: real(self, b, d) * 1.01)
    with pytest.raises(RuntimeError, match="disagree"):
        bench.run(["tiny"], [1], ["step"], bench.Options(**FAST), None)


def test_reward_agrees_with_transformers():
    (row,) = bench.run([], [1], ["reward"], bench.Options(**FAST), None)
    assert row["max_abs_reward_diff"] < 1e-4 and row["ratio"] > 0


def test_jax_only_and_bad_input(tmp_path, capsys):
    (row,) = bench.run(["tiny"], [1], ["sampling"], bench.Options(**FAST, torch=False), None)
    assert "ratio" not in row and "max_abs_latent_diff" not in row and set(row["stats"]) == {"jax"}
    assert main(["bench", "--models", "sd99", "--no-torch"]) == 2
    assert "--models: unknown model 'sd99'" in capsys.readouterr().err
    assert main(["bench", "--parts", "speed", "--no-torch"]) == 2
    assert "--parts: unknown part 'speed'" in capsys.readouterr().err


def test_known_chips_and_measured_peak():
    assert devices.known_chip("TPU v5 lite").name == "TPU v5e"
    assert devices.known_chip("TPU v5").name == "TPU v5p"
    assert devices.known_chip("NVIDIA H200").bf16_tflops == 989.0
    assert devices.known_chip("cpu") is None
    peak, source = devices.peak_tflops()
    assert peak > 0 and source.startswith("measured")


def test_host_cpu_names_the_model_family_and_count(tmp_path):
    one = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
    (tmp_path / "cpuinfo").write_text(one.format(0) + one.format(1))
    assert devices.host_cpu(str(tmp_path / "cpuinfo")) == "AMD EPYC (family 26, model 2), 2 CPUs"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    assert devices.host_cpu(str(tmp_path / "arm")) == "unknown CPU, 1 CPUs"
    assert devices.host_cpu(str(tmp_path / "missing")) is None
