"""Worker for the JAX distributed tests, run in its own process with 8 simulated CPU devices.

``python tests/distributed/jax_worker.py OUT.npz CASE@MESH ...`` runs each case (sft, dpo, grpo, recurrent) on
its mesh (``fsdp=4``, ``data=2,fsdp=2``; ``one`` is one device) and writes each run's losses, final weights and
the per-device bytes of parameters plus optimizer state to ``OUT.npz``. ``memory@MESH`` only places the sft
state on the mesh (no step) and records its bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def run(name: str, mesh_text: str | None, results: dict, steps_to_run: int | None = None) -> None:
    import jax

    from diptych.backends.jax import sharding as S
    from diptych.backends.jax import train as T
    from diptych.core.mesh import MeshConfig
    from tests.distributed import cases

    spec, optim, loss, loss_cfg, steps = cases.case(name)
    model = T._lib(spec).build(spec, spec.init_weights(0), **cases.build_options(name))
    st = T.init_train_state(model, optim, remat=cases.remat(name))
    key = f"{name}/{mesh_text or 'one'}"
    if mesh_text:
        cfg = MeshConfig.parse(mesh_text)
        st = S.shard_state(st, S.make_mesh(cfg, jax.devices()[:cfg.size]))
    losses = []
    for mbs in steps[:steps_to_run]:
        st, m = T.train_step(st, mbs, loss, loss_cfg)
        losses.append(m["loss"])
    results[f"{key}/loss"] = np.asarray(losses)
    results[f"{key}/bytes"] = np.asarray(sorted(S.bytes_per_device(st.params, st.opt_state).values()))
    results[f"{key}/total"] = np.asarray([S.total_bytes(st.params, st.opt_state)])
    for k, v in T.export_weights(st).items():
        results[f"{key}/w/{k}"] = v
    if name == "sft" and steps_to_run != 0:  # generation on the trained (sharded) model
        from diptych.backends.jax import sampler

        results[f"{key}/gen"] = np.asarray(sampler.generate(st.model, cases.PROMPTS, cases.greedy()).tokens)


def main() -> None:
    results: dict[str, np.ndarray] = {}
    for item in sys.argv[2:]:
        item, _, k = item.partition("#")  # CASE@MESH#K: only the first K steps
        name, _, mesh_text = item.partition("@")
        mesh_text = None if mesh_text == "one" else mesh_text
        if name == "memory":
            run("sft", mesh_text, results, steps_to_run=0)
        else:
            run(name, mesh_text, results, steps_to_run=int(k) if k else None)
    np.savez(sys.argv[1], **results)


if __name__ == "__main__":
    main()
