"""The sampling rule, stopping, budget forcing and voting, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diptych.core import sampling as S
from diptych.core.spec import tiny_spec

SPEC = tiny_spec("llama", vocab_size=16, max_position_embeddings=256)


# -- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(n=0), "n"),
        (dict(stop_sequences=((),)), "stop_sequences"),
    ],
)
def test_bad_sampling_config_raises_naming_the_field(kw, msg):
    with pytest.raises(S.SamplingError, match=msg):
        S.SamplingConfig(**kw)


def test_resolve_takes_eos_and_pad_from_spec_unless_given():
    spec = tiny_spec("llama", eos_token_id=[3, 4], pad_token_id=7)
    assert S.SamplingConfig().resolve(spec).eos_ids == (3, 4)
    assert S.SamplingConfig().resolve(spec).pad_id == 7
    assert S.SamplingConfig(eos_ids=()).resolve(spec).eos_ids == ()
    assert S.SamplingConfig(eos_ids=5, pad_id=1).resolve(spec).eos_ids == (5,)


def test_prepare_prompts_errors():
    cfg = S.SamplingConfig(max_new_tokens=4)
    with pytest.raises(S.SamplingError, match="non-empty"):
        S.prepare_prompts([], cfg, SPEC)
    with pytest.raises(S.SamplingError, match="longer than the model context"):
        S.prepare_prompts([[1] * 257], cfg, SPEC)
    with pytest.raises(S.SamplingError, match="lower max_new_tokens"):
        S.prepare_prompts([[1] * 254], cfg, SPEC)
    with pytest.raises(S.SamplingError, match="outside the vocabulary"):
        S.prepare_prompts([[1, 99]], cfg, SPEC)


def test_prepare_prompts_left_pads_repeats_contiguously_and_buckets():
    cfg = S.SamplingConfig(n=2, pad_id=0)
    tok, mask = S.prepare_prompts([[5, 6, 7], [8]], cfg, SPEC, bucket=4)
    assert tok.tolist() == [[0, 5, 6, 7], [0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    tok, mask = S.prepare_prompts([[5] * 5], cfg, SPEC, bucket=4)
    assert tok.shape == (2, 8)
    t2, m2 = S.trim_prompt(tok, mask)
    assert t2.shape == (2, 5) and m2.all()


# -- the token-choice rule ------------------------------------------------------------------------
def test_filters_by_hand():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]], np.float32))
    keep = lambda cfg: np.isfinite(S.filter_logits(logits, cfg))[0].tolist()
    assert keep(S.SamplingConfig(top_k=2)) == [True, True, False, False]
    # mass before each token: 0, .5, .75, .9 -> top_p .75 keeps the first two, .76 three.
    assert keep(S.SamplingConfig(top_p=0.74)) == [True, True, False, False]
    assert keep(S.SamplingConfig(top_p=0.76)) == [True, True, True, False]
    assert keep(S.SamplingConfig(top_p=0.1)) == [True, False, False, False]
    # min_p .29 -> threshold .145: keeps .5, .25, .15.
    assert keep(S.SamplingConfig(min_p=0.29)) == [True, True, True, False]
    # the order matters: top-k 3 then min-p .5 on the renormalised (.5/.9, .25/.9, .15/.9) -> keeps 2.
    assert keep(S.SamplingConfig(top_k=3, min_p=0.5)) == [True, True, False, False]


def test_top_k_keeps_ties_and_temperature_scales():
    logits = np.array([[1.0, 2.0, 2.0, 0.0]], np.float32)
    assert np.isfinite(S.filter_logits(logits, S.SamplingConfig(top_k=1)))[0].tolist() == [False, True, True, False]
    np.testing.assert_allclose(S.filter_logits(logits, S.SamplingConfig(temperature=0.5)), logits * 2)


def test_gumbel_max_draws_the_softmax_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1], np.float32))
    u = S.parity_noise(20000, 1, 3, seed=0)[:, 0]
    tok, lp = S.choose_tokens(np.broadcast_to(logits, (20000, 3)), S.SamplingConfig(), S.gumbel_from_uniform(u))
    freq = np.bincount(tok, minlength=3) / len(tok)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)
    np.testing.assert_allclose(lp, logits[tok], atol=1e-6)


def test_logprobs_are_full_vocab_tempered_even_when_filtered():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    cfg = S.SamplingConfig(temperature=0.7, top_k=1)
    tok, lp = S.choose_tokens(logits, cfg, np.zeros((1, 4), np.float32))
    z = logits[0] / 0.7
    assert tok[0] == 0
    assert lp[0] == pytest.approx(z[0] - math.log(np.exp(z).sum()), abs=1e-6)


def test_greedy_ignores_noise_and_uses_temperature_one_logprobs():
    logits = np.array([[0.0, 3.0, 1.0]], np.float32)
    tok, lp = S.choose_tokens(logits, S.SamplingConfig(temperature=0), np.full((1, 3), 100.0, np.float32))
    assert tok[0] == 1
    assert lp[0] == pytest.approx(3.0 - math.log(np.exp(logits[0]).sum()), abs=1e-6)


def test_noise_shape_is_checked():
    with pytest.raises(S.SamplingError, match=r"\[N, max_new_tokens, vocab\]"):
        S.check_noise(np.zeros((2, 3, 4)), 2, S.SamplingConfig(max_new_tokens=5), 4)
    with pytest.raises(S.SamplingError, match="strictly inside"):
        S.gumbel_from_uniform(np.zeros(3))


# -- stopping (reference_generate over a scripted model) ------------------------------------------
def scripted(script: dict[int, list[int]], vocab: int = 16):
    """A fake model: prompt's first token selects a script; step t emits script[t] (then 15)."""

    def next_logits(seqs):
        out = np.zeros((len(seqs), vocab), np.float32)
        for i, s in enumerate(seqs):
            plen = script_prompt_len[s[0]]
            steps = script[s[0]]
            t = len(s) - plen
            out[i, steps[t] if t < len(steps) else 15] = 10.0
        return out

    script_prompt_len: dict[int, int] = {}
    return next_logits, script_prompt_len


