"""Training-step parity: an SFT step, a GRPO step on fixed rollouts and a DPO step give the same
loss, gradients and updated weights on every installed backend, after 1 and after 10 updates.

Each backend runs the trainer's own path (old log-probs recomputed from its current
weights, DPO reference log-probs cached once from its initial weights) through
``backend.train_step``; only the rollouts, preference pairs and initial weights are shared.
Importing this module registers the ``train`` suite with :mod:`diptych.parity.harness`.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from diptych.core.advantages import compute_advantages
from diptych.core.backend import get_backend
from diptych.core.losses import PreferenceLossConfig, SFTLossConfig, policy_preset
from diptych.core.model_types import DECODER_MODEL_TYPES
from diptych.core.optim import OptimConfig
from diptych.core.train_batch import split_microbatches
from diptych.core.trainers.base import pack_sequences
from diptych.parity.harness import Case, Context, compare, register_suite

STEPS = 10
GROUP = 4
PROMPTS = 2
PROMPT_LEN = 6
COMPLETION_LEN = 8
CHECKPOINTS = (1, STEPS)
DECODERS = DECODER_MODEL_TYPES


CASES = ("sft", "grpo", "dpo")


def optim_for(dtype: str, steps: int = STEPS) -> OptimConfig:
    """Small lr (Adam moves every weight by about lr per step) with warmup + cosine, clipping and decay."""
    return OptimConfig(lr=1e-4, warmup_steps=min(2, steps - 1), total_steps=steps, schedule="cosine", weight_decay=0.01,
                       max_grad_norm=1.0, mixed_precision="bf16" if dtype == "bfloat16" else "none")


def grpo_rollouts(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed GRPO rollouts: ``PROMPTS`` left-padded prompts x ``GROUP`` completions of uneven length,
    group z-scored advantages from fixed rewards, and the per-token completion mask."""
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for p in range(PROMPTS):
        prompt = rng.integers(3, vocab, size=PROMPT_LEN - p).tolist()
        for _ in range(GROUP):
            n = int(rng.integers(2, COMPLETION_LEN + 1))
            prompts.append(prompt)
            completions.append(rng.integers(3, vocab, size=n).tolist())
    batch = pack_sequences(prompts, completions, PROMPT_LEN + COMPLETION_LEN, pad_id=0)
    rewards = rng.integers(0, 2, size=PROMPTS * GROUP).astype(np.float32)
    rewards[::GROUP], rewards[1::GROUP] = 1.0, 0.0  # every group has reward variance
    batch["advantages"] = compute_advantages("grpo", rewards, GROUP)
    return batch


def dpo_rows(vocab: int, seed: int = 1, n: int = 8) -> dict[str, np.ndarray]:
    """Fixed preference pairs in the ``preference`` layout (prompt shared by chosen and rejected)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=int(rng.integers(2, PROMPT_LEN + 1))).tolist() for _ in range(n)]
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        comps = [rng.integers(3, vocab, size=int(rng.integers(2, COMPLETION_LEN + 1))).tolist() for _ in range(n)]
        packed = pack_sequences(prompts, comps, PROMPT_LEN + COMPLETION_LEN, pad_id=0)
        for k, v in packed.items():
            out[f"{side}_{k}"] = v
    return out


def sft_rows(vocab: int, seed: int = 2, n: int = 8) -> dict[str, np.ndarray]:
    """Fixed SFT rows in the ``sft`` layout: the loss falls on the completion tokens only."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=int(rng.integers(2, PROMPT_LEN + 1))).tolist() for _ in range(n)]
    comps = [rng.integers(3, vocab, size=int(rng.integers(2, COMPLETION_LEN + 1))).tolist() for _ in range(n)]
    return pack_sequences(prompts, comps, PROMPT_LEN + COMPLETION_LEN, pad_id=0)


def case_inputs(name: str, vocab: int) -> dict[str, np.ndarray]:
    """The fixed inputs of training case ``name`` (``sft``, ``grpo`` or ``dpo``): what a golden record stores."""
    makers = {"sft": sft_rows, "grpo": grpo_rollouts, "dpo": dpo_rows}
    if name not in makers:
        raise ValueError(f"Unknown training case {name!r}; choices: {', '.join(makers)}.")
    return makers[name](vocab)


def _logprobs(be: Any, model: Any, tokens: np.ndarray, attn: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = be.logprobs(model, be.from_numpy(tokens[:, :-1]), be.from_numpy(attn[:, :-1]), be.from_numpy(tokens[:, 1:]),
                      1.0)
    return np.asarray(be.to_numpy(out), np.float32) * mask


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in sorted(weights)])


