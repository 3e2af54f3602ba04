"""The library API equals the CLI; TRL-named configs with deprecated old names; beta has one home;
typed loss overrides from ``key=value``; GRPO skips the old-log-prob forward with one iteration."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import needs_torch

from diptych.cli import main
from diptych.commands.train import RUN_CONFIGS, train
from diptych.core.config import from_dict, load_config
from diptych.core.trainers.grpo import GRPOConfig, GRPOLoss

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "data.task_knobs.digits=1", "data.n_train=32", "data.n_test=4"]
GRPO_TINY = [*TINY, "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.max_prompt_length=6",
             "grpo.max_completion_length=4", "grpo.steps=2"]


def _metrics(path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    timing = ("tokens_per_s", "elapsed_s")
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in timing} for r in rows]


# -- the faults of issue 12 --------------------------------------------------------------------------
def test_loss_override_from_the_command_line_is_typed():
    """``grpo.loss.epsilon_high=0.28`` arrives as a string; it must reach the loss as a float (it raised
    TypeError in the loss config's validation)."""
    cfg = load_config(RUN_CONFIGS["grpo"], None, ["grpo.loss.epsilon_high=0.28", "grpo.loss_type=grpo"])
    assert cfg.grpo.loss_config().eps_high == 0.28 and cfg.grpo.loss_config().eps_low == 0.2
    with pytest.warns(DeprecationWarning, match="loss_overrides"):
        old = load_config(RUN_CONFIGS["grpo"], None, ["grpo.loss_overrides.eps_high=0.28"])
    assert old.grpo.loss_config().eps_high == 0.28
    with pytest.raises(ValueError, match="epsilon_high must be float"):
        load_config(RUN_CONFIGS["grpo"], None, ["grpo.loss.epsilon_high=high"])


@pytest.mark.parametrize("text", ["partial_credit,format", "[partial_credit,format]", "[partial_credit, format]",
                                  "['partial_credit', \"format\"]"])
def test_a_list_override_takes_commas_or_brackets(text):
    """``data.reward=[partial_credit]`` (YAML / Hydra style) was read as the one name "[partial_credit]"."""
    cfg = load_config(RUN_CONFIGS["grpo"], None, [f"data.reward={text}"])
    assert cfg.data.reward == ["partial_credit", "format"]


@needs_torch
def test_old_style_loss_override_on_the_command_line_runs(tmp_path, capsys):
    args = ["train", "grpo", "--backend", "torch", "--quiet", f"out={tmp_path}", "grpo.loss_overrides.eps_high=0.28",
            *GRPO_TINY]
    assert main(args) == 0, capsys.readouterr().err
    assert len(_metrics(tmp_path / "metrics.jsonl")) == 2


def test_preset_beta_is_kept_unless_beta_is_set():
    assert from_dict(GRPOConfig, {"loss_type": "grpo"}).loss_config().beta == 0.04
    with pytest.warns(DeprecationWarning, match="loss_type"):
        assert GRPOConfig(loss="grpo").loss_config().beta == 0.04  # the old spelling of the preset
    assert from_dict(GRPOConfig, {"loss_type": "grpo", "beta": 0.0}).loss_config().beta == 0.0
    assert from_dict(GRPOConfig, {"loss_type": "dapo"}).loss_config().beta == 0.0


@needs_torch
@pytest.mark.parametrize("where", ["preset", "loss_overrides"])
def test_beta_from_the_preset_or_the_loss_gets_a_reference_model(where, tmp_path):
    """The reference exists exactly when the loss's beta is > 0, wherever beta was set (a beta given only
    to the loss used to fail mid-run; the preset's beta used to be replaced by 0)."""
    from diptych.core.backend import get_backend

    grpo = {"prompts_per_step": 2, "num_generations": 4, "max_prompt_length": 6, "max_completion_length": 4,
            "steps": 1, **({"loss_type": "grpo"} if where == "preset" else {"loss_overrides": {"beta": 0.04}})}
    data = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
            "data": {"task_knobs": {"digits": 1}, "n_train": 16, "n_test": 4}, "out": str(tmp_path), "grpo": grpo}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = from_dict(RUN_CONFIGS["grpo"], data)
    assert cfg.grpo.beta == 0.04 and cfg.grpo.loss_config().beta == 0.04
    train("grpo", get_backend("torch"), cfg, console=False)
    row = _metrics(tmp_path / "metrics.jsonl")[0]
    assert np.isfinite(row["kl"]) and row["kl"] >= 0
    assert (tmp_path / "checkpoints" / "reference" / "config.json").is_file()  # saved once, for resume