def run_script(script, prompts, **kw):
    fn, plens = scripted(script)
    for p in prompts:
        plens[p[0]] = len(p)
    return S.reference_generate(fn, prompts, S.SamplingConfig(temperature=0, pad_id=0, **kw), SPEC)


def test_eos_stop_sequence_max_new_and_truncated_flag():
    ro = run_script({1: [5, 6, 2, 7], 3: [5, 9, 10, 11, 12], 4: [8, 8, 8, 8, 8, 8]},
                    [[1, 1], [3], [4, 4, 4]], max_new_tokens=5, eos_ids=(2,), stop_sequences=((9, 10),))
    assert ro.completion_tokens.tolist() == [[5, 6, 2, 0, 0], [5, 9, 10, 0, 0], [8, 8, 8, 8, 8]]
    assert ro.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert ro.lengths.tolist() == [3, 3, 5]
    assert ro.truncated.tolist() == [False, False, True]
    assert (ro.logprobs[ro.completion_mask == 0] == 0).all()
    assert ro.prompt_tokens.tolist() == [[0, 1, 1], [0, 0, 3], [4, 4, 4]]
    assert ro.completions() == [[5, 6, 2], [5, 9, 10], [8, 8, 8, 8, 8]]


def test_stop_sequence_must_lie_in_the_completion():
    # prompt ends with 9; completion starts with 10: (9, 10) spans the prompt, so it must not stop.
    ro = run_script({9: [10, 11, 12]}, [[9]], max_new_tokens=3, eos_ids=(), stop_sequences=((9, 10),))
    assert ro.lengths.tolist() == [3] and ro.truncated.tolist() == [True]


def test_eos_on_the_last_step_is_not_truncated():
    ro = run_script({1: [5, 2]}, [[1]], max_new_tokens=2, eos_ids=(2,))
    assert ro.truncated.tolist() == [False] and ro.lengths.tolist() == [2]


# -- budget forcing ---------------------------------------------------------------------------------
END, WAIT, FINAL, EOS = 13, 14, 12, 2


def think_model(script):
    """A fake policy model: after the prompt it emits the script, indexed by tokens generated so far.

    The script may depend on whether WAIT appears, so a test sees the policy's insertions.
    """

    def next_logits(seqs):
        out = np.zeros((len(seqs), 16), np.float32)
        for i, s in enumerate(seqs):
            out[i, script(s[1:])] = 10.0
        return out

    return next_logits


def bf_generate(fn):
    return lambda prompts, cfg: S.reference_generate(fn, prompts, cfg, SPEC)


