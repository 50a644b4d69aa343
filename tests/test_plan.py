"""rpo-jax plan: ahead-of-time compiles of the RPO step for a TPU topology described by libtpu,
on this CPU host, with a micro UNet (full-size plans are for users: minutes per candidate)."""
import dataclasses
import json

import pytest

from rpo_jax import cli
from rpo_jax.perf import devices, plan as plan_lib

pytest.importorskip("libtpu", reason="TPU planning needs libtpu (pip install 'rpo-jax[plan]')")

# The smallest UNet the step compiles for: one ResNet level and the cross-attention mid-block.
MICRO_UNET = {"sample_size": 4, "in_channels": 4, "out_channels": 4, "block_out_channels": [32],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"], "cross_attention_dim": 32, "norm_num_groups": 8,
              "attention_head_dim": [2], "use_linear_projection": True}
PLAN_ARGS = dict(config_file="configs/tiny.py", overrides=["--config.train.term_grad_norms=false"],
                 meshes=["data", "fsdp"], pairs_per_chip=[1], remats=[False], resolution=32)


@pytest.fixture(scope="module")
def micro_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "unet.json"
    path.write_text(json.dumps(MICRO_UNET))
    return str(path)


def test_plan_v5e_memory_flops_and_cache(micro_arch, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # Two worker processes (spawned, as --jobs 2 runs them): one candidate each.
    result = plan_lib.plan(micro_arch, "v5e:2x2", cache_dir=cache, jobs=2, **PLAN_ARGS)
    assert result["target"]["chips"] == 4 and result["target"]["device_kind"] == "TPU v5 lite"
    assert result["target"]["hbm_bytes_per_chip"] == 16 * plan_lib.GIB
    data, fsdp = result["candidates"]
    assert (data["mesh"], fsdp["mesh"]) == ((4, 1, 1), (1, 4, 1))
    for r in (data, fsdp):
        assert r["compiled"] and not r["cached"] and r["batch_size"] == 4
        assert r["memory"]["argument"] > 0 and r["memory"]["temp"] > 0
        assert r["cost"]["flops"] > 0 and r["est_step_seconds"] > 0 and r["fits"]
        assert r["total_bytes"] >= r["memory"]["argument"]
    # FSDP splits the weights and the AdamW state over the chips; data parallelism replicates them.
    assert fsdp["memory"]["argument"] < 0.6 * data["memory"]["argument"]
    assert result["recommended"] in (0, 1)
    table = plan_lib.markdown(result)
    assert "| data 4×1×1 | 1 | 4 |" in table and "Recommended" in table
    assert len(list(cache.glob("*.json"))) == 2

    # A second run compiles nothing: every candidate comes from the cache with the same numbers
    # (in this process: the patched compile_job would raise).
    def no_compile(job):
        raise AssertionError("compiled although cached")

    monkeypatch.setattr(plan_lib, "compile_job", no_compile)
    again = plan_lib.plan(micro_arch, "v5e:2x2", cache_dir=cache, **PLAN_ARGS)
    assert all(r["cached"] for r in again["candidates"])
    assert [r["memory"] for r in again["candidates"]] == [data["memory"], fsdp["memory"]]
    # ... and a changed setting is a different compile.
    with pytest.raises(AssertionError, match="compiled although cached"):
        plan_lib.plan(micro_arch, "v5e:2x2", cache_dir=cache, **dict(PLAN_ARGS, remats=[True]))


def test_unknown_topology_is_one_line(capsys):
    with pytest.raises(ValueError, match=r"--topology v5e:3x3: libtpu does not know .*v5e:2x4"):
        plan_lib.get_target("v5e:3x3")
    for name in ("v9x:2x2", "v5litepod-8"):
        with pytest.raises(ValueError, match=rf"--topology '{name}' is not a TPU GENERATION:GRID.*v5e:2x4"):
            plan_lib.get_target(name)
    assert cli.main(["plan", "--arch", "tiny", "--topology", "v5e:3x3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --topology v5e:3x3") and "\n" not in err


def test_mesh_must_use_every_device():
    assert plan_lib.parse_meshes(["both", "2x2x1", "data"], 4, "v5e:2x2") == [
        ("data", (4, 1, 1)), ("fsdp", (1, 4, 1)), ("2x2x1", (2, 2, 1))]
    with pytest.raises(ValueError, match=r"--mesh 3x1x1: 3 devices, but v5e:2x2 has 4"):
        plan_lib.parse_meshes(["3x1x1"], 4, "v5e:2x2")
    with pytest.raises(ValueError, match=r"--mesh 'dp'"):
        plan_lib.parse_meshes(["dp"], 4, "v5e:2x2")


def test_derived_numbers():
    """Per-chip arithmetic from XLA's per-device numbers (v4: 2 devices per chip)."""
    target = plan_lib.Target("v4:2x2x1", [None] * 8, "tpu", "TPU v4", 4, devices.known_chip("TPU v4"),
                             32 * plan_lib.GIB)
    cand = plan_lib.Candidate((8, 1, 1), "data", 2, "bfloat16", True, "float32", 3, "einsum")
    gib = plan_lib.GIB
    result = {"compiled": True, "cost": {"flops": 1e12, "optimal_seconds": 0.5},
              "memory": {"argument": 4 * gib, "output": 3 * gib, "alias": 3 * gib, "temp": 9 * gib,
                         "generated_code": 0.5 * gib}}
    d = plan_lib.derive(result, cand, target, headroom=0.1)
    assert d["batch_size"] == 8 and d["pairs_per_step"] == 24 and d["images_per_step"] == 48
    assert d["total_bytes"] == 13.5 * gib and d["hbm_fraction"] == 13.5 / 16
    assert d["fits"] is True  # 13.5 GiB ≤ 90% of the 16 GiB of each device
    assert plan_lib.derive(result, cand, target, headroom=0.2)["fits"] is False
    assert d["images_per_second_per_chip"] == 48 / 4 / 0.5
    assert d["est_mfu"] == pytest.approx(2e12 / 0.5 / 275e12)
    # The roofline bound: v4 moves 1228 GB/s per chip; 2 devices per chip double the bytes.
    roof = plan_lib.derive(dict(result, cost={"flops": 1e12, "bytes accessed": 2e11}), cand, target, 0.1)
    assert roof["roofline_step_seconds"] == pytest.approx(max(2e12 / 275e12, 4e11 / 1228e9))
    refused = plan_lib.derive(plan_lib._oom_record("RESOURCE_EXHAUSTED: Ran out of memory in memory "
                                                   "space hbm. Used 20.5G of 15.75G hbm."),
                              cand, target, headroom=0.1)
    assert refused["fits"] is False and refused["total_bytes"] == 20.5 * gib


def test_recommendation_when_xla_gives_no_valid_time():
    """libtpu's optimal_seconds is negative for full SD 2.1 (-1590.9 for v5e:2x4, FSDP, 1 pair per
    chip): shown as n/a, and the fitting candidates are ranked by the roofline bound instead."""
    target = plan_lib.Target("v5e:2x4", [None] * 8, "tpu", "TPU v5 lite", 8,
                             devices.known_chip("TPU v5 lite"), 16 * plan_lib.GIB)
    gib = plan_lib.GIB
    memory = {"argument": 1.6 * gib, "output": 1.2 * gib, "alias": 1.2 * gib, "temp": 7 * gib,
              "generated_code": 0.4 * gib}
    records = []
    for pairs, seconds, bytes_accessed, temp in ((1, -1590.9, 1.4e11, 7), (4, 0.9, 3e11, 9), (16, 2.0, 6e11, 40)):
        cand = plan_lib.Candidate((1, 8, 1), "fsdp", pairs, "bfloat16", False, "float32", 1, "einsum")
        result = {"compiled": True, "memory": dict(memory, temp=temp * gib),
                  "cost": {"flops": 5.3e12 * pairs, "bytes accessed": bytes_accessed,
                           "optimal_seconds": seconds}}
        records.append(dict(dataclasses.asdict(cand), **result, **plan_lib.derive(result, cand, target, 0.1)))
    assert records[0]["xla_estimate_invalid"] == -1590.9 and "est_step_seconds" not in records[0]
    assert [r["fits"] for r in records] == [True, True, False]
    # Roofline per chip: 1 pair 1.4e11 B / 819 GB/s = 171 ms; 4 pairs 366 ms (2.2 vs 5.5 pairs/s).
    best, basis = plan_lib.recommend(records)
    assert (best, basis) == (1, "roofline")
    table = plan_lib.markdown({"arch": "sd21", "resolution": 512, "headroom": 0.1,
                               "target": {"topology": "v5e:2x4", "device_kind": "TPU v5 lite",
                                          "platform": "tpu", "devices": 8, "chips": 8, "chip": "TPU v5e",
                                          "hbm_bytes_per_chip": 16 * gib, "peak_bf16_flops_per_chip": 197e12},
                               "candidates": records, "recommended": best, "recommended_by": basis})
    assert "| 5,300 | 171 | n/a |" in table and "fastest roofline bound that fits" in table
    assert "XLA's optimal_seconds was not a time for 1 candidate(s) (-1591)" in table
    # With a valid XLA estimate on every fitting candidate, XLA's estimate ranks them.
    records[0].update(est_step_seconds=0.1, images_per_second_per_chip=2.0)
    assert plan_lib.recommend(records) == (0, "xla")
    # Nothing fits: no recommendation.
    assert plan_lib.recommend([dict(r, fits=False) for r in records]) == (None, None)


def test_cache_key_covers_the_candidate(micro_arch):
    job = {"topology": "v5e:2x2", "candidate": {"pairs_per_chip": 1}, "unet": MICRO_UNET}
    key = plan_lib.job_key(job)
    assert key == plan_lib.job_key(json.loads(json.dumps(job)))
    assert key != plan_lib.job_key(dict(job, candidate={"pairs_per_chip": 4}))
    assert key != plan_lib.job_key(dict(job, topology="v5e:2x4"))
