"""Multi-host (pod, cluster) jobs: start-up, global arrays from host data, and barriers.

One process runs per host and every process runs the same program. :func:`settings_from`
decides, before JAX starts a backend, whether this run is one process of several and how they
meet (a pure function of the command-line flags and the environment):

* explicit: ``--coordinator-address HOST:PORT --num-processes N --process-id I`` (or the
  environment variables ``RPO_JAX_COORDINATOR_ADDRESS``, ``RPO_JAX_NUM_PROCESSES``,
  ``RPO_JAX_PROCESS_ID``; flags win), e.g. several processes on one machine
  (``launch/local_multiprocess.sh``);
* auto-detected: on a Cloud TPU VM (TPU chips present), under SLURM with more than one task
  (``SLURM_NTASKS``) or under Open MPI with more than one rank (``OMPI_COMM_WORLD_SIZE``),
  ``jax.distributed.initialize()`` finds the coordinator, the count and the rank itself;
* otherwise (or with ``RPO_JAX_DISTRIBUTED=off``, or ``--num-processes 1``): one process.

:func:`initialize` then calls ``jax.distributed.initialize`` with a heartbeat timeout
(``--heartbeat-timeout`` / ``RPO_JAX_HEARTBEAT_TIMEOUT``, default :data:`DEFAULT_HEARTBEAT`
seconds): when a peer dies (SIGKILL, a lost host), JAX's coordination service stops every
other process within about that time instead of letting it hang in a collective. JAX ends
them with SIGABRT (exit status 134 in a shell; its C++ log says "Terminating process because
the JAX distributed service detected fatal errors. This most likely indicates that another
task died" and names the unhealthy tasks). jax.distributed.initialize offers no hook to
replace that abort (jaxlib's client-side callback cannot be given a Python function: its
status argument has no Python type), so :data:`PEER_DIED` is what the launchers look for to
say in one line that a peer died.

The data helpers work on one process and on many:

* :func:`put`: a host array (the same on every process, e.g. a cache every host computed) → a
  global ``jax.Array`` with a given sharding; each process hands over only the slices its own
  devices hold (``jax.make_array_from_callback``). ``jax.device_put`` of a host array cannot
  address another host's devices; on one process :func:`put` is ``jax.device_put``.
* :func:`fetch`: a global array → the whole NumPy array on every process (an all-gather when
  shards live on other hosts).
* :func:`barrier`: every process waits here for the others (a no-op on one process), e.g. the
  others wait while process 0 writes files they then read.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from rpo_jax.core import logs, tpu_env

log = logs.get_logger(__name__)

ENV_COORDINATOR = "RPO_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RPO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RPO_JAX_PROCESS_ID"
ENV_HEARTBEAT = "RPO_JAX_HEARTBEAT_TIMEOUT"
ENV_SWITCH = "RPO_JAX_DISTRIBUTED"  # "off": never initialize (one process)
DEFAULT_HEARTBEAT = 60  # seconds; JAX's own default is 100
PEER_DIED = "JAX distributed service detected fatal errors"  # in the log of a process JAX stopped
FLAGS = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
         "process_id": "--process-id"}
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a multi-process job.

    mode: 'explicit' (the three values given) or one of 'tpu', 'slurm', 'ompi' (JAX detects
    them); heartbeat_timeout: seconds after which a silent peer counts as dead.
    """
    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = DEFAULT_HEARTBEAT

    def describe(self) -> str:
        if self.mode == "explicit":
            return (f"process {self.process_id} of {self.num_processes}, coordinator "
                    f"{self.coordinator_address}")
        return (f"{self.mode} cluster (auto-detected by JAX): process {jax.process_index()} of "
                f"{jax.process_count()}")


def _int(value: Any, name: str, minimum: int) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def detect_cluster(environ: Mapping[str, str], has_tpu: bool) -> str | None:
    """The cluster JAX can auto-detect here: 'tpu' (a TPU VM), 'slurm' (SLURM_NTASKS > 1),
    'ompi' (OMPI_COMM_WORLD_SIZE > 1), or None."""
    def more_than_one(key: str) -> bool:
        try:
            return int(environ.get(key, "1")) > 1
        except ValueError:
            return False

    if has_tpu:
        return "tpu"
    if more_than_one("SLURM_NTASKS") and "SLURM_PROCID" in environ:
        return "slurm"
    if more_than_one("OMPI_COMM_WORLD_SIZE") and "OMPI_COMM_WORLD_RANK" in environ:
        return "ompi"
    return None


