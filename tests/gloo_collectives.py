"""Cross-process collectives on CPU (gloo) against NumPy: reduce-scatter (psum_scatter), all-reduce
and all-gather of random blocks of 20 random sizes over a 4-device mesh. A public report says
gloo's CPU reduce-scatter can return wrong data; tests/test_multihost.py runs this as
``launch/local_multiprocess.sh 2 python tests/gloo_collectives.py`` and reads the printed errors."""
import sys
from rpo_jax.core import distributed
i = sys.argv.index("--process-id")
distributed.initialize(distributed.settings_from(sys.argv[i - 3], sys.argv[i - 1], sys.argv[i + 1]))
import functools
import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("d",))
rng = np.random.default_rng(0)
worst = {"rs": 0.0, "ar": 0.0, "ag": 0.0}
for trial in range(20):
    n = int(rng.integers(1, 64)) * 4
    x = rng.standard_normal((4, n, 33)).astype(np.float32)  # one block per device
    g = distributed.put(x, NamedSharding(mesh, P("d")))
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    def rs(b):
        return jax.lax.psum_scatter(b[0], "d", scatter_dimension=0, tiled=True)[None]
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("d"), out_specs=P(), check_vma=False)
    def ar(b):
        return jax.lax.psum(b[0], "d")
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("d"), out_specs=P(), check_vma=False)
    def ag(b):
        return jax.lax.all_gather(b[0], "d")
    want = x.sum(0)
    got_rs = distributed.fetch(jax.jit(rs)(g)).reshape(want.shape)
    got_ar = np.asarray(jax.jit(ar)(g))
    got_ag = np.asarray(jax.jit(ag)(g))
    worst["rs"] = max(worst["rs"], float(np.abs(got_rs - want).max()))
    worst["ar"] = max(worst["ar"], float(np.abs(got_ar - want).max()))
    worst["ag"] = max(worst["ag"], float(np.abs(got_ag - x).max()))
print("max abs errors", json.dumps(worst), flush=True)
