"""The issue-21 research recipes (``rltt_vs_grpo``, ``retrofit_curriculum``) end to end at ``--tiny``, plus one
oracle each: RLTT's ``final`` weighting is plain GRPO bit for bit through the recipe's own GRPO run, and the
recipe's retrofitted Llama carries every weight over exactly (transformers-free oracle: the source model's own
logits once Huginn's sandwich norms are bypassed, as in ``test_retrofit.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diptych.recurrent.schedule import DepthSchedule, ScheduleError
from tests.conftest import needs_torch
from tests.recurrent.helpers import bypass_sandwich_norms

pytestmark = needs_torch


@pytest.fixture(scope="module")
def rltt_tiny(tmp_path_factory):
    from diptych.recipes import rltt_vs_grpo as R

    out = tmp_path_factory.mktemp("rltt")
    assert R.main(["--tiny", "--out", str(out), "--json", str(out / "bench.json")]) == 0
    return out


def test_rltt_recipe_tiny_runs_every_arm_and_reports_the_depth_profile(rltt_tiny):
    from diptych.recipes import rltt_vs_grpo as R

    cfg = R.tiny_config(str(rltt_tiny))
    res = json.loads((rltt_tiny / "results.json").read_text())
    assert set(res["runs"]) == {"0"} and set(res["runs"]["0"]) == {"final", "uniform"}
    for arm, r in res["runs"]["0"].items():
        assert set(r["accuracy_train_lengths"]) == {str(d) for d in cfg.eval_depths}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy_longer"].values())
        assert len(r["answer_logprob_by_iteration"]) == max(cfg.eval_depths)
        assert all(lp <= 0.0 for lp in r["answer_logprob_by_iteration"])
        assert len(r["reward"]) == cfg.grpo_steps
        # the trainer logs the per-iteration profile only when it reads every iteration (RLTT)
        want = {f"iter_logprob_{i}" for i in range(1, cfg.backprop_depth + 1)} if arm == "uniform" else set()
        assert set(r["trainer_iter_logprob"]) == want
    assert res["summary"]["uniform_minus_final"]["train_lengths_r3"]["per_seed"] == [
        res["runs"]["0"]["uniform"]["accuracy_train_lengths"]["3"]
        - res["runs"]["0"]["final"]["accuracy_train_lengths"]["3"]]
    bench = json.loads((rltt_tiny / "bench.json").read_text())
    assert bench["command"].startswith("python -m diptych.recipes.rltt_vs_grpo --tiny")
    assert bench["seeds"] == [0] and len(bench["load_average_start"]) == 3 and bench["wall_seconds"] > 0
    # a second run reuses the cached pretrained start instead of training it again
    assert not res["pretrained"]["cached"]
    spec, _, meta = R.pretrained(cfg, log=lambda *a: None)
    assert meta["cached"] and spec.num_params() == res["params"]


def test_rltt_final_weighting_is_the_plain_grpo_arm_exactly(rltt_tiny):
    """Oracle: plain GRPO (``trajectory=None``). The ``final`` weighting gives bit-identical weights after the
    first step (and the step moved them); ``uniform`` sees the same first rollout (same reward) but updates
    differently, so the comparison can fail."""
    from diptych.core.backend import get_backend
    from diptych.core.losses.trajectory import TrajectoryCredit
    from diptych.recipes import rltt_vs_grpo as R

    cfg = R.tiny_config(str(rltt_tiny))
    spec, w0, _ = R.pretrained(cfg, log=lambda *a: None)
    b = get_backend("torch")
    out = {}
    for name, traj in (("plain", None), ("final", TrajectoryCredit("final")), ("uniform", TrajectoryCredit("uniform"))):
        state, hist = R.train_arm(cfg, spec, w0, seed=0, trajectory=traj, steps=1)
        out[name] = (b.export_weights(state), hist[0])
    (wp, hp), (wf, hf), (wu, hu) = out["plain"], out["final"], out["uniform"]
    assert hp["reward_std"] > 0  # some group has a non-zero advantage: the step has a gradient
    assert hp["reward"] == hf["reward"] == hu["reward"] and hp["loss"] == hf["loss"]
    assert all(np.array_equal(wp[n], wf[n]) for n in wp)
    assert max(np.abs(wp[n] - w0[n]).max() for n in wp) > 0
    assert max(np.abs(wu[n] - wp[n]).max() for n in wp) > 0


def test_rltt_config_refuses_an_unknown_arm():
    from diptych.recipes import rltt_vs_grpo as R

    with pytest.raises(ValueError, match="arms must be weightings"):
        R.RLTTRecipeConfig(arms=("final", "progressive"))
    with pytest.raises(SystemExit):
        R.main(["--tiny", "--arms", "nope", "--out", "/nonexistent"])


# -- retrofit + recurrence curriculum ---------------------------------------------------------------------------
def test_recurrence_curriculum_ramps_the_mean_then_is_huginns_schedule():
    from diptych.recipes.retrofit_curriculum import RecurrenceCurriculum

    c = RecurrenceCurriculum(mean_recurrence=8, backprop_depth=4, ramp_steps=100, seed=3)
    assert c.mean_at(0) == 1.0 and c.mean_at(50) == 4.5 and c.mean_at(100) == c.mean_at(500) == 8.0
    plain = DepthSchedule(8, 4, sigma=0.5, seed=3)
    assert all(c.sample(s) == plain.sample(s) for s in range(100, 140))
    assert all(RecurrenceCurriculum(8, 4, ramp_steps=0, seed=3).sample(s) == plain.sample(s) for s in range(40))
    early = np.mean([c.sample(s).num_steps for s in range(20)])
    assert early < np.mean([plain.sample(s).num_steps for s in range(20)])  # the ramp starts shallow
    with pytest.raises(ScheduleError, match="start"):
        RecurrenceCurriculum(mean_recurrence=4, start=5.0)


def test_retrofit_recipe_tiny_end_to_end(tmp_path):
    from diptych.recipes import retrofit_curriculum as C

    cfg = C.tiny_config(str(tmp_path))
    assert C.main(["--tiny", "--out", str(tmp_path), "--json", str(tmp_path / "bench.json")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("retrofit_before", "retrofit_after"):
        assert set(res[key]) == {"train_lengths", "longer"}
        assert set(res[key]["train_lengths"]) == {str(r) for r in cfg.eval_depths}
    assert set(res["source"]) == set(res["control"]) - {"final_loss"} == {"train_lengths", "longer"}
    assert res["source_params"] == res["retrofit_params"] - cfg.width * 2 * cfg.width - 2 * cfg.layers * cfg.width
    assert res["r1_gap_before_training"]["mean_kl_nats"] >= 0
    assert (tmp_path / "retrofitted_trained" / "config.json").is_file()
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["command"].startswith("python -m diptych.recipes.retrofit_curriculum --tiny") and bench["seeds"] == [0]


def test_retrofit_recipe_carries_the_trained_llama_over_exactly(tmp_path, monkeypatch):
    """Oracle: the trained source Llama's own logits on the recipe's left-padded held-out batch. With Huginn's
    sandwich norms bypassed (Llama's plain residual, ``ln_f`` only after the coda) the retrofitted model at r = 1
    gives them to float32 rounding; with the real norms the gap is what the recipe reports (``logit_gap``)."""
    import torch

    from diptych.backends.torch import model as tm
    from diptych.backends.torch import recurrent as rb
    from diptych.commands.retrofit import retrofit_folder
    from diptych.core.hf import load_hf_folder, save_hf_folder
    from diptych.recipes import retrofit_curriculum as C

    cfg = C.tiny_config(str(tmp_path))
    spec = C.source_spec(cfg)
    source = tm.build(spec, spec.init_weights(0))
    C.train_source(cfg, source, 20, cfg.source_lr, 0, log=lambda *a: None)
    save_hf_folder(tmp_path / "src", spec, tm.export(source))
    rspec, rw = load_hf_folder(retrofit_folder(tmp_path / "src", tmp_path / "out", 1, 2, 1))
    retro = rb.build(rspec, rw)
    tokens, mask, _ = C.held_out(cfg)["train_lengths"]
    assert (mask == 0).any()  # left padding is exercised
    gap = C.logit_gap(source, retro, tokens, mask)
    assert gap["mean_kl_nats"] > 1e-4  # the sandwich norms change the function (so the bypass below matters)

    bypass_sandwich_norms(monkeypatch)
    with torch.no_grad():
        want = tm.forward(source, tokens, mask).numpy()
        got = rb.forward(retro, tokens, mask, num_steps=1).numpy()
    keep = mask.astype(bool)
    assert np.abs(want[keep]).max() > 0.5  # a trained, non-trivial source
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=0)
    exact = C.logit_gap(source, retro, tokens, mask)
    assert exact["mean_kl_nats"] < 1e-8