# -- library API == CLI ------------------------------------------------------------------------------
@needs_torch
def test_grpo_trainer_api_equals_the_cli(tmp_path):
    from diptych import GRPOConfig as TopLevelConfig
    from diptych import GRPOTrainer
    from diptych.core.backend import get_backend
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import DecoderSpec
    from diptych.core.tokenizer import CharTokenizer

    assert TopLevelConfig is GRPOConfig
    # a dense reward (distance of the completion length from a per-row budget), so the runs learn something
    rows = [{"prompt": f"{a}{b}>", "budget": 2 + (i % 2)} for i, (a, b) in enumerate(zip("abcdefgh", "ijklmnop"))]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "grpo", "--backend", "torch", "--quiet", f"out={tmp_path / 'cli'}", f"data.path={data}",
                 "data.reward=length", "grpo.beta=0.01", "grpo.loss.epsilon_high=0.28", "grpo.optim.lr=3e-2",
                 *GRPO_TINY]) == 0

    backend, tok = get_backend("torch"), CharTokenizer()
    spec = DecoderSpec(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=6 + 4 + 8, initializer_range=0.05, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    args = GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_prompt_length=6, max_completion_length=4,
                      beta=0.01, loss=GRPOLoss(epsilon_high=0.28), optim=OptimConfig(lr=3e-2))
    trainer = GRPOTrainer(backend.build(spec, spec.init_weights(0)), ["length"], args=args, train_dataset=rows,
                          backend=backend, tokenizer=tok, out_dir=tmp_path / "api")
    result = trainer.train()
    api, cli = _metrics(tmp_path / "api" / "metrics.jsonl"), _metrics(tmp_path / "cli" / "metrics.jsonl")
    assert trainer.ref_model is not None and result["reward"] == api[-1]["reward"]
    assert [r["step"] for r in api] == [1, 2] and api[0].keys() == cli[0].keys()
    assert api[0]["reward_std"] > 0 and api[1]["kl"] > 0  # a real signal, and the policy moved off the reference
    for a, c in zip(api, cli):
        for k in a:
            assert a[k] == pytest.approx(c[k], rel=1e-6, abs=1e-7), k


def test_trainer_registry_drives_the_cli_choices():
    from diptych.commands.train import RUN_CONFIGS as configs
    from diptych.core.trainers.api import TRAINERS, get_trainer

    assert set(TRAINERS) == {"sft", "dpo", "grpo", "ppo"} == set(configs)
    assert get_trainer("grpo").config_cls is GRPOConfig and get_trainer("grpo").needs_reward
    with pytest.raises(KeyError, match="registered: dpo, grpo, ppo, sft"):
        get_trainer("rlhf")


def test_advantage_options_reach_the_estimator_and_are_refused_where_unused():
    from diptych.core.advantages import compute_advantages, get_estimator

    assert get_estimator("grpo").options == ("scale", "eps", "ddof")
    assert get_estimator("gae").needs == ("values", "mask")
    cfg = from_dict(GRPOConfig, {"scale_rewards": "none"})
    r = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
    np.testing.assert_allclose(compute_advantages(cfg.advantage, r, 4, **cfg.advantage_kwargs()),
                               [-0.75, 0.25, 0.25, 0.25])
    cfg = from_dict(GRPOConfig, {"advantage": "reinforce_pp", "advantage_baseline": "group"})
    assert cfg.advantage_kwargs() == {"baseline": "group"}
    with pytest.raises(ValueError, match="scale_rewards='batch' has no effect with advantage='rloo'"):
        GRPOConfig(advantage="rloo", scale_rewards="batch")
    with pytest.raises(ValueError, match="needs a critic"):
        GRPOConfig(advantage="gae")
    with pytest.raises(ValueError, match="does not use scale"):
        compute_advantages("rloo", r, 4, scale="group")


# -- old names: accepted for one release, with a DeprecationWarning naming the new one -----------------
@pytest.mark.parametrize(("cls_name", "old", "new", "value"), [
    ("SFTConfig", "max_completion_len", "max_completion_length", 7),
    ("DPOConfig", "kind", "loss_type", "ipo"),
    ("GRPOConfig", "group_size", "num_generations", 4),
    ("PPOConfig", "samples_per_prompt", "num_generations", 2),
])
def test_old_names_are_accepted_with_a_deprecation_warning(cls_name, old, new, value):
    import diptych

    cls = getattr(diptych, cls_name)
    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        cfg = cls(**{old: value})
    assert getattr(cfg, new) == value
    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        assert getattr(cfg, old) == value
    with pytest.warns(DeprecationWarning, match=f"{cls_name.lower()[:-6]}.{old} is deprecated"):
        run = from_dict(RUN_CONFIGS[cls_name.lower()[:-6]], {cls_name.lower()[:-6]: {old: str(value)}})
    assert getattr(getattr(run, cls_name.lower()[:-6]), new) == value
    with pytest.raises(ValueError, match="same setting"):
        cls(**{old: value, new: value})


