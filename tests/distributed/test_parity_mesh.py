"""``diptych parity --mesh``: the sharded train-step cases against the one-device run and across backends, and
the torch cases that used to be refused (PPO's value head, bf16, greedy generation under tensor parallelism).

Oracles: the one-device run of the same numpy batches (loss of every step, final weights incl. the value head,
greedy tokens exactly) and the other backend's sharded run, under the parity tolerances. The first test is the
fast one (torch, two gloo processes, one case); the rest start several processes each and are slow.
"""

from __future__ import annotations

import json

import pytest

from diptych.cli import main
from diptych.core.mesh import MeshError
from diptych.parity import mesh_suite
from tests.train.helpers import needs_jax, needs_torch


def _rows(report) -> dict[tuple[str, str, str], object]:
    return {(c.quantity, c.a, c.b): c for c in report.cases}


@needs_torch
def test_parity_mesh_cli_torch_sft_on_two_processes(tmp_path, capsys):
    out = tmp_path / "mesh.json"
    code = main(["parity", "--mesh", "fsdp=2", "--backend", "torch", "--mesh-case", "sft", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    got = {(c["quantity"], c["a"], c["b"]): c for c in report["cases"]}
    assert set(got) == {(q, "torch@fsdp=2", "torch@one")
                        for q in ("loss:sft steps 1-5", "weights:sft after 5", "tokens:sft greedy")}
    assert all(c["pass"] for c in got.values())
    assert got[("tokens:sft greedy", "torch@fsdp=2", "torch@one")]["max_abs"] == 0.0
    assert "torch@fsdp=2" in printed and "3 passed, 0 failed" in printed


def test_parity_mesh_refuses_bad_requests_before_starting_a_process(capsys):
    assert main(["parity", "--mesh", "fsdp=1"]) == 2
    assert "needs more than one device" in capsys.readouterr().err
    assert main(["parity", "--mesh", "fsdp=2", "--mesh-case", "rlhf"]) == 2
    assert "Unknown mesh parity case(s) rlhf" in capsys.readouterr().err
    assert main(["parity", "--mesh", "pipeline=2"]) == 2
    assert "axis one of data, fsdp, tensor" in capsys.readouterr().err
    with pytest.raises(MeshError):
        mesh_suite.run_mesh("fsdp=1", ["torch"])


def test_torch_recurrent_tensor_parallel_is_skipped_with_its_reason():
    report = mesh_suite.run_mesh("tensor=2", ["torch"], ["recurrent"])
    assert report.cases == []
    assert report.skipped and "no tensor-parallel plan for recurrent" in report.skipped[0]


def test_the_cases_are_the_same_arrays_every_time():
    a, b = mesh_suite.steps_for("ppo", 2), mesh_suite.steps_for("ppo", 2)
    assert [sorted(mb) for mb in a[0]] == [sorted(mb) for mb in b[0]]
    assert all((a[s][j][k] == b[s][j][k]).all() for s in range(2) for j in range(2) for k in a[s][j])
    assert {"old_values", "returns", "advantages"} <= set(a[0][0])
    assert a[0][0]["tokens"].shape == (mesh_suite.ROWS, mesh_suite.SEQ)


def _assert_all_pass(report, expected: int) -> None:
    failed = [f"{c.quantity} {c.a} vs {c.b}: {c.max_rel:.2e} > {c.tol:.0e} {c.note}" for c in report.cases
              if not c.passed]
    assert not failed, failed
    assert len(report.cases) == expected


@needs_torch
@pytest.mark.slow
def test_torch_ppo_value_head_sharded_equals_one_process():
    for mesh in ("fsdp=2", "tensor=2"):  # value head replicated; trunk under FSDP2, then under DTensor TP
        report = mesh_suite.run_mesh(mesh, ["torch"], ["ppo"], steps=3)
        _assert_all_pass(report, 2)
        assert {c.quantity for c in report.cases} == {"loss:ppo steps 1-3", "weights:ppo after 3"}


@needs_torch
@pytest.mark.slow
def test_torch_greedy_generation_under_tensor_parallelism_equals_one_process():
    report = mesh_suite.run_mesh("tensor=2", ["torch"], ["sft"], steps=2)
    _assert_all_pass(report, 3)
    tokens = _rows(report)[("tokens:sft greedy", "torch@tensor=2", "torch@one")]
    assert tokens.max_abs == 0.0


@needs_torch
@needs_jax
@pytest.mark.slow
def test_bf16_sharded_equals_one_device_within_the_bf16_tolerance():
    report = mesh_suite.run_mesh("fsdp=2", ["torch", "jax"], ["sft"], steps=3, dtype="bfloat16")
    _assert_all_pass(report, 6)  # loss + weights: torch vs one, jax vs one, torch vs jax (tokens: ties allowed)
    assert all(c.dtype == "bfloat16" and c.tol == 2e-2 for c in report.cases)


@needs_torch
@needs_jax
@pytest.mark.slow
def test_parity_mesh_every_case_on_fsdp2_tensor2_both_backends():
    report = mesh_suite.run_mesh("fsdp=2,tensor=2", ["jax", "torch"])
    # 5 cases x (loss, weights) + sft tokens for jax vs one; torch vs one and jax vs torch without recurrent
    _assert_all_pass(report, 11 + 9 + 9)
    assert any("torch recurrent" in s for s in report.skipped)