def test_budget_forcing_appends_wait_when_thinking_ends_too_early():
    # thinks 2 tokens then END; after a WAIT it thinks once more and ends; then answers 7, EOS.
    def script(gen):
        if gen and gen[-1] == END:
            return 7 if gen.count(7) == 0 else EOS
        if gen and gen[-1] == 7:
            return EOS
        return END if len([t for t in gen if t == 5]) >= 2 + gen.count(WAIT) else 5

    policy = S.BudgetForcing(end_think_ids=(END,), min_thinking_tokens=4, max_thinking_tokens=20,
                             continuation_ids=(WAIT,), max_waits=3, answer_prefix_ids=(FINAL,))
    cfg = S.SamplingConfig(temperature=0, eos_ids=(EOS,), pad_id=0, max_new_tokens=8)
    [res] = S.budget_forced_generate(bf_generate(think_model(script)), [[1]], cfg, policy)
    # 5 5 | END suppressed, WAIT | 5 | END (thinking = 4 tokens incl. WAIT: enough) | 7 EOS
    assert res.tokens == [5, 5, WAIT, 5, END, 7, EOS]
    assert res.inserted == [False, False, True, False, False, False, False]
    assert res.waits == 1 and res.thinking_tokens == 4 and not res.forced_end and not res.truncated


def test_budget_forcing_does_not_wait_when_minimum_is_met_and_caps_waits():
    def script(gen):
        return 7 if gen and gen[-1] in (END, 7) and gen.count(7) < 1 else (EOS if gen and gen[-1] == 7 else END)

    cfg = S.SamplingConfig(temperature=0, eos_ids=(EOS,), pad_id=0)
    met = S.BudgetForcing(end_think_ids=(END,), max_thinking_tokens=20, continuation_ids=(WAIT,))
    [res] = S.budget_forced_generate(bf_generate(think_model(script)), [[1]], cfg, met)
    assert res.tokens == [END, 7, EOS] and res.waits == 0
    capped = S.BudgetForcing(end_think_ids=(END,), min_thinking_tokens=10, max_thinking_tokens=20,
                             continuation_ids=(WAIT,), max_waits=2)
    [res] = S.budget_forced_generate(bf_generate(think_model(script)), [[1]], cfg, capped)
    assert res.tokens == [WAIT, WAIT, END, 7, EOS] and res.waits == 2


def test_budget_forcing_cuts_at_the_maximum_and_forces_the_answer_prefix():
    def script(gen):
        return EOS if gen and gen[-1] == FINAL else 5  # never ends thinking by itself

    policy = S.BudgetForcing(end_think_ids=(END,), max_thinking_tokens=6, answer_prefix_ids=(FINAL,))
    cfg = S.SamplingConfig(temperature=0, eos_ids=(EOS,), pad_id=0, n=2)
    res = S.budget_forced_generate(bf_generate(think_model(script)), [[1]], cfg, policy)
    assert len(res) == 2
    assert res[0].tokens == [5] * 6 + [END, FINAL, EOS]
    assert res[0].inserted == [False] * 6 + [True, True, False]
    assert res[0].forced_end and res[0].thinking_tokens == 6


def test_budget_forcing_config_errors():
    with pytest.raises(S.SamplingError, match="continuation_ids"):
        S.BudgetForcing(end_think_ids=(END,), min_thinking_tokens=3)
    with pytest.raises(S.SamplingError, match="exceeds"):
        S.BudgetForcing(end_think_ids=(END,), min_thinking_tokens=9, max_thinking_tokens=3, continuation_ids=(1,))


# -- voting and pass@k --------------------------------------------------------------------------------
def test_majority_vote():
    assert S.majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie -> earliest
    assert S.majority_vote(["3", "4", "4"]) == "4"
    assert S.majority_vote([None, None]) is None
    assert S.majority_vote_groups(["1", "1", "2", "3", None, "3"], 3) == ["1", "3"]
    with pytest.raises(S.SamplingError):
        S.majority_vote_groups(["1", "2"], 3)


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 5), (20, 7, 8)]:
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert S.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert S.mean_pass_at_k(np.array([[1, 0], [0, 0]], bool), 1) == pytest.approx(0.25)
    with pytest.raises(S.SamplingError):
        S.pass_at_k(3, 4, 1)