def settings_from(coordinator_address: str | None = None, num_processes: int | str | None = None,
                  process_id: int | str | None = None, heartbeat_timeout: int | str | None = None,
                  *, environ: Mapping[str, str] | None = None,
                  has_tpu: bool | None = None) -> Settings | None:
    """The multi-process settings from the flags (None: not given) and ``environ``; None for a
    single-process run. Bad or partial values raise ValueError naming the flag / variable."""
    environ = os.environ if environ is None else environ
    has_tpu = tpu_env.has_tpu_chips() if has_tpu is None else has_tpu
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    envs = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
            "process_id": ENV_PROCESS_ID}
    names = {}
    for key, env in envs.items():
        if given[key] is None and environ.get(env, "").strip():
            given[key], names[key] = environ[env].strip(), env
        else:
            names[key] = FLAGS[key]
    if heartbeat_timeout is None and environ.get(ENV_HEARTBEAT, "").strip():
        heartbeat = _int(environ[ENV_HEARTBEAT], ENV_HEARTBEAT, 1)
    else:
        heartbeat = DEFAULT_HEARTBEAT if heartbeat_timeout is None else _int(
            heartbeat_timeout, "--heartbeat-timeout", 1)
    if given["num_processes"] is not None:
        given["num_processes"] = _int(given["num_processes"], names["num_processes"], 1)
    if given["process_id"] is not None:
        given["process_id"] = _int(given["process_id"], names["process_id"], 0)
    if given["num_processes"] == 1:
        if given["process_id"] not in (None, 0):
            raise ValueError(f"{names['process_id']} must be 0 with {names['num_processes']} 1, "
                             f"got {given['process_id']}")
        return None
    if any(v is not None for v in given.values()):
        missing = [names[k] for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"a multi-process run needs {', '.join(FLAGS.values())} together "
                             f"(or {', '.join(envs.values())}); missing {', '.join(missing)}")
        if not _ADDRESS.match(given["coordinator_address"]):
            raise ValueError(f"{names['coordinator_address']} must be HOST:PORT (process 0's "
                             f"address), got {given['coordinator_address']!r}")
        if given["process_id"] >= given["num_processes"]:
            raise ValueError(f"{names['process_id']} must be < {names['num_processes']} "
                             f"({given['num_processes']}), got {given['process_id']}")
        return Settings("explicit", heartbeat_timeout=heartbeat, **given)
    if environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    mode = detect_cluster(environ, has_tpu)
    return None if mode is None else Settings(mode, heartbeat_timeout=heartbeat)


def initialize(settings: Settings | None) -> None:
    """Join the multi-process job (``jax.distributed.initialize``) unless ``settings`` is None or
    JAX is already initialized; call before anything starts a JAX backend."""
    if settings is None or jax.distributed.is_initialized():
        return
    if settings.mode == "explicit":
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                                   settings.process_id,
                                   heartbeat_timeout_seconds=settings.heartbeat_timeout)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=settings.heartbeat_timeout)
    log.info(f"[distributed] {settings.describe()}: {jax.local_device_count()} local and "
             f"{jax.device_count()} "
             f"devices in all; a peer silent for {settings.heartbeat_timeout}s stops the job",
             extra=logs.ALL_PROCESSES)


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# ---- data ---------------------------------------------------------------------------------------

def _put_one(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: Any, shardings: Any, *, may_alias: bool | None = None) -> Any:
    """Host arrays (or local jax arrays) holding the same values on every process → global
    arrays with ``shardings`` (one sharding for every leaf, or a tree of them like ``tree``).

    One process: ``jax.device_put(tree, shardings, may_alias=may_alias)``. Several: each
    process builds only its own devices' shards from its copy (``make_array_from_callback``).
    """
    if not is_multiprocess():
        return jax.device_put(tree, shardings, may_alias=may_alias)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_one(x, shardings), tree)
    return jax.tree.map(_put_one, tree, shardings)


def fetch(x: Any) -> np.ndarray:
    """A (global) array → the whole array as NumPy on every process (all-gathered across hosts
    when some shards live on other processes' devices)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        # process_allgather of a global array assembles it from every process's shards
        from_hosts = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(from_hosts)
    return np.asarray(x)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op on one process). ``name`` must be
    the same on every process and unique to the place in the program."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def preemption_sync_point(step: int) -> bool:
    """Whether every process should save now because one of them got SIGTERM (or another
    preemption notice): True at the same ``step`` on every process. Call it at every step on
    every process. Only for multi-process jobs (JAX's preemption service catches SIGTERM there);
    False on one process, where the caller's own SIGTERM handler decides."""
    if not (is_multiprocess() and jax.distributed.is_initialized()):
        return False
    return bool(multihost_utils.reached_preemption_sync_point(step))


__all__ = ["Settings", "settings_from", "detect_cluster", "initialize", "is_multiprocess",
           "put", "fetch", "barrier", "preemption_sync_point", "DEFAULT_HEARTBEAT"]
