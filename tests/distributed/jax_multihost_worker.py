"""Worker for the multi-host JAX test: one of two processes on this machine, each with 2 simulated CPU devices.

``jax_multihost_worker.py OUT.npz MESH [STEPS]`` with ``DIPTYCH_COORDINATOR``, ``DIPTYCH_NUM_PROCESSES=2`` and
``DIPTYCH_PROCESS_ID`` set: join the job (``sharding.initialize``: ``jax.distributed`` with gloo collectives),
lay the sft case out on MESH over the 4 global devices, train, gather the weights to every process; process 0
then runs the same steps on one local device and writes both runs' losses and weights and the job's layout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def main() -> None:
    out, mesh_text = sys.argv[1], sys.argv[2]
    steps_to_run = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    from diptych.backends.jax import sharding as S

    assert S.initialize(), "the environment should describe a two-process job"
    import jax

    from diptych.backends.jax import model as model_lib
    from diptych.backends.jax import train as T
    from diptych.core import mesh as M
    from diptych.core.mesh import MeshConfig
    from tests.distributed import cases

    spec, optim, loss, loss_cfg, steps = cases.case("sft", steps=steps_to_run)
    st = T.init_train_state(model_lib.build(spec, spec.init_weights(0)), optim)
    st = S.shard_state(st, S.make_mesh(MeshConfig.parse(mesh_text)))
    losses = []
    for mbs in steps:
        st, m = T.train_step(st, mbs, loss, loss_cfg)
        losses.append(float(m["loss"]))
    weights = {k: S.to_host(v) for k, v in S.named_leaves(st.params).items()}
    local_bytes = sorted(S.bytes_per_device(st.params, st.opt_state).values())
    M.barrier()  # the core's barrier: JAX's sync_global_devices, registered by initialize
    if jax.process_index() != 0:
        return
    ref = T.init_train_state(model_lib.build(spec, spec.init_weights(0)), optim)
    want = []
    for mbs in steps:
        ref, m = T.train_step(ref, mbs, loss, loss_cfg)
        want.append(float(m["loss"]))
    res = {"loss": np.asarray(losses), "ref_loss": np.asarray(want),
           "layout": np.asarray([jax.process_count(), jax.device_count(), jax.local_device_count(),
                                 M.process_index(), M.process_count()]),
           "local_bytes": np.asarray(local_bytes), "total": np.asarray([S.total_bytes(ref.params, ref.opt_state)])}
    res.update({f"w/{k}": v for k, v in weights.items()})
    res.update({f"ref/{k}": v for k, v in T.export_weights(ref).items()})
    np.savez(out, **res)


if __name__ == "__main__":
    main()
