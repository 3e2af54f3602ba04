"""DPO trainer: preference accuracy rises on a tiny synthetic preference set; the reference is
computed once and cached (no reference forward during training); bad rows are refused."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core.optim import OptimConfig
from diptych.core.spec import tiny_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.base import TrainerError
from diptych.core.trainers.dpo import DPOConfig, ReferenceCache, evaluate_preferences, train_dpo

LETTERS = "abcdefghij"


def pairs(seed: int, n: int) -> list[dict[str, str]]:
    """Prefer echoing the prompt's letter over any other letter: a rule that generalises to new pairs."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(list(LETTERS), size=2, replace=False)
        rows.append({"prompt": f"{a}:", "chosen": a * 2, "rejected": b * 2})
    return rows


def setup(backend):
    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = DPOConfig(steps=25, batch_size=16, max_prompt_length=4, max_completion_length=4, beta=0.5,
                    optim=OptimConfig(lr=1e-2))
    state = backend.init_train_state(backend.build(spec, spec.init_weights(0)), cfg.optim)
    return tok, cfg, state


def test_preference_accuracy_rises_on_held_out_pairs(backend):
    from diptych.core.metrics import MetricsLogger

    tok, cfg, state = setup(backend)
    train, test = pairs(0, 64), pairs(1, 32)
    ref_test = ReferenceCache.compute(backend, state.model, tok, test, cfg)
    before = evaluate_preferences(backend, state.model, tok, test, cfg, ref_test)
    assert before["eval/rewards_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    log = MetricsLogger()
    state = train_dpo(backend, state, tok, train, cfg, log)
    after = evaluate_preferences(backend, state.model, tok, test, cfg, ref_test)
    assert after["eval/rewards_accuracy"] >= 0.9 > before["eval/rewards_accuracy"]
    assert after["eval/rewards_margin"] > 0.5
    first, last = log.history[0], log.history[-1]
    for key in ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "tokens_per_s"):
        assert key in last
    assert first["loss"] == pytest.approx(np.log(2.0), rel=1e-4)  # -log sigmoid(0) at step 1
    assert last["rewards_accuracy"] > first["rewards_accuracy"] and last["loss"] < first["loss"]


class CountingBackend:
    """Forwards to a real backend, counting reference/policy forward passes made by the loop."""

    def __init__(self, inner):
        self.inner, self.logprob_calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logprobs(self, *a, **kw):
        self.logprob_calls += 1
        return self.inner.logprobs(*a, **kw)


def test_reference_is_computed_once_and_never_during_training(backend, tmp_path):
    tok, cfg, state = setup(backend)
    cfg = DPOConfig(**{**cfg.__dict__, "steps": 3, "precompute_ref_batch_size": 16})
    rows = pairs(0, 40)
    counting = CountingBackend(backend)
    cache = ReferenceCache.compute(counting, state.model, tok, rows, cfg)
    assert counting.logprob_calls == 2 * 3  # chosen + rejected, for ceil(40 / 16) = 3 chunks
    assert cache.chosen.shape == (40, cfg.width - 1)
    loaded = ReferenceCache.load(cache.save(tmp_path / "ref.npz"), n_rows=40)
    np.testing.assert_array_equal(loaded.chosen, cache.chosen)
    counting.logprob_calls = 0
    train_dpo(counting, state, tok, rows, cfg, ref_cache=loaded)
    assert counting.logprob_calls == 0
    with pytest.raises(TrainerError, match="holds 40 rows but the dataset has 41"):
        ReferenceCache.load(tmp_path / "ref.npz", n_rows=41)


def test_bad_preference_rows_are_refused_with_the_missing_column(backend):
    tok, cfg, state = setup(backend)
    with pytest.raises(TrainerError, match="lacks column\\(s\\) rejected"):
        train_dpo(backend, state, tok, [{"prompt": "a:", "chosen": "aa"}], cfg)
    with pytest.raises(TrainerError, match="reference cache"):
        train_dpo(backend, state, tok, pairs(0, 4), cfg, start_step=2)
    with pytest.raises(TrainerError, match="loss_type must be one of"):
        DPOConfig(loss_type="sigmod")
