"""Worker for the torch sharded PPO checkpoint test, under ``torchrun --nproc-per-node 2`` (gloo).

``torch_ppo_ckpt_worker.py DIR OUT.npz``: the PPO case (policy + value loss, value head) 3 steps at fsdp=2 without
stopping; again 2 steps, a sharded save, a restore onto fsdp=2 and the third step; rank 0 writes both runs'
weights and value heads, and what the checkpoint recorded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def main() -> None:
    folder, out = Path(sys.argv[1]), sys.argv[2]
    import torch

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import train as T
    from diptych.core import checkpointing as ckpt
    from diptych.core.mesh import MeshConfig
    from diptych.parity import mesh_suite as S

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    D.init_process_group("gloo")
    cfg, spec, (loss, loss_cfg) = MeshConfig(fsdp=2), S.spec_for("ppo"), S.loss_for("ppo")
    steps = S.steps_for("ppo", 3)
    fresh = lambda: D.init_train_state(T._lib(spec).build(spec, spec.init_weights(0), device="cpu"),
                                       S.optim_for("float32"), mesh=cfg, value_head=True)
    st = fresh()
    for mbs in steps:
        st, _ = D.train_step(st, mbs, loss, loss_cfg)
    straight, straight_head = D.export_weights(st), T.export_value_head(st)
    st = fresh()
    for mbs in steps[:2]:
        st, _ = D.train_step(st, mbs, loss, loss_cfg)
    D.save(st, folder)
    st, _ = D.restore(folder, cfg)
    resumed_step = st.step
    st, _ = D.train_step(st, steps[2], loss, loss_cfg)
    resumed, resumed_head = D.export_weights(st), T.export_value_head(st)
    if D.is_rank0():
        res = {"step": np.asarray([resumed_step, st.step]),
               "meta_value_head": np.asarray([bool(ckpt.read_metadata(folder)["value_head"])])}
        res.update({f"straight/w/{k}": v for k, v in {**straight, **straight_head}.items()})
        res.update({f"resumed/w/{k}": v for k, v in {**resumed, **resumed_head}.items()})
        np.savez(out, **res)
    D._barrier()


if __name__ == "__main__":
    main()