def _gradients(be: Any, state: Any, mbs: list[dict[str, np.ndarray]], loss: str, cfg: Any) -> np.ndarray | None:
    """Full-batch gradient before the update (``backend.gradients``), flattened by name."""
    if hasattr(be, "gradients"):
        return _flat(be.gradients(state, mbs, loss, cfg)[0])
    try:
        train = importlib.import_module(f"diptych.backends.{be.name}.train")
    except ImportError:
        return None
    fn = getattr(train, "gradients", None)
    if fn is None:
        return None
    grads, _ = fn(state, mbs, loss, cfg)
    return _flat(grads)


def run_case(name: str, be: Any, spec: Any, weights: dict[str, np.ndarray], dtype: str, *, steps: int = STEPS,
             batch: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Run ``steps`` updates of case ``sft``, ``grpo`` or ``dpo`` on backend ``be``; record loss, grads, weights
    after the first and the last update. ``batch`` replaces the case's fixed inputs (a golden record's copy)."""
    state = be.init_train_state(be.build(spec, weights), optim_for(dtype, steps))
    batch = dict(case_inputs(name, spec.vocab_size) if batch is None else batch)
    if name == "grpo":
        batch["ref_logprobs"] = _logprobs(be, state.model, batch["tokens"], batch["attention_mask"], batch["mask"])
        loss, cfg = "policy", policy_preset("dapo", beta=0.04)  # token-mean: non-zero on-policy loss
    elif name == "dpo":
        for side in ("chosen", "rejected"):  # the reference cache, once, from the initial weights
            batch[f"ref_{side}_logprobs"] = _logprobs(be, state.model, batch[f"{side}_tokens"],
                                                      batch[f"{side}_attention_mask"], batch[f"{side}_mask"])
        loss, cfg = "preference", PreferenceLossConfig(kind="sigmoid", beta=0.5)
    else:
        loss, cfg = "sft", SFTLossConfig()
    out: dict[str, Any] = {}
    for step in range(1, steps + 1):
        if name == "grpo":  # old log-probs from the current weights, as grpo_step does
            batch["old_logprobs"] = _logprobs(be, state.model, batch["tokens"], batch["attention_mask"],
                                              batch["mask"])
        mbs = split_microbatches(batch, 2)
        if step == 1:
            out["grads"] = _gradients(be, state, mbs, loss, cfg)
        state, metrics = be.train_step(state, mbs, loss, cfg)
        if step in (1, steps):
            out[f"loss@{step}"] = np.asarray(metrics["loss"])
            out[f"weights@{step}"] = _flat(be.export(state.model) if dtype == "float32" else _master(be, state))
    return out


def _master(be: Any, state: Any) -> dict[str, np.ndarray]:
    """The float32 master weights under mixed precision (the model itself holds bf16 copies)."""
    if hasattr(be, "export_weights"):
        return be.export_weights(state)
    train = importlib.import_module(f"diptych.backends.{be.name}.train")
    return train.export_weights(state)


def _runs(ctx: Context, suite: str, what: str) -> bool:
    """Whether a cross-backend training suite applies (two backends, a decoder); if not, say why in the report."""
    if len(ctx.backends) < 2:
        ctx.skipped.append(f"{suite}: needs two backends")
        return False
    if getattr(ctx.spec, "model_type", None) not in DECODERS:
        ctx.skipped.append(f"{suite}: no {what} for model_type {getattr(ctx.spec, 'model_type', '?')}")
        return False
    return True


@register_suite("train")
def train_suite(ctx: Context) -> list[Case]:
    """SFT-, GRPO- and DPO-step parity between every pair of installed backends."""
    if not _runs(ctx, "train", "trainer parity case"):
        return []
    cases: list[Case] = []
    for name in CASES:
        results = {b: run_case(name, get_backend(b), ctx.spec, ctx.weights, ctx.dtype) for b in ctx.backends}
        for i, a in enumerate(ctx.backends):
            for b in ctx.backends[i + 1:]:
                ra, rb = results[a], results[b]
                if ra["grads"] is not None and rb["grads"] is not None:
                    cases.append(compare(f"grads:{name} step 1", a, b, ra["grads"], rb["grads"], ctx.dtype))
                for step in CHECKPOINTS:
                    cases.append(compare(f"loss:{name} step {step}", a, b, ra[f"loss@{step}"], rb[f"loss@{step}"],
                                         ctx.dtype))
                    cases.append(compare(f"weights:{name} after {step}", a, b, ra[f"weights@{step}"],
                                         rb[f"weights@{step}"], ctx.dtype))
    return cases


# -- LoRA: the same cases with adapters on a frozen base ---------------------------------------------------
LORA_STEPS = 5
LORA_CASES = ("sft", "grpo")


def lora_config_for_parity() -> Any:
    """Rank 4 on every attention and MLP projection; alpha 8 (scaling 2), so the adapters move the loss."""
    from diptych.core.lora import LoRAConfig

    return LoRAConfig(r=4, alpha=8.0)


def run_lora_case(name: str, be: Any, spec: Any, weights: dict[str, np.ndarray], dtype: str, *,
                  steps: int = LORA_STEPS, lora: Any = None) -> dict[str, Any]:
    """``steps`` updates of case ``sft`` or ``grpo`` with LoRA on backend ``be``: the loss after every update, the
    adapters after the last, whether the base stayed bit-identical, and whether the adapters-off policy (the
    reference) scores exactly as the starting model does. GRPO's reference log-probs come from the policy with
    its adapters off, the trainers' way."""
    from diptych.core.backend import AdaptersOff

    if name not in LORA_CASES:
        raise ValueError(f"Unknown LoRA training case {name!r}; choices: {', '.join(LORA_CASES)}.")
    lora = lora if lora is not None else lora_config_for_parity()
    start = be.build(spec, weights, dtype)  # the starting model in the compute dtype (bf16: what the policy runs)
    model = be.apply_lora(be.build(spec, weights), lora, seed=0)
    state = be.init_train_state(model, optim_for(dtype, steps))
    base0 = be.export(state.model)
    batch = dict(case_inputs(name, spec.vocab_size))
    lp_args = (batch["tokens"], batch["attention_mask"], batch["mask"])
    if name == "grpo":
        batch["ref_logprobs"] = _logprobs(be, AdaptersOff(state.model), *lp_args)
        loss, cfg = "policy", policy_preset("dapo", beta=0.04)
    else:
        loss, cfg = "sft", SFTLossConfig()
    out: dict[str, Any] = {"loss": []}
    for _ in range(steps):
        if name == "grpo":
            batch["old_logprobs"] = _logprobs(be, state.model, *lp_args)
        state, metrics = be.train_step(state, split_microbatches(batch, 2), loss, cfg)
        out["loss"].append(float(metrics["loss"]))
    out["loss"] = np.asarray(out["loss"])
    out["adapters"] = _flat(be.export_adapters(state.model))
    base = be.export(state.model)
    out["base_unchanged"] = set(base) == set(base0) and all(np.array_equal(base[k], base0[k]) for k in base0)
    out["reference_exact"] = bool(np.array_equal(_logprobs(be, AdaptersOff(state.model), *lp_args),
                                                 _logprobs(be, start, *lp_args)))
    return out


