"""Worker for the JAX sharded-checkpoint test, one process with 8 simulated CPU devices.

``jax_ckpt_worker.py ROOT OUT.npz``: train the sft case 2 steps at fsdp=4 and save (Orbax: each process writes
the shards it holds); restore at fsdp=2 and on one device and train the remaining steps; run the same steps
without stopping; write all three runs' losses and weights, and the restored arrays' shardings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

SAVED_AT = 2


def main() -> None:
    import jax

    from diptych.backends.jax import checkpoint, sharding
    from diptych.backends.jax import model as model_lib
    from diptych.backends.jax import train as T
    from diptych.core.mesh import MeshConfig
    from tests.distributed import cases

    root, out = Path(sys.argv[1]), sys.argv[2]
    spec, optim, loss, loss_cfg, steps = cases.case("sft")
    fresh = lambda: T.init_train_state(model_lib.build(spec, spec.init_weights(0)), optim)
    mesh = lambda text: sharding.make_mesh(MeshConfig.parse(text), jax.devices()[:MeshConfig.parse(text).size])
    results: dict[str, np.ndarray] = {}

    ref = fresh()
    losses = []
    for mbs in steps:
        ref, m = T.train_step(ref, mbs, loss, loss_cfg)
        losses.append(m["loss"])
    results["ref/loss"] = np.asarray(losses[SAVED_AT:])
    results.update({f"ref/w/{k}": v for k, v in T.export_weights(ref).items()})

    st = sharding.shard_state(fresh(), mesh("fsdp=4"))
    for mbs in steps[:SAVED_AT]:
        st, _ = T.train_step(st, mbs, loss, loss_cfg)
    checkpoint.save(st, root / "step")
    for name, target in (("fsdp=2", mesh("fsdp=2")), ("one", None)):
        st, _ = checkpoint.restore(root / "step", mesh=target)
        results[f"{name}/devices"] = np.asarray([len(jax.tree.leaves(st.params)[0].sharding.device_set)])
        results[f"{name}/bytes"] = np.asarray(sorted(sharding.bytes_per_device(st.params, st.opt_state).values()))
        losses = []
        for mbs in steps[SAVED_AT:]:
            st, m = T.train_step(st, mbs, loss, loss_cfg)
            losses.append(m["loss"])
        results[f"{name}/loss"] = np.asarray(losses)
        results[f"{name}/step"] = np.asarray([st.step])
        results.update({f"{name}/w/{k}": v for k, v in T.export_weights(st).items()})
    np.savez(out, **results)


if __name__ == "__main__":
    main()
