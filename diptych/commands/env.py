"""`diptych env`: everything a bug report needs about this machine, as one block to paste.

Versions come from package metadata (``importlib.metadata``), so listing them imports nothing
heavy; only the device section imports jax / torch, each guarded, so a missing or broken
framework is reported instead of crashing the report. Thread settings are included because
most "diptych is slow on CPU" reports come down to them.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys
from typing import Any

HELP = "versions, backends, devices and thread settings, to paste into a bug report"

PACKAGES = ("diptych", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "triton", "transformers",
            "tokenizers", "safetensors", "numpy", "vllm")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS", "DIPTYCH_BACKEND")
NOT_INSTALLED = "not installed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a markdown block")


def install_hint(backend: str) -> str:
    """How to get ``backend``'s framework: the extra, and for torch the CPU build first (no multi-GB CUDA wheel)."""
    from diptych.core.backend import _REGISTRY

    extra = _REGISTRY[backend].extra if backend in _REGISTRY else backend
    if backend == "torch":
        return "pip install torch==2.13.0 (on a CPU machine, first), then pip install 'diptych[torch]'"
    return f"pip install 'diptych[{extra}]'"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = NOT_INSTALLED
    return out


def _jax_devices() -> list[dict[str, Any]]:
    import jax

    devices = []
    for d in jax.devices():
        row: dict[str, Any] = {"kind": d.platform.upper(), "name": getattr(d, "device_kind", str(d))}
        try:
            stats = d.memory_stats() or {}
            if "bytes_limit" in stats:
                row["memory_gib"] = round(stats["bytes_limit"] / 2**30, 1)
        except Exception:
            pass
        devices.append(row)
    return devices


def _torch_devices() -> list[dict[str, Any]]:
    import torch

    devices: list[dict[str, Any]] = [{"kind": "CPU", "name": platform.processor() or platform.machine(),
                                      "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"kind": "GPU", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"kind": "MPS", "name": "Apple GPU"})
    return devices


DEVICE_PROBES = {"jax": _jax_devices, "torch": _torch_devices}


def backend_report() -> dict[str, dict[str, Any]]:
    """Each registered backend: installed or not (and how to install it), and its devices when installed."""
    from diptych.core.backend import backend_names, is_installed

    out: dict[str, dict[str, Any]] = {}
    for name in backend_names():
        if not is_installed(name):
            out[name] = {"installed": False, "install": install_hint(name)}
            continue
        row: dict[str, Any] = {"installed": True}
        probe = DEVICE_PROBES.get(name)
        if probe is not None:
            try:
                row["devices"] = probe()
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
        out[name] = row
    return out


def thread_settings() -> dict[str, Any]:
    out: dict[str, Any] = {k: os.environ.get(k) for k in THREAD_VARS}
    out["os.cpu_count"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        out["cpus_usable"] = len(os.sched_getaffinity(0))
    if "torch" in sys.modules or _installed("torch"):
        try:
            import torch

            out["torch.get_num_threads"] = torch.get_num_threads()
        except Exception:
            out["torch.get_num_threads"] = None
    return out


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def collect() -> dict[str, Any]:
    """The whole report as a JSON-able dict."""
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": package_versions(),
            "backends": backend_report(), "threads": thread_settings()}


def _device_text(d: dict[str, Any]) -> str:
    extras = [f"{d['memory_gib']} GiB" for _ in [0] if "memory_gib" in d]
    extras += [f"{d['threads']} threads" for _ in [0] if "threads" in d]
    name = "" if str(d.get("name", "")).upper() == d["kind"] else d.get("name", "")
    return f"{d['kind']} {name}".strip() + (f" ({', '.join(extras)})" if extras else "")


def render(report: dict[str, Any]) -> str:
    """A fenced markdown block: paste it into an issue as is."""
    lines = ["```text", f"python: {report['python']}", f"platform: {report['platform']}"]
    lines += [f"{k}: {v}" for k, v in report["packages"].items()]
    lines.append("backends:")
    for name, b in report["backends"].items():
        if not b["installed"]:
            lines.append(f"  {name}: not installed; install with: {b['install']}")
        elif "error" in b:
            lines.append(f"  {name}: installed but failed to start: {b['error']}")
        else:
            devs = b.get("devices", [])
            kinds: dict[str, list[str]] = {}
            for d in devs:
                kinds.setdefault(d["kind"], []).append(_device_text(d))
            summary = "; ".join(f"{len(v)} x {v[0]}" if len(set(v)) == 1 else ", ".join(v) for v in kinds.values())
            lines.append(f"  {name}: {summary or 'no devices'}")
    lines.append("threads:")
    lines += [f"  {k}: {'unset' if v is None else v}" for k, v in report["threads"].items()]
    lines.append("```")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    missing = [n for n, b in report["backends"].items() if not b["installed"]]
    if missing and not args.json:
        print(f"missing backend(s): {', '.join(missing)} (install commands above)", file=sys.stderr)
    return 0
