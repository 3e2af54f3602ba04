"""Golden parity records (`diptych parity --record / --replay`): a record replays exactly on the stack that
made it, within the cross-backend tolerances on the other backend, fails when its numbers were perturbed
(naming the case), is refused when its format version is not this one, and the committed CPU records of
both backends replay here.

Recomputing a record is the slow part, so the module computes each backend's cases for real twice (the
record, then a same-machine replay) and later replays of the same inputs reuse the replay's numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from diptych.cli import main
from diptych.parity import golden
from tests.conftest import HAS_JAX, HAS_TORCH, needs_torch

GOLDEN = Path(__file__).parent
both = pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both backends")
BACKENDS = ("jax", "torch")


class Memo:
    """``golden.compute`` that stores its results and, while ``reusing``, returns them for identical inputs."""

    def __init__(self, real):
        self.real, self.store, self.reuse, self.replayed = real, {}, False, set()

    @staticmethod
    def key(backend, weights, inputs, dtype, steps):
        h = hashlib.sha256()
        for k in sorted(k for k in inputs if k != "sample_mask"):  # the one stored input that is an output
            h.update(k.encode() + np.ascontiguousarray(inputs[k]).tobytes())
        return backend, golden.weights_sha256(weights), h.hexdigest(), dtype, steps

    def __call__(self, backend, spec, weights, inputs, dtype, steps):
        k = self.key(backend, weights, inputs, dtype, steps)
        if self.reuse and k in self.store:
            return self.store[k]
        self.store[k] = self.real(backend, spec, weights, inputs, dtype, steps)
        return self.store[k]

    @contextmanager
    def reusing(self):
        self.reuse = True
        try:
            yield
        finally:
            self.reuse = False


@pytest.fixture(scope="module")
def memo():
    m = Memo(golden.compute)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(golden, "compute", m)
        yield m


@pytest.fixture(scope="module")
def records(memo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    paths = golden.record_backends(folder, list(BACKENDS))
    return {p.name: p for p in paths}


@both
def test_a_record_holds_every_case_and_is_small(records):
    meta, arrays = golden.load_record(records["torch"])
    got = {c["quantity"] for c in meta["cases"]}
    want = {"logits:llama model", "logprobs:llama model", "tokens:llama parity sample",
            "logprobs:llama parity sample"}
    for case in ("sft", "grpo", "dpo"):
        want |= {f"grads:llama {case} step 1", f"loss:llama {case} step 1", f"loss:llama {case} step 3",
                 f"weights:llama {case} after 3"}
    want |= {f"logits:huginn_raven r={r}" for r in (1, 2, 4)} | {"grads:huginn_raven truncated (r=4,k=2)"}
    assert want <= got, want - got
    env = meta["environment"]
    assert env["backend"] == "torch" and env["device_kind"] == "cpu" and env["mesh"]["devices"] == 1
    assert {"device_name", "matmul_precision", "tf32", "kernels", "versions"} <= set(env)
    assert meta["models"][0]["weight_seed"] == 0 and "config" in meta["models"][0]
    assert {"m0.in.tokens", "m0.in.sample_noise", "m0.in.grpo.advantages", "m1.in.init_state"} <= set(arrays)
    assert sum(f.stat().st_size for f in records["torch"].iterdir()) < 2_000_000


@both
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_machine_replay_is_exact(records, memo, backend):
    report, lines = golden.replay(records[backend])
    memo.replayed.add(backend)
    assert "tolerances 'same stack'" in lines[0]
    assert report.passed, [(c.quantity, c.max_abs) for c in report.cases if not c.passed]
    assert len(report.cases) == len(golden.load_record(records[backend])[0]["cases"])
    assert all(c.max_abs <= 1e-7 and c.tol == (0.0 if c.quantity.startswith("tokens") else 1e-7)
               for c in report.cases)


@both
def test_recording_twice_gives_identical_files(records, memo, tmp_path):
    """The second record is written from the same-machine replay's recomputation (a second run of every case)."""
    for b in set(BACKENDS) - memo.replayed:  # run alone: recompute here
        golden.replay(records[b])
        memo.replayed.add(b)
    with memo.reusing():
        again = {p.name: p for p in golden.record_backends(tmp_path, list(BACKENDS))}
    for b in BACKENDS:
        assert (again[b] / golden.ARRAYS).read_bytes() == (records[b] / golden.ARRAYS).read_bytes()
        first, second = (json.loads((p / golden.RECORD_JSON).read_text()) for p in (records[b], again[b]))
        first.pop("created"), second.pop("created")
        assert first == second


