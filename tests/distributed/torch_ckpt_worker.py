"""Worker for the torch sharded-checkpoint tests (run under ``torchrun``, or as one plain process).

``torch_ckpt_worker.py save DIR MESH K``: train the sft case K steps on MESH and save a sharded checkpoint.
``torch_ckpt_worker.py resume DIR MESH OUT.npz``: restore DIR onto MESH (``one``: a single unsharded process),
train the remaining steps, and (rank 0) write the losses and weights, with those of the run that never stopped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def main() -> None:
    mode, folder, mesh_text = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import torch

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import model as model_lib
    from diptych.backends.torch import train as T
    from diptych.core.mesh import MeshConfig
    from tests.distributed import cases

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    D.init_process_group("gloo")
    cfg = MeshConfig() if mesh_text == "one" else MeshConfig.parse(mesh_text)
    spec, optim, loss, loss_cfg, steps = cases.case("sft")
    step = D.train_step if D.world_size() > 1 else T.train_step
    if mode == "save":
        k = int(sys.argv[4])
        st = T.init_train_state(D.shard_model(model_lib.build(spec, spec.init_weights(0), device="cpu"), cfg), optim)
        for mbs in steps[:k]:
            st, _ = step(st, mbs, loss, loss_cfg)
        D.save(st, folder, metadata={"k": k})
        D.save_hf(st, folder.parent / "hf")
        return
    st, meta = D.restore(folder, None if mesh_text == "one" else cfg)
    got = []
    for mbs in steps[meta["k"]:]:
        st, m = step(st, mbs, loss, loss_cfg)
        got.append(m["loss"])
    weights = D.export_weights(st) if D.world_size() > 1 else T.export_weights(st)
    if not D.is_rank0():
        return
    ref = T.init_train_state(model_lib.build(spec, spec.init_weights(0), device="cpu"), optim)
    want, at_save = [], {}
    for i, mbs in enumerate(steps):
        if i == meta["k"]:
            at_save = T.export_weights(ref)
        ref, m = T.train_step(ref, mbs, loss, loss_cfg)
        want.append(m["loss"])
    out = {"loss": np.asarray(got), "ref_loss": np.asarray(want[meta["k"]:]), "step": np.asarray([st.step])}
    out.update({f"w/{k}": v for k, v in weights.items()})
    out.update({f"ref/{k}": v for k, v in T.export_weights(ref).items()})
    out.update({f"at_save/{k}": v for k, v in at_save.items()})
    np.savez(sys.argv[4], **out)


if __name__ == "__main__":
    main()
