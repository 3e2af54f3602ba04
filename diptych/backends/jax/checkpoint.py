"""JAX checkpoints: Orbax for weights and optimizer state, written atomically.

A checkpoint directory holds ``state/`` (an Orbax ``StandardCheckpointer`` tree of the
float32 master params, value head included, and the optax state; of a LoRA state, the adapters and their
optax state, with the frozen base in ``base/``, an HF folder, and the adapters also in ``adapter/``, a PEFT
folder) and ``diptych.json``
(step, configs, the caller's metadata: run config, data position, RNG state).
``diptych.backends.torch.checkpoint`` is the same contract with safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file, save_file

from diptych.backends.facade import (
    ADAPTER_DIR,
    base_weights,
    checkpoint_extra,
    lora_config,
    lora_from_metadata,
    read_checkpoint,
)
from diptych.backends.jax import train
from diptych.core import checkpointing as ckpt
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.mesh import is_main_process

NF4_FILE = "base_nf4.safetensors"
"""A QLoRA checkpoint's NF4 base as stored (codes, absmax and its double-quantised form, per target module), so a
resume runs the very same quantised weights (``base/`` holds their dequantised values)."""
BASE_DIR = "base"
"""A LoRA checkpoint's frozen base weights: a Hugging Face folder (written once per checkpoint, never trained)."""


def save(state: train.TrainState, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
         keep_last: int | None = None) -> Path:
    """Write ``state`` to the directory ``path`` atomically; with ``keep_last``, prune older ``step_*`` siblings.

    ``metadata`` is the caller's JSON-able dict (run config, data position, RNG state via
    :func:`diptych.core.checkpointing.rng_state`); :func:`restore` returns it unchanged.
    """
    path = Path(path)
    spec = state.spec
    lora = lora_config("diptych.backends.jax", state.model)
    with ckpt.job_atomic_dir(path) as tmp:  # multi-host: every process writes its shards, process 0 renames
        if lora is not None:  # the frozen base once, as an HF folder (the Orbax tree holds the adapters only)
            from diptych.core.lora import save_adapter

            save_hf_folder(tmp / BASE_DIR, spec, base_weights(train.__package__, state.model))
            save_adapter(tmp / ADAPTER_DIR, train.export_adapters(state), lora)
            if lora.quantize_base == "nf4":  # the packed base itself: re-quantising its dequantised form is not exact
                save_file(nf4_arrays(state.model), str(tmp / NF4_FILE))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / "state").absolute(), {"params": state.params, "opt_state": state.opt_state})
        checkpointer.wait_until_finished()
        checkpointer.close()
        if is_main_process():
            ckpt.write_metadata(tmp, backend="jax", step=state.step, spec=spec, optim=state.optim,
                                extra={**checkpoint_extra(state.model, state.params["value_head"] is not None, lora),
                                       "seed": state.seed},  # LoRA dropout's masks continue from it
                                user=metadata)
    if keep_last is not None and is_main_process():
        ckpt.prune(path.parent, keep_last)
    return path


def restore(path: str | os.PathLike, *, mesh: Any = None) -> tuple[train.TrainState, dict[str, Any]]:
    """Load a checkpoint written by :func:`save`: ``(state, metadata)``; training continues exactly.

    ``mesh`` (a ``MeshConfig`` or ``Mesh``; default one device) is where the state goes: Orbax reads each
    array straight into its new shards, whatever mesh the checkpoint was saved on.
    """
    path = Path(path)
    meta, spec, optim, options = read_checkpoint(path, "jax")
    if not (path / "state").is_dir():
        raise ckpt.CheckpointError(f"{path} lacks state/ (the Orbax tree); the checkpoint is incomplete.")
    lora = lora_from_metadata(meta)
    if lora is None:
        zeros = {k: np.zeros(s, np.float32) for k, s in spec.param_shapes().items()}
        model = train._lib(spec).build(spec, zeros, **options)
    else:  # the base from its HF folder; the adapters (zeros here) come from the Orbax tree below
        if not (path / BASE_DIR / "config.json").is_file():
            raise ckpt.CheckpointError(f"{path} is a LoRA checkpoint without {BASE_DIR}/ (its frozen base); the "
                                       "checkpoint is incomplete.")
        _, base = load_hf_folder(path / BASE_DIR)
        model = train._lora().apply_lora(train._lib(spec).build(spec, base, **options), lora)
        if lora.quantize_base == "nf4":
            load_nf4_arrays(model, load_file(str(path / NF4_FILE)))
    state = train.init_train_state(model, optim, value_head=bool(meta.get("value_head")), mesh=mesh,
                                   seed=int(meta.get("seed", 0)))  # a checkpoint older than the seed: 0
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": state.params, "opt_state": state.opt_state})
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore((path / "state").absolute(), target)
    checkpointer.close()
    state.params, state.opt_state = restored["params"], restored["opt_state"]
    state.step = int(meta["step"])
    return state, meta["metadata"]


def nf4_arrays(model: Any) -> dict[str, np.ndarray]:
    """``{module.weight.field: array}`` of every NF4 base in ``model`` (``codes``, ``absmax``, ...)."""
    return train._lora().export_quantized(model)


def load_nf4_arrays(model: Any, arrays: dict[str, np.ndarray]) -> None:
    """Replace each NF4 base of ``model`` by the stored one."""
    from diptych.core.lora import LoRAError

    try:
        train._lora().load_quantized(model, arrays)
    except LoRAError as e:
        raise ckpt.CheckpointError(f"{NF4_FILE}: {e}") from None
