"""Local Hugging Face checkpoint folders, read and written in numpy (no framework needed).

A folder holds ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Loading validates every name and shape against the spec
so a bad checkpoint fails here, naming the parameter, instead of deep inside a backend.
Saving writes to a temporary sibling folder and renames it, so an interrupted save never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from diptych.core import model_types
from diptych.core.fsio import atomic_dir
from diptych.core.recurrent_spec import RecurrentSpec, tiny_recurrent_spec
from diptych.core.spec import DecoderSpec, SpecError, tiny_spec

SPEC_CLASSES: dict[str, type] = {"decoder": DecoderSpec, "recurrent": RecurrentSpec}
"""Spec family (``model_types.ModelType.family``) -> the spec class that reads its ``config.json``."""

_missing = {t.family for t in model_types.MODEL_TYPES.values()} - set(SPEC_CLASSES)
if _missing:  # a family added to the table without a spec class would only fail at load time
    raise ImportError(f"diptych.core.hf has no spec class for model family {sorted(_missing)}.")

SPEC_FROM_CONFIG: dict[str, Callable[[dict[str, Any]], Any]] = {
    name: SPEC_CLASSES[t.family].from_hf_config for name, t in model_types.MODEL_TYPES.items()
}
"""model_type -> (config dict -> spec), built from the one table in ``diptych.core.model_types``."""


def spec_from_config(config: dict[str, Any]) -> Any:
    """Dispatch a ``config.json`` dict to the spec class that understands its ``model_type``."""
    model_type = config.get("model_type")
    if model_type not in SPEC_FROM_CONFIG:
        raise SpecError(f"Unknown model_type {model_type!r} in config.json; supported: {model_types.supported_text()}.")
    return SPEC_FROM_CONFIG[model_type](config)


def tiny_spec_for(model_type: str, **overrides: Any) -> Any:
    """The embedded tiny model of any supported type (what `diptych parity --model-type` builds)."""
    try:
        entry = model_types.get_model_type(model_type)
    except model_types.UnknownModelType as e:
        raise SpecError(str(e)) from None
    if entry.recurrent:
        return tiny_recurrent_spec(**overrides)
    return tiny_spec(model_type, **overrides)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; a Hugging Face checkpoint folder needs config.json "
            "and model.safetensors (or model.safetensors.index.json)."
        )
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{cfg_path} is not valid JSON: {e}") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a folder, single-file or sharded, as numpy (bf16 upcast to float32)."""
    folder = Path(path)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which is missing from {folder}.")
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")
    out: dict[str, np.ndarray] = {}
    for f in files:
        for name, arr in _load_any_dtype(f).items():
            out[name] = arr
    return out


def _load_any_dtype(path: Path) -> dict[str, np.ndarray]:
    try:
        tensors = load_file(str(path))
    except (TypeError, ValueError):
        tensors = _load_bf16_safetensors(path)
    except Exception as e:  # safetensors' SafetensorError (not a ValueError): truncated or corrupt
        raise _unreadable(path, e) from None
    return {k: np.asarray(v, dtype=np.float32) if v.dtype != np.float32 else v for k, v in tensors.items()}


def _load_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: read the raw bytes and widen them to float32 by hand."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or 8 + n > len(raw):
        raise _unreadable(path, ValueError(f"header of {n} bytes, file of {len(raw)}"))
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise _unreadable(path, e) from None
    body = memoryview(raw)[8 + n :]
    ends = [m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"]
    if ends and max(ends) > len(body):
        raise _unreadable(path, ValueError(f"tensors end at byte {max(ends)}, data holds {len(body)}"))
    widths = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        chunk = body[start:end]
        if meta["dtype"] == "BF16":
            u16 = np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16
            out[name] = u16.view(np.float32).reshape(meta["shape"])
        elif meta["dtype"] in widths:
            out[name] = np.frombuffer(chunk, dtype=widths[meta["dtype"]]).reshape(meta["shape"])
        else:
            raise SpecError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}.")
    return out


def load_hf_folder(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """Read a local checkpoint folder into ``(spec, canonical weights)``, validated: names, shapes, and every
    value finite (a NaN weight is refused here, naming the parameter, not found as a NaN loss at step 1)."""
    config = read_config(path)
    spec = spec_from_config(config)
    weights = read_safetensors(path)
    if getattr(spec, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    spec.validate_weights(weights)
    bad = first_nonfinite(weights)
    if bad is not None:
        raise SpecError(f"{path}: parameter {bad}; these weights diverged or are corrupt. Load an earlier "
                        "checkpoint or re-export it.")
    return spec, weights


def first_nonfinite(weights: dict[str, Any]) -> str | None:
    """``'name' (k of n values NaN or inf)`` for the first floating-point weight that is not finite, or None."""
    for name, w in weights.items():
        a = np.asarray(w)
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            return f"{name!r} ({int(np.sum(~np.isfinite(a)))} of {a.size} values NaN or inf)"
    return None


def _unreadable(path: Path, error: BaseException) -> SpecError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return SpecError(f"{path} is not a readable safetensors file ({first}); it is probably truncated or corrupt: "
                     "re-export or re-download it.")


def save_hf_folder(
    path: str | os.PathLike,
    spec: Any,
    weights: dict[str, np.ndarray],
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` + safetensors atomically; shard when ``max_shard_bytes`` is given."""
    spec.validate_weights(weights)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2) + "\n")
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        if max_shard_bytes is None:
            save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            _save_sharded(tmp, arrays, max_shard_bytes)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def _save_sharded(folder: Path, arrays: dict[str, np.ndarray], max_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in arrays.items():
        if shards[-1] and size + arr.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(a.nbytes for a in arrays.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