@both
@pytest.mark.parametrize("made_by,replayed_on", [("jax", "torch"), ("torch", "jax")])
def test_other_backend_replays_within_the_cross_backend_tolerance(records, memo, made_by, replayed_on):
    with memo.reusing():
        report, lines = golden.replay(records[made_by], [replayed_on])
    assert "tolerances 'cpu-cpu fp32'" in lines[0]
    assert report.passed, [(c.quantity, c.max_abs, c.max_rel) for c in report.cases if not c.passed]
    logits = next(c for c in report.cases if c.quantity == "logits:llama model")
    assert logits.tol == 1e-5 and logits.max_abs > 0  # two frameworks never round identically
    assert next(c for c in report.cases if c.quantity == "tokens:llama parity sample").max_abs == 0


def _perturbed(src: Path, dst: Path, quantity: str, rel: float = 0.0, by: float = 0.0) -> Path:
    """A copy of a record with the last entry of one output moved (the last position is never padding)."""
    shutil.copytree(src, dst)
    meta, arrays = golden.load_record(dst)
    case = next(c for c in meta["cases"] if c["quantity"] == quantity)
    a = arrays[case["array"]].copy()
    a.flat[-1] += by + rel * float(np.max(np.abs(a)))
    arrays[case["array"]] = a
    golden.write_npz(dst / golden.ARRAYS, arrays)
    return dst


@both
def test_a_perturbed_record_fails_replay_naming_the_case(records, memo, tmp_path, capsys):
    bad = _perturbed(records["torch"], tmp_path / "bad", "weights:llama dpo after 3", 1e-3)  # 10x the cpu-cpu tol
    with memo.reusing():
        report, _ = golden.replay(bad)
        failed = [c.quantity for c in report.cases if not c.passed]
        assert failed == ["weights:llama dpo after 3"]
        assert main(["parity", "--replay", str(bad), "--backend", "jax"]) == 1  # and on the other backend
    out = capsys.readouterr().out
    assert "weights:llama dpo after 3" in out and "FAIL" in out


@both
def test_a_perturbation_below_the_cross_backend_tolerance_fails_only_the_same_stack(records, memo, tmp_path):
    # 10x the same-stack tolerance, 0.1x the cpu-cpu one
    small = _perturbed(records["jax"], tmp_path / "small", "logits:llama model", by=1e-6)
    with memo.reusing():
        same, _ = golden.replay(small)
        other, _ = golden.replay(small, ["torch"])
    assert [c.quantity for c in same.cases if not c.passed] == ["logits:llama model"]
    assert other.passed