# -- GRPO with one iteration: no separate old-log-prob forward, same update ----------------------------
@pytest.mark.parametrize("iterations", [1, 2])
def test_one_iteration_skips_the_old_logprob_forward_with_the_same_update(backend, iterations):
    from diptych.core.optim import OptimConfig
    from diptych.core.spec import tiny_spec
    from diptych.core.tokenizer import CharTokenizer
    from diptych.core.train_batch import split_microbatches
    from diptych.core.trainers.base import sequence_logprobs
    from diptych.core.trainers.grpo import grpo_step

    tok = CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = GRPOConfig(prompts_per_step=2, num_generations=4, micro_batches=2, max_prompt_length=3,
                     max_completion_length=4, num_iterations=iterations, seed=2, optim=OptimConfig(lr=1e-2))
    reward = lambda prompts, completions, **kw: [sum(ch.islower() for ch in c) / 4 for c in completions]
    w0 = spec.init_weights(0)
    seen: dict = {"logprobs": 0}
    logprobs, train_step = backend.logprobs, backend.train_step

    def spy_logprobs(*a, **kw):
        seen["logprobs"] += 1
        return logprobs(*a, **kw)

    def spy_train_step(st, mbs, *a, **kw):
        seen.setdefault("batches", []).append([dict(mb) for mb in mbs])
        return train_step(st, mbs, *a, **kw)

    state = backend.init_train_state(backend.build(spec, w0), cfg.optim)
    mp = pytest.MonkeyPatch()
    mp.setattr(backend, "logprobs", spy_logprobs)
    mp.setattr(backend, "train_step", spy_train_step)
    try:
        state, metrics = grpo_step(backend, state, tok, reward, [{"prompt": "ab>"}, {"prompt": "cd>"}], cfg, 0)
    finally:
        mp.undo()
    assert metrics["skipped"] == 0.0
    assert seen["logprobs"] == (iterations > 1)  # the old-log-prob forward, only when a later pass needs it
    assert all(("old_logprobs" in mb) == (iterations > 1) for mb in seen["batches"][0])
    assert 0 <= metrics["sampler_logprob_gap"] < 1e-3  # sampler and trainer agree in fp32 on CPU
    if iterations > 1:
        return
    # oracle: the same step with the old log-probs computed by a separate forward, as before
    ref_state = backend.init_train_state(backend.build(spec, w0), cfg.optim)
    mbs = seen["batches"][0]
    full = {k: np.concatenate([np.asarray(mb[k]) for mb in mbs]) for k in mbs[0]}
    full["old_logprobs"] = sequence_logprobs(backend, ref_state.model, full["tokens"], full["attention_mask"],
                                             full["mask"], cfg.temperature)
    ref_state, ref_metrics = backend.train_step(ref_state, split_microbatches(full, cfg.micro_batches), "policy",
                                                cfg.loss_config(), temperature=cfg.temperature)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4)
    got, want = backend.export_weights(state), backend.export_weights(ref_state)
    for k in want:  # Adam's first step is about lr * sign(g): near-zero gradients flip at 1e-3 of lr
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-3 * cfg.optim.lr, err_msg=k)


@needs_torch
@pytest.mark.parametrize(("trainer", "knob", "needs_ref"), [
    ("grpo", {"beta": 0.0}, False), ("ppo", {"kl_coef": 0.0}, False), ("ppo", {"kl_coef": 0.05}, True),
    ("dpo", {"loss_type": "simpo"}, False), ("dpo", {"loss_type": "sigmoid"}, True),
])
def test_the_reference_exists_exactly_when_the_kl_weight_needs_it(trainer, knob, needs_ref, tmp_path):
    import diptych
    from diptych.core.backend import get_backend
    from diptych.core.spec import tiny_spec
    from diptych.core.tokenizer import CharTokenizer

    backend, tok = get_backend("torch"), CharTokenizer()
    spec = tiny_spec("llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    sizes = {"max_prompt_length": 4, "max_completion_length": 3, "steps": 1}
    if trainer == "dpo":
        args = diptych.DPOConfig(batch_size=2, **sizes, **knob)
        rows, reward = [{"prompt": f"{c}>", "chosen": "ab", "rejected": "ba"} for c in "xyzw"], None
    else:
        cls = diptych.GRPOConfig if trainer == "grpo" else diptych.PPOConfig
        args = cls(prompts_per_step=2, num_generations=2, **sizes, **knob)
        rows, reward = [{"prompt": f"{c}>"} for c in "xyzw"], (lambda p, c, **kw: [float(len(x)) for x in c])
    cls = getattr(diptych, f"{trainer.upper()}Trainer")
    t = cls(backend.build(spec, spec.init_weights(0)), reward, args=args, train_dataset=rows, backend=backend,
            tokenizer=tok, out_dir=tmp_path)
    t.train()
    if trainer == "dpo":
        assert (t.ref_cache is not None) == needs_ref == (tmp_path / "checkpoints" / "ref_logprobs.npz").is_file()
    else:
        assert (t.ref_model is not None) == needs_ref == (tmp_path / "checkpoints" / "reference").is_dir()
    assert len(t.history) == 1 and (tmp_path / "checkpoints" / "step_00000001").is_dir()
