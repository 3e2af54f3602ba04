"""Worker for the torch distributed tests: run under ``torchrun --nproc-per-node N`` (gloo on CPU).

``python -m torch.distributed.run --nproc-per-node N tests/distributed/torch_worker.py OUT.npz MESH CASES`` runs
each case (sft, dpo, grpo, recurrent) sharded on ``MESH`` and, on rank 0, the same steps on one process; rank 0
writes both runs' losses and final weights and every rank's local bytes of parameters plus AdamW state to
``OUT.npz``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def main() -> None:
    out, mesh_text, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    import torch
    import torch.distributed as dist

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import train as T
    from diptych.core.mesh import MeshConfig
    from tests.distributed import cases

    logging.getLogger("torch.distributed.tensor").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    D.init_process_group("gloo")
    cfg = MeshConfig.parse(mesh_text)
    results: dict[str, np.ndarray] = {}
    for name in names:
        spec, optim, loss, loss_cfg, steps = cases.case(name)
        st = D.init_train_state(_build(T, spec, name), optim, mesh=cfg, remat=cases.remat(name))
        got = []
        for mbs in steps:
            st, m = D.train_step(st, mbs, loss, loss_cfg)
            got.append(m["loss"])
        weights = D.export_weights(st)
        gen = None
        if name == "sft":  # generation on the trained sharded model (tensor parallel too)
            gen = np.asarray(D.generate(st.model, cases.PROMPTS, cases.greedy()).tokens)
        everyone: list = [None] * D.world_size()
        dist.all_gather_object(everyone, D.local_bytes(st))
        if not D.is_rank0():
            continue
        key = f"{name}/{mesh_text}"
        results[f"{key}/loss"] = np.asarray(got)
        results[f"{key}/bytes"] = np.asarray(everyone)
        results[f"{key}/total"] = np.asarray([_total_bytes(weights)])
        for k, v in weights.items():
            results[f"{key}/w/{k}"] = v
        ref = T.init_train_state(_build(T, spec, name), optim)
        want = []
        for mbs in steps:
            ref, m = T.train_step(ref, mbs, loss, loss_cfg)
            want.append(m["loss"])
        if gen is not None:
            from diptych.backends.torch import sampler

            results[f"{key}/gen"] = gen
            results[f"{name}/one/gen"] = np.asarray(sampler.generate(ref.model, cases.PROMPTS, cases.greedy()).tokens)
        results[f"{name}/one/loss"] = np.asarray(want)
        for k, v in T.export_weights(ref).items():
            results[f"{name}/one/w/{k}"] = v
    if D.is_rank0():
        np.savez(out, **results)
    dist.destroy_process_group()


def _build(T, spec, name: str):
    from tests.distributed import cases

    return T._lib(spec).build(spec, spec.init_weights(0), device="cpu", **cases.build_options(name))


def _total_bytes(weights: dict) -> int:
    """Parameters plus AdamW's two moments, float32, counted once."""
    return 3 * sum(v.nbytes for v in weights.values())


if __name__ == "__main__":
    main()
