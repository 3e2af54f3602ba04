"""The shared benchmark discipline: load refusal, alternation, median round, FLOP formulas (no real benchmarks)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline as D
from diptych.core.spec import DecoderSpec


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    D.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.fixture
def load(monkeypatch):
    """A settable fake 1-minute load average."""
    box = {"value": 0.5}
    monkeypatch.setattr(D, "load_average", lambda: (box["value"], 0.0, 0.0))
    monkeypatch.setattr(D, "core_count", lambda: 4)
    monkeypatch.setattr(D, "cpu_times", lambda: None)  # no /proc: every reading is judged by the load average
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PJRT_NPROC"):
        monkeypatch.delenv(var, raising=False)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield box
    if torch is not None:  # the pin is process-wide: give other tests their threads back
        torch.set_num_threads(threads)


def test_refused_above_core_count(load):
    load["value"] = 4.5
    with pytest.raises(D.Refused) as e:
        D.Bench("b", _args())
    assert e.value.code == D.NOISY_EXIT
    assert "4.50" in e.value.message and "4 cores" in e.value.message and "--allow-noisy" in e.value.message


def test_refused_when_load_rises_during_a_round(load, tmp_path):
    bench = D.Bench("b", _args(rounds=2))

    def contender():
        load["value"] = 9.0
        return {"x": 1.0}

    with pytest.raises(D.Refused):
        bench.run({"a": contender}, "x")
    with pytest.raises(D.Refused):  # finish re-reads the load: nothing is written
        bench.finish({}, json_path=tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_noisy_override_marks_json_and_table(load, tmp_path, capsys):
    load["value"] = 6.0
    bench = D.Bench("b", _args(allow_noisy=True, rounds=1))
    res = bench.run({"a": lambda: {"x": 2.0}}, "x")
    assert bench.finish(res, ["row a"], tmp_path / "out.json") == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["noisy"] is True
    assert report["load_average"][0]["load"][0] == 6.0
    assert "NOISY" in capsys.readouterr().out


def test_accepted_below_core_count(load, tmp_path, capsys):
    load["value"] = 3.9
    bench = D.Bench("b", _args(rounds=1, threads=2))
    res = bench.run({"a": lambda: {"x": 2.0}}, "x")
    assert bench.finish(res, ["row a"], tmp_path / "out.json") == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["noisy"] is False and report["threads"] == 2
    assert os.environ["PJRT_NPROC"] == "2" and os.environ["OMP_NUM_THREADS"] == "2"
    assert report["contender_threads"]["a"]["OMP_NUM_THREADS"] == "2"
    assert "numpy" in report["versions"] and report["versions"]["numpy"] == np.__version__
    # before/after every round, plus start and end
    assert [r["when"] for r in report["load_average"]] == ["start", "before", "after", "end"]
    out = capsys.readouterr().out
    assert "NOISY" not in out and "threads 2" in out


@pytest.fixture
def cpu(monkeypatch, load):
    """Settable fake CPU counters (all processes, this tree) and clock, on top of the fake load."""
    box = {"all": 0.0, "own": 0.0, "now": 0.0}
    monkeypatch.setattr(D, "cpu_times", lambda: (box["all"], box["own"]))
    monkeypatch.setattr(D.time, "monotonic", lambda: box["now"])
    return box


def _spend(cpu, seconds, own_cores, other_cores):
    cpu["now"] += seconds
    cpu["own"] += seconds * own_cores
    cpu["all"] += seconds * (own_cores + other_cores)


def test_own_work_above_the_core_count_is_not_noise(load, cpu, tmp_path):
    # a two-role contender keeps both cores busy: the load average passes the core count by itself
    bench = D.Bench("b", _args(rounds=2))

    def contender():
        _spend(cpu, 20.0, own_cores=4.0, other_cores=0.05)
        load["value"] = 4.6
        return {"x": 1.0}

    res = bench.run({"a": contender}, "x")
    assert bench.finish(res, [], tmp_path / "out.json") == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["noisy"] is False
    others = [r["others_cores"] for r in report["load_average"] if "others_cores" in r]
    assert len(others) == 2 and max(others) == pytest.approx(0.05, abs=0.01)  # one per round


def test_other_processes_cpu_is_refused_though_the_load_is_low(load, cpu, tmp_path):
    bench = D.Bench("b", _args(rounds=1))

    def contender():
        _spend(cpu, 10.0, own_cores=1.0, other_cores=0.5)
        return {"x": 1.0}

    with pytest.raises(D.Refused) as e:
        bench.run({"a": contender}, "x")
    assert "0.50 cores" in e.value.message


def test_a_loaded_start_is_refused_with_the_cpu_meter_too(load, cpu):
    load["value"] = 4.5
    with pytest.raises(D.Refused) as e:
        D.Bench("b", _args())
    assert "load average 4.50" in e.value.message


def test_the_cpu_meter_reads_this_process_tree():
    times = D.cpu_times()
    if times is None:
        pytest.skip("no /proc")
    busy, own = times
    assert 0 < own <= busy
    t0 = D.cpu_times()[1]
    x = 0
    for i in range(3_000_000):
        x += i * i
    assert D.cpu_times()[1] > t0  # this process's own work shows up


def test_rounds_rotate_the_order(load):
    assert D.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert D.round_order(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert D.round_order(["a", "b", "c"], 2) == ["c", "a", "b"]
    assert D.round_order(["a", "b"], 3) == ["b", "a"]
    calls: list[str] = []
    bench = D.Bench("b", _args(rounds=4))
    bench.run({n: (lambda n=n: calls.append(n) or {"x": 1.0}) for n in ("a", "b")}, "x")
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [r.get("order") for r in bench.loads if r["when"] == "after"] == [["a", "b"], ["b", "a"]] * 2


def test_median_round_not_best(load):
    assert D.median_round([{"x": 3.0, "r": 0}, {"x": 1.0, "r": 1}, {"x": 2.0, "r": 2}], "x")["r"] == 2
    # even count: the lower middle round, a real round rather than an average
    assert D.median_round([{"x": 4.0}, {"x": 1.0}, {"x": 3.0}, {"x": 2.0}], "x")["x"] == 2.0
    values = iter([5.0, 1.0, 3.0])
    bench = D.Bench("b", _args(rounds=3))
    res = bench.run({"a": lambda: {"x": next(values)}}, "x")
    assert res["a"]["x"] == 3.0 and [r["x"] for r in res["a"]["rounds"]] == [5.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="no round reported"):
        D.median_round([{"error": "boom"}], "x")


SPEC = DecoderSpec(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=16)


def test_flop_formula_hand_count():
    # q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x16, LM head 10x8
    assert D.matmul_params(SPEC) == 64 + 32 + 32 + 64 + 384 + 80 == 656
    # the spec's own 2-D weights, less the embedding lookup, are the same matmuls
    shapes = SPEC.param_shapes()
    two_d = sum(int(np.prod(s)) for k, s in shapes.items() if len(s) == 2 and "embed_tokens" not in k)
    assert two_d == 656
    # 3 tokens: matmuls 2 x 656 x 3; attention: positions attend 1 + 2 + 3 = 6 keys, 4 x q_dim (8) each
    assert D.causal_forward_flops(SPEC, 3) == 2 * 656 * 3 + 6 * 4 * 8 == 4128
    # prompt 2 + 2 new tokens = prefill of 2, then one cached step at position 2: a causal forward of 3
    assert D.decode_flops(SPEC, [2], 2) == 4128
    assert D.train_flops(SPEC, [3]) == 3 * 4128
    assert D.grpo_step_flops(SPEC, [2], [2]) == 4128 + 3 * D.causal_forward_flops(SPEC, 4)


def test_bad_threads_is_a_clear_error(load):
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        D.pin_threads_early(["--threads", "0"])
    assert D.threads_from_argv(["--x", "1", "--threads", "3"]) == 3


def test_threads_re_pinned_before_each_contender(load):
    torch = pytest.importorskip("torch")
    seen: list[int] = []

    def greedy():  # a library that raises the thread count behind the benchmark's back
        seen.append(torch.get_num_threads())
        torch.set_num_threads(2)
        return {"x": 1.0}

    def polite():
        seen.append(torch.get_num_threads())
        return {"x": 1.0}

    bench = D.Bench("b", _args(rounds=2))
    bench.run({"greedy": greedy, "polite": polite}, "x")
    assert seen == [1, 1, 1, 1]
    assert bench.contender_threads["greedy"]["changed_by_contender"] is True
    assert bench.contender_threads["polite"]["changed_by_contender"] is False


def test_every_script_uses_the_discipline():
    root = Path(D.__file__).parent
    scripts = sorted(p for p in root.glob("*.py") if p.name not in ("discipline.py", "__init__.py"))
    assert len(scripts) >= 7
    for path in scripts:
        text = path.read_text()
        assert "discipline.Bench(" in text and ".finish(" in text, f"{path.name} does not run under the discipline"
        pin = text.index("discipline.pin_threads_early()")
        for lib in ("\nimport numpy", "\nimport torch", "\nimport jax"):  # module-level imports only
            assert text.find(lib) == -1 or text.find(lib) > pin, f"{path.name} imports {lib.strip()} before the pin"


def test_old_repeats_option_still_sets_rounds():
    p = argparse.ArgumentParser()
    D.add_arguments(p)
    assert p.parse_args(["--repeats", "5"]).rounds == 5
    assert p.parse_args([]).threads == 1 and p.parse_args([]).allow_noisy is False


def test_grpo_matmul_floor_counts_the_steps_linear_products():
    from benchmarks import grpo_throughput as G

    # 3 rows, prompt 2, 2 new tokens: prefill of 6 tokens, 1 decode step of 3, train over 12 tokens (forward,
    # dX, dW: 3x), reference forward over 12; each token's linears are matmul_params multiply-adds
    shapes = G.step_matmuls(SPEC, rows=3, prompt_len=2, new_tokens=2, reference=True)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    assert flops == 2 * D.matmul_params(SPEC) * (6 + 3 + 3 * 12 + 12)
    without = G.step_matmuls(SPEC, rows=3, prompt_len=2, new_tokens=2, reference=False)
    assert len(shapes) - len(without) == 7 * SPEC.num_hidden_layers + 1  # reference: 7 linears a layer + head
