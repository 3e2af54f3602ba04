"""``diptych convert SRC DST --to jax|torch|hf``: move a checkpoint between backends and Hugging Face.

SRC is a diptych checkpoint of either backend (a folder with ``diptych.json``) or a Hugging
Face folder (``config.json`` + safetensors). Converting between backends carries the
weights, the value head, the AdamW moments, the step and the caller's metadata, so a run
saved on one backend resumes on the other. ``--to hf`` writes the policy weights only.

LoRA: a LoRA checkpoint converts between backends with its base, adapters and their moments, and ``--to hf``
writes the merged model plus ``DST/adapter`` (PEFT's folder). SRC may also be a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``): ``--base BASE --to hf`` merges it onto the Hugging
Face folder BASE, refusing an adapter whose modules or shapes are not BASE's.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from diptych.core import checkpointing as ckpt
from diptych.core.backend import ADAPTER_DIR, backend_names, get_backend
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.lora import ADAPTER_CONFIG, load_adapter, merge_weights, save_adapter
from diptych.core.model_types import is_recurrent
from diptych.core.optim import OptimConfig

HELP = "convert a checkpoint between backends and Hugging Face folders; merge a LoRA adapter folder onto its base"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a diptych checkpoint folder (jax or torch) or a Hugging Face folder")
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--to", required=True, choices=[*backend_names(), "hf"], help="output format")
    parser.add_argument("--base", help="with an adapter folder as SRC: the Hugging Face folder of its base model")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.src, args.dst, args.to, base=getattr(args, "base", None))
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"diptych convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def _modules(backend: str, *concerns: str) -> list[Any]:
    """A backend's modules by name: only the framework of the backend asked for gets imported."""
    return [importlib.import_module(f"diptych.backends.{backend}.{c}") for c in concerns]


def load_portable(src: str | Path) -> dict[str, Any]:
    """Read any supported checkpoint into a backend-neutral dict of numpy arrays and settings.

    Keys: ``spec``, ``weights`` (canonical HF names), ``value_head`` (or None), ``optimizer``
    (``{"count", "mu", "nu"}`` or None), ``optim`` (an ``OptimConfig`` or None), ``step``,
    ``metadata`` (the caller's), ``kernels``.
    """
    src = Path(src)
    if not (src / ckpt.METADATA_FILE).is_file():
        if (src / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{src} is a LoRA adapter folder, not a model; merge it onto its base model: "
                             f"diptych convert {src} OUT --base BASE_HF_FOLDER --to hf")
        spec, weights = load_hf_folder(src)
        return {"spec": spec, "weights": weights, "value_head": None, "optimizer": None, "optim": None,
                "step": 0, "metadata": {}, "kernels": "auto", "lora": None}
    meta = ckpt.read_metadata(src)
    backend = meta["backend"]
    if backend not in backend_names():
        raise ckpt.CheckpointError(f"{src} was written by unknown backend {backend!r}; "
                                   f"known: {', '.join(backend_names())}.")
    checkpoint, train = _modules(backend, "checkpoint", "train")
    state, user = checkpoint.restore(src)
    out = {"spec": ckpt.spec_from_metadata(meta), "weights": train.export_weights(state),
           "value_head": train.export_value_head(state), "optimizer": train.export_optimizer(state),
           "optim": state.optim, "step": state.step, "metadata": user, "kernels": meta.get("kernels", "auto"),
           "lora": None}
    backend_obj = get_backend(backend)
    lora = backend_obj.lora_config(state.model)
    if lora is not None:  # ``weights`` is the merged model; a LoRA state is rebuilt from its base and adapters
        out.update(lora=lora, base=backend_obj.export(state.model), adapters=train.export_adapters(state))
    return out


def convert(src: str | Path, dst: str | Path, to: str, base: str | Path | None = None) -> Path:
    """Convert ``src`` into ``dst`` in format ``to`` (``"jax"``, ``"torch"`` or ``"hf"``); return ``dst``.

    ``base``: ``src`` is a PEFT adapter folder and ``base`` the Hugging Face folder it is merged onto (``--to hf``).
    """
    if base is not None:
        if to != "hf":
            raise ValueError(f"--base merges an adapter folder into a Hugging Face folder: use --to hf, not --to {to}.")
        return merge_adapter_folder(src, base, dst)
    p = load_portable(src)
    if to == "hf":
        out = save_hf_folder(dst, p["spec"], p["weights"])
        if p["lora"] is not None:
            save_adapter(Path(dst) / ADAPTER_DIR, p["adapters"], p["lora"])
        return out
    if to not in backend_names():
        raise ValueError(f"--to must be one of {', '.join([*backend_names(), 'hf'])}, got {to!r}.")
    checkpoint, train, model_lib = _modules(to, "checkpoint", "train", "model")
    if p["lora"] is not None:
        model = get_backend(to).apply_lora(
            _build(to, p["spec"], p["base"], p["kernels"]), p["lora"], adapters=p["adapters"])
    else:
        model = model_lib.build(p["spec"], p["weights"], kernels=p["kernels"])
    state = train.init_train_state(model, p["optim"] or OptimConfig(), value_head=p["value_head"] is not None)
    if p["value_head"] is not None:
        state = train.load_weights(state, p["value_head"])
    if p["optimizer"] is not None:
        state = train.load_optimizer(state, p["optimizer"])
    state.step = int(p["step"])
    return checkpoint.save(state, dst, metadata=p["metadata"])


def _build(backend: str, spec: Any, weights: dict[str, Any], kernels: str | None) -> Any:
    """A decoder (with its kernels mode) or a recurrent-depth model on ``backend``."""
    options = {"kernels": kernels} if kernels and not is_recurrent(spec) else {}
    return get_backend(backend).build(spec, weights, **options)


def merge_adapter_folder(adapter: str | Path, base: str | Path, dst: str | Path) -> Path:
    """The Hugging Face folder ``dst``: the model of folder ``base`` with the PEFT adapter folder ``adapter`` merged
    in (``W + scaling * B @ A``, in numpy). An adapter for another model (a module ``base`` lacks, or other
    shapes) is refused, naming the first mismatch."""
    adapter, base = Path(adapter), Path(base)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{adapter} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); give the folder a LoRA run "
                         f"wrote (e.g. out/final/{ADAPTER_DIR}) or a PEFT save_pretrained folder.")
    adapters, cfg = load_adapter(adapter)
    spec, weights = load_hf_folder(base)
    check_adapter_fits(adapters, weights, adapter, base)
    return save_hf_folder(dst, spec, merge_weights(weights, adapters, cfg))


def check_adapter_fits(adapters: dict[str, Any], weights: dict[str, Any], adapter: Path, base: Path) -> None:
    """Every adapter pair must sit on a linear weight of the base with matching ``[out, in]``."""
    for name in sorted(adapters):
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        a, b = adapters[name], adapters.get(f"{module}.lora_B.weight")
        w = weights.get(f"{module}.weight")
        if b is None:
            raise ValueError(f"{adapter}: {module} has lora_A but no lora_B; the adapter folder is incomplete.")
        if w is None:
            some = ", ".join(sorted(k[: -len(".weight")] for k in weights if k.endswith("proj.weight"))[:3])
            raise ValueError(f"{adapter} does not fit the base {base}: it adapts {module}, which the base lacks "
                             f"(its linears are e.g. {some}). Give the base model the adapter was trained on.")
        if w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{adapter} does not fit the base {base}: {module} is {list(w.shape)} in the base but "
                             f"the adapter is for [{b.shape[0]}, {a.shape[1]}]. Give the base model the adapter was "
                             "trained on.")
