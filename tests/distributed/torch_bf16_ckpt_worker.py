"""Worker for the torch sharded bf16 checkpoint test.

``torch_bf16_ckpt_worker.py save DIR OUT.npz`` (under ``torchrun --nproc-per-node 2``): the sft case under bf16
mixed precision 2 steps at fsdp=2, a sharded save, a restore onto fsdp=2; rank 0 writes the weights at the save,
those restored, and the third step's loss from the restored state. ``... one DIR OUT.npz`` (a plain process):
restore DIR on one process and write its weights, dtypes and the third step's loss.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np


def main() -> None:
    mode, folder, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import torch

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import train as T
    from diptych.core.mesh import MeshConfig
    from diptych.parity import mesh_suite as S

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    spec, (loss, cfg), steps = S.spec_for("sft"), S.loss_for("sft"), S.steps_for("sft", 3)
    if mode == "one":
        st, _ = D.restore(folder)
        weights = T.export_weights(st)
        model_dtype = str(next(st.model.parameters()).dtype)
        st, m = T.train_step(st, steps[2], loss, cfg)
        np.savez(out, loss=np.asarray([m["loss"]]), mp=np.asarray([st.optim.mixed_precision]),
                 dtype=np.asarray([model_dtype]), **{f"w/{k}": v for k, v in weights.items()})
        return
    D.init_process_group("gloo")
    model = T._lib(spec).build(spec, spec.init_weights(0), device="cpu")
    st = D.init_train_state(model, S.optim_for("bfloat16"), mesh=MeshConfig(fsdp=2))
    for mbs in steps[:2]:
        st, _ = D.train_step(st, mbs, loss, cfg)
    saved = D.export_weights(st)
    D.save(st, folder)
    st, _ = D.restore(folder, MeshConfig(fsdp=2))
    restored = D.export_weights(st)
    st, m = D.train_step(st, steps[2], loss, cfg)
    if D.is_rank0():
        np.savez(out, loss=np.asarray([m["loss"]]), mp=np.asarray([st.optim.mixed_precision]),
                 **{f"saved/w/{k}": v for k, v in saved.items()}, **{f"restored/w/{k}": v for k, v in restored.items()})
    D._barrier()


if __name__ == "__main__":
    main()
