"""`diptych env`: a pasteable report that survives a missing or broken backend and says how to fix it."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import platform

import pytest

from diptych.cli import main
from diptych.commands import env


def test_report_is_one_fenced_block_with_versions_and_threads(capsys, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "```text" and out[-1] == "```" and out.count("```") == 1
    text = "\n".join(out)
    assert f"python: {platform.python_version()}" in text
    assert f"safetensors: {md.version('safetensors')}" in text
    assert "vllm: " in text and "OMP_NUM_THREADS: 3" in text and "XLA_FLAGS: unset" in text
    for name in ("jax", "torch"):
        if importlib.util.find_spec(name) is not None:
            assert f"  {name}: 1 x CPU" in text


def test_json_report_parses_and_lists_every_package(capsys) -> None:
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["packages"]) == set(env.PACKAGES)
    assert report["threads"]["os.cpu_count"] is not None
    assert set(report["backends"]) >= {"jax", "torch"}


def test_a_package_that_is_absent_reads_not_installed(monkeypatch) -> None:
    real = md.version
    monkeypatch.setattr(md, "version", lambda n: (_ for _ in ()).throw(md.PackageNotFoundError(n))
                        if n == "vllm" else real(n))
    assert env.package_versions()["vllm"] == env.NOT_INSTALLED


@pytest.mark.parametrize("missing, hint", [("jax", "pip install 'diptych[jax]'"),
                                           ("torch", "pip install torch==2.13.0 (on a CPU machine, first)")])
def test_missing_backend_is_named_with_its_install_command(missing, hint, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(["env"]) == 0
    cap = capsys.readouterr()
    line = next(x for x in cap.out.splitlines() if x.startswith(f"  {missing}:"))
    assert "not installed" in line and hint in line
    assert f"missing backend(s): {missing}" in cap.err
    other = "torch" if missing == "jax" else "jax"
    if real(other) is not None:
        assert "not installed" not in next(x for x in cap.out.splitlines() if x.startswith(f"  {other}:"))


def test_a_backend_that_fails_to_start_is_reported_not_raised(monkeypatch) -> None:
    from diptych.core import backend

    monkeypatch.setattr(backend, "is_installed", lambda name: True)

    def broken() -> list:
        raise RuntimeError("libcuda.so not found")

    monkeypatch.setitem(env.DEVICE_PROBES, "jax", broken)
    text = env.render(env.collect())
    assert "jax: installed but failed to start: RuntimeError: libcuda.so not found" in text


def test_gpus_are_counted_with_their_memory(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H200", total_memory=140 * 2**30))
    report = env.collect()
    gpus = [d for d in report["backends"]["torch"]["devices"] if d["kind"] == "GPU"]
    assert gpus == [{"kind": "GPU", "name": "NVIDIA H200", "memory_gib": 140.0}] * 2
    assert "2 x GPU NVIDIA H200 (140.0 GiB)" in env.render(report)
