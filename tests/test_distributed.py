"""rpo_jax.core.distributed: flags / environment → multi-process settings (pure), and the data
helpers on one process (the multi-process paths run in tests/test_multihost.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.core import distributed, partitioning

NO_ENV: dict = {}


def settings(*args, environ=NO_ENV, has_tpu=False, **kwargs):
    return distributed.settings_from(*args, environ=environ, has_tpu=has_tpu, **kwargs)


def test_no_flags_no_cluster_is_one_process():
    assert settings() is None
    assert settings(environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert settings(environ={"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None


def test_explicit_flags():
    s = settings("127.0.0.1:1234", 2, 1, 7)
    assert s == distributed.Settings("explicit", "127.0.0.1:1234", 2, 1, 7)
    assert "process 1 of 2" in s.describe()
    assert settings("host-0.example:80", 4, 0).heartbeat_timeout == distributed.DEFAULT_HEARTBEAT


def test_environment_values_and_flags_win():
    env = {"RPO_JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "RPO_JAX_NUM_PROCESSES": "4",
           "RPO_JAX_PROCESS_ID": "3", "RPO_JAX_HEARTBEAT_TIMEOUT": "15"}
    assert settings(environ=env) == distributed.Settings("explicit", "10.0.0.1:8476", 4, 3, 15)
    assert settings(process_id=2, environ=env).process_id == 2


def test_one_process_flag_means_no_distributed_start():
    assert settings(num_processes=1) is None
    assert settings(num_processes=1, environ={"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "missing --coordinator-address"),
    (dict(coordinator_address="h:1", process_id=0), "missing --num-processes"),
    (dict(coordinator_address="h:1", num_processes=2), "missing --process-id"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "--coordinator-address must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process-id must be < --num-processes"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num-processes must be >= 1"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0), "--num-processes must be an integer"),
    (dict(num_processes=1, process_id=1), "--process-id must be 0"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, heartbeat_timeout=0),
     "--heartbeat-timeout must be >= 1"),
])
def test_bad_or_partial_flags_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings(**kwargs)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="RPO_JAX_NUM_PROCESSES must be an integer"):
        settings(environ={"RPO_JAX_NUM_PROCESSES": "x", "RPO_JAX_PROCESS_ID": "0",
                          "RPO_JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="missing --process-id"):
        settings(num_processes=2, environ={"RPO_JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="RPO_JAX_HEARTBEAT_TIMEOUT must be >= 1"):
        settings(environ={"RPO_JAX_HEARTBEAT_TIMEOUT": "0"})


@pytest.mark.parametrize("environ, has_tpu, mode", [
    ({}, True, "tpu"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "0"}, False, "ompi"),
    ({"SLURM_NTASKS": "2"}, False, None),  # no rank: not a task of a SLURM step
    ({"SLURM_NTASKS": "many", "SLURM_PROCID": "0"}, False, None),
])
def test_cluster_auto_detection(environ, has_tpu, mode):
    assert distributed.detect_cluster(environ, has_tpu) == mode
    s = settings(environ=environ, has_tpu=has_tpu)
    assert (s.mode if s else None) == mode


def test_auto_detection_can_be_switched_off():
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "RPO_JAX_DISTRIBUTED": "off"}
    assert settings(environ=env) is None
    assert settings(environ={"RPO_JAX_DISTRIBUTED": "off"}, has_tpu=True) is None


def test_put_and_fetch_on_one_process():
    mesh = partitioning.make_mesh((-1, 1, 1))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    sharded = distributed.put(x, partitioning.batch_sharding(mesh, 2))
    assert sharded.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(distributed.fetch(sharded), x)
    tree = distributed.put({"a": x, "b": np.int32(3)}, NamedSharding(mesh, PartitionSpec()))
    assert tree["a"].sharding.is_fully_replicated and int(tree["b"]) == 3
    distributed.barrier("test")  # one process: returns at once
    assert distributed.preemption_sync_point(0) is False
    assert not distributed.is_multiprocess() and jax.process_count() == 1
