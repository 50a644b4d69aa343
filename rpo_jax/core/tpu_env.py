"""libtpu on a machine without TPUs: keep JAX quiet.

The ``plan`` extra installs libtpu (to compile for TPU topologies from a CPU host). On a machine
with no TPU chips, JAX then probes for a TPU whenever the persistent compilation cache is on and
libtpu prints several lines of errors about ``TPU_ACCELERATOR_TYPE`` and
``TPU_WORKER_HOSTNAMES``. Giving libtpu those two values (a placeholder slice on localhost)
silences it; the devices JAX uses are unchanged (the CPU), and ahead-of-time compiles for a
topology still work. Nothing is set on a TPU VM (it has /dev/accel* or /dev/vfio devices) or when
the variables are already set.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import MutableMapping

PLACEHOLDER = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_SKIP_MDS_QUERY": "1"}


def has_tpu_chips() -> bool:
    """Whether this machine exposes TPU chips (TPU VMs: /dev/accel* or /dev/vfio)."""
    return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def quiet_libtpu_without_tpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the placeholder variables when libtpu is installed and no TPU is present (call before
    JAX starts a backend); returns whether it set them."""
    if importlib.util.find_spec("libtpu") is None or has_tpu_chips():
        return False
    for key, value in PLACEHOLDER.items():
        environ.setdefault(key, value)
    return True