def test_an_incompatible_format_version_is_refused(tmp_path, capsys):
    rec = tmp_path / "old"
    rec.mkdir()
    (rec / golden.RECORD_JSON).write_text(json.dumps({"format": golden.FORMAT, "format_version": 999}))
    with pytest.raises(golden.RecordError, match="version 999"):
        golden.load_record(rec)
    assert main(["parity", "--replay", str(rec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "version 999" in err and f"version {golden.FORMAT_VERSION}" in err and "\n" not in err


def test_a_folder_without_a_record_is_refused(tmp_path, capsys):
    assert main(["parity", "--replay", str(tmp_path)]) == 2
    assert "holds no parity record" in capsys.readouterr().err


def _env(kind="cpu", **kw):
    env = {"backend": "jax", "device_kind": kind, "device_name": "X", "threads": 2, "matmul_precision": "highest",
           "tf32": False, "versions": {"jax": "1"}, "kernels": None}
    env.update(kw)
    return env


def test_tolerances_follow_the_pair_of_environments():
    cpu = _env()
    assert golden.pair_tolerances(cpu, _env(), "float32") is golden.SAME_STACK
    assert golden.pair_tolerances(cpu, _env(backend="torch"), "float32").name == "cpu-cpu fp32"
    assert golden.pair_tolerances(cpu, _env(device_name="Y"), "float32").tol["logits"] == 1e-5
    assert golden.pair_tolerances(cpu, _env(backend="torch"), "bfloat16").name == "cpu-cpu bf16"
    gpu = _env("gpu", device_name="H100")
    pair = golden.pair_tolerances(cpu, gpu, "float32")
    assert pair.name == "cpu-gpu fp32 (TF32 off)" and not pair.measured
    assert golden.pair_tolerances(cpu, _env("gpu", tf32=True), "float32").name == "tf32"
    assert golden.pair_tolerances(gpu, cpu, "bfloat16").name == "cpu-gpu bf16"
    tpu = golden.pair_tolerances(_env("tpu", matmul_precision="default"), cpu, "float32")
    assert tpu.name == "tpu default precision" and tpu.tol["tokens"] > 0
    assert golden.pair_tolerances(_env("tpu", matmul_precision="highest"), cpu, "float32").name.startswith("cpu-gpu")


@both
@pytest.mark.parametrize("made_by", BACKENDS)
def test_the_committed_cpu_records_replay_here(records, memo, made_by):
    """tests/golden/<backend>: made on the project's CPU machine; on another stack the cpu-cpu tolerances apply."""
    meta, _ = golden.load_record(GOLDEN / made_by)
    assert meta["format_version"] == golden.FORMAT_VERSION and meta["environment"]["device_kind"] == "cpu"
    with memo.reusing():
        for replayed_on in BACKENDS:
            report, lines = golden.replay(GOLDEN / made_by, [replayed_on])
            assert report.passed, (lines, [(c.quantity, c.max_abs, c.max_rel) for c in report.cases if not c.passed])
            if "'same stack'" in lines[0]:
                assert all(c.max_abs <= 1e-7 for c in report.cases)


def test_a_big_output_is_stored_as_a_sample_and_judged_on_it():
    w = np.random.default_rng(0).standard_normal(golden.FULL_LIMIT + 10).astype(np.float32)
    stored, storage = golden._stored(w)
    assert storage == "sampled" and stored.shape == (golden.SAMPLE_SIZE,)
    case = {"quantity": "weights:big after 3", "shape": list(w.shape), "storage": storage, "sha256": ""}
    assert golden._judge(case, stored, w, None, golden.SAME_STACK, "float32", "record", "here").passed
    moved = w.copy()
    moved[golden._sample_index(w.size)[7]] += 1.0
    assert not golden._judge(case, stored, moved, None, golden.SAME_STACK, "float32", "record", "here").passed
    assert golden._stored(w[:100])[1] == "full"


@needs_torch
def test_a_checkpoint_record_needs_its_folder(tmp_path, capsys):
    rec = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "torch", rec)
    meta = json.loads((rec / golden.RECORD_JSON).read_text())
    meta["models"][0]["checkpoint"] = {"path": "/somewhere/model", "sha256": "ab" * 32}
    (rec / golden.RECORD_JSON).write_text(json.dumps(meta))
    assert main(["parity", "--replay", str(rec)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["parity", "--replay", str(rec), "--checkpoint", str(tmp_path)]) == 2
    assert "content hash differs" in capsys.readouterr().err


@needs_torch
@pytest.mark.slow
def test_record_and_replay_an_hf_folder(tmp_path):
    from diptych.core.hf import save_hf_folder
    from diptych.core.spec import tiny_spec

    spec = tiny_spec("qwen2", **golden.SMALL_DECODER)
    folder = save_hf_folder(tmp_path / "m", spec, spec.init_weights(3))
    assert main(["parity", "--record", str(tmp_path / "rec"), "--checkpoint", str(folder), "--backend", "torch"]) == 0
    meta, _ = golden.load_record(tmp_path / "rec" / "torch")
    assert meta["models"][0]["checkpoint"]["sha256"] == golden.folder_sha256(folder) and len(meta["models"]) == 1
    assert main(["parity", "--replay", str(tmp_path / "rec"), "--checkpoint", str(folder)]) == 0