def _exact_flags(result: dict[str, Any]) -> np.ndarray:
    return np.asarray([float(result["base_unchanged"]), float(result["reference_exact"])])


@register_suite("lora")
def lora_suite(ctx: Context) -> list[Case]:
    """LoRA SFT- and GRPO-step parity (loss every step, adapters after the last) between every pair of installed
    backends, plus, per backend, the frozen base untouched and the adapters-off reference exact (as a 0/1 case)."""
    if not _runs(ctx, "lora", "LoRA training case"):
        return []
    cases: list[Case] = []
    for name in LORA_CASES:
        results = {b: run_lora_case(name, get_backend(b), ctx.spec, ctx.weights, ctx.dtype) for b in ctx.backends}
        for i, a in enumerate(ctx.backends):
            for b in ctx.backends[i + 1:]:
                ra, rb = results[a], results[b]
                cases.append(compare(f"loss:lora {name} steps 1-{LORA_STEPS}", a, b, ra["loss"], rb["loss"],
                                     ctx.dtype))
                cases.append(compare(f"weights:lora {name} adapters after {LORA_STEPS}", a, b, ra["adapters"],
                                     rb["adapters"], ctx.dtype))
                for who, r in ((a, ra), (b, rb)):  # each backend's bit-exact properties, as 0/1 flags vs all 1
                    cases.append(compare(f"loss:lora {name} base frozen, reference exact ({who})", who, "ideal",
                                         _exact_flags(r), np.ones(2), ctx.dtype, tol=0.0))
    return cases
