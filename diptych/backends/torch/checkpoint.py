"""Torch checkpoints: safetensors weights + ``torch.save``-d optimizer state, written atomically.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` (so it is also a
Hugging Face folder that transformers loads directly; of a LoRA state, the frozen base, with the adapters
in ``adapter/``, a PEFT folder), ``value_head.safetensors`` when the
state has one, ``optimizer.pt`` (the AdamW state dict, read back with
``torch.load(weights_only=True)``) and ``diptych.json`` (step, configs, the caller's
metadata: run config, data position, RNG state). ``diptych.backends.jax.checkpoint`` is the
same contract with Orbax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from diptych.backends.facade import (
    ADAPTER_DIR,
    base_weights,
    checkpoint_extra,
    lora_config,
    lora_from_metadata,
    read_checkpoint,
)
from diptych.backends.torch import distributed, train
from diptych.core import checkpointing as ckpt
from diptych.core.lora import LoRAConfig

NF4_FILE = "base_nf4.safetensors"
"""A QLoRA checkpoint's NF4 base as stored (codes, absmax and its double-quantised form, per target module), so a
resume runs the very same quantised weights (``model.safetensors`` holds their dequantised values, for transformers)."""


def save(state: train.TrainState, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
         keep_last: int | None = None) -> Path:
    """:meth:`diptych.core.backend.Backend.save` on torch: safetensors weights (a Hugging Face folder too),
    the AdamW state dict and ``diptych.json`` with the caller's ``metadata``, in one atomic rename. A sharded
    state writes a sharded checkpoint (:func:`diptych.backends.torch.distributed.save`: each rank its shards)."""
    path = Path(path)
    if distributed.is_sharded(state):
        distributed.save(state, path, metadata=metadata)
        if keep_last is not None and distributed.is_rank0():
            ckpt.prune(path.parent, keep_last)
        return path
    spec = state.model.spec
    lora = lora_config("diptych.backends.torch", state.model)
    with ckpt.atomic_dir(path) as tmp:
        # LoRA: the frozen base once (the folder stays an HF folder, of the base) and the adapters as a PEFT folder
        weights = train.export_weights(state) if lora is None else base_weights(train.__package__, state.model)
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2) + "\n")
        if lora is not None:
            from diptych.core.lora import save_adapter

            save_adapter(tmp / ADAPTER_DIR, train.export_adapters(state), lora)
            if lora.quantize_base == "nf4":  # the packed base itself: re-quantising its dequantised form is not exact
                save_file(nf4_tensors(state.model), str(tmp / NF4_FILE))
        head = train.export_value_head(state)
        if head is not None:
            save_file(head, str(tmp / "value_head.safetensors"))
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        ckpt.write_metadata(tmp, backend="torch", step=state.step, spec=spec, optim=state.optim,
                            extra={**checkpoint_extra(state.model, head is not None, lora),
                                   "seed": state.seed},  # LoRA dropout's masks continue from it
                            user=metadata)
    if keep_last is not None:
        ckpt.prune(path.parent, keep_last)
    return path


def restore(path: str | os.PathLike, *, device: str | None = None, mesh: Any = None,
            ) -> tuple[train.TrainState, dict[str, Any]]:
    """Load a checkpoint written by :func:`save`: ``(state, metadata)``; training continues exactly.

    A sharded checkpoint restores onto ``mesh`` (any mesh, or one process), whatever mesh saved it.
    """
    path = Path(path)
    if distributed.is_sharded_checkpoint(path):
        return distributed.restore(path, mesh)
    if mesh is not None and not distributed.M.resolve(None if mesh == "auto" else mesh,
                                                      distributed.world_size()).is_single:
        raise ckpt.CheckpointError(f"{path} is a one-process checkpoint; restore it without a mesh, or save it "
                                   "again from a sharded run to resume on a mesh.")
    meta, spec, optim, options = read_checkpoint(path, "torch")
    from diptych.core.hf import read_safetensors

    model = train._lib(spec).build(spec, read_safetensors(path), device=device, **options)
    lora = lora_from_metadata(meta)
    if lora is not None:
        model = train._lora().apply_lora(model, lora, adapters=_read_adapters(path, lora))
        if lora.quantize_base == "nf4":
            load_nf4_tensors(model, load_file(str(path / NF4_FILE)))
    state = train.init_train_state(model, optim, value_head=bool(meta.get("value_head")),
                                   seed=int(meta.get("seed", 0)))  # a checkpoint older than the seed: 0
    if meta.get("value_head"):
        train.load_weights(state, load_file(str(path / "value_head.safetensors")))
    opt_file = path / "optimizer.pt"
    if not opt_file.is_file():
        raise ckpt.CheckpointError(f"{path} lacks optimizer.pt; the checkpoint is incomplete.")
    state.optimizer.load_state_dict(torch.load(opt_file, weights_only=True, map_location=state.master[0].device))
    state.step = int(meta["step"])
    return state, meta["metadata"]



def _read_adapters(path: Path, lora: LoRAConfig) -> dict[str, np.ndarray]:
    """The adapters of a LoRA checkpoint (its PEFT folder), refusing a folder that is not there."""
    folder = path / ADAPTER_DIR
    if not folder.is_dir():
        raise ckpt.CheckpointError(f"{path} is a LoRA checkpoint without {ADAPTER_DIR}/ (its adapters); the checkpoint "
                                   "is incomplete.")
    from diptych.core.lora import load_adapter

    adapters, _ = load_adapter(folder)
    return adapters


def nf4_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``{module.weight.field: array}`` of every NF4 base in ``model`` (``codes``, ``absmax``, ...)."""
    out = {}
    for name, layer in model.named_modules():
        q = getattr(layer, "quantized", None)
        if q is not None and hasattr(q, "tensors"):
            for field, t in q.tensors().items():
                out[f"{name}.weight.{field}"] = t.detach().cpu().numpy().copy()
    return out


def load_nf4_tensors(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Replace each NF4 base of ``model`` by the stored one (same fields, same device)."""
    import dataclasses

    for name, layer in model.named_modules():
        q = getattr(layer, "quantized", None)
        if q is None or not hasattr(q, "tensors"):
            continue
        fields = {}
        for field, t in q.tensors().items():
            key = f"{name}.weight.{field}"
            if key not in arrays:
                raise ckpt.CheckpointError(f"{NF4_FILE} lacks {key}; the QLoRA checkpoint is incomplete.")
            fields[field] = torch.as_tensor(arrays[key]).to(device=t.device, dtype=t.dtype)
        layer.quantized = dataclasses.replace(q, **fields)
