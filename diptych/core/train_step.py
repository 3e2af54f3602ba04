"""The backend-neutral half of a train step, so that a backend's ``train.py`` holds only autodiff and optimizer code.

A train step on any backend: check the loss configs and micro-batches (:func:`prepare_step`), compute the
declared model outputs, complete the loss inputs (:func:`loss_inputs`: constants, detached defaults such as an
omitted ``old_logprobs``), run each registered loss, accumulate gradient sums and denominators, check the
denominators (:func:`check_denominators`), divide once, skip a non-finite update (:func:`skip_step`) and report
(:func:`step_metrics`). Everything here is numpy or the Array API, run on whatever arrays the backend hands in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.core import xp as X
from diptych.core.losses.registry import DETACHED, loss_spec
from diptych.core.train_batch import int_keys, layout, loss_terms, needed_outputs, reduce_metrics, validate_microbatch

Array = Any

MAX_METRICS = frozenset({"sampler_logprob_gap"})
"""Step metrics reduced by the maximum over micro-batches (not averaged)."""

ATTENTION_MASKS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")


class StepError(ValueError):
    """A train step asked for something it cannot do, with what to change."""


@dataclass(frozen=True)
class StepPlan:
    """What one train step computes, settled before any model runs: ``terms`` ``{name: weight}``,
    ``configs`` ``{name: loss config}``, ``outputs`` the model outputs to compute for each micro-batch
    (one set per micro-batch: an omitted detached-default key adds its source) and ``int_keys``."""

    terms: dict[str, float]
    configs: dict[str, Any]
    outputs: tuple[frozenset[str], ...]
    int_keys: frozenset[str]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.terms)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(self.terms.values())


def resolve_configs(terms: Mapping[str, float], loss_config: Any) -> dict[str, Any]:
    """``{term: config}``: one config for a single term (or a mapping naming it), a mapping for a composite loss.

    A config of the wrong class for its registered loss is refused here, before anything compiles.
    """
    if len(terms) == 1:
        (t,) = terms
        configs = {t: loss_config[t] if isinstance(loss_config, Mapping) and t in loss_config else loss_config}
    else:
        if not isinstance(loss_config, Mapping) or not set(terms) <= set(loss_config):
            raise StepError(f"A composite loss {dict(terms)} needs loss_config as a mapping with a config for each "
                            f"of {', '.join(terms)}.")
        configs = {t: loss_config[t] for t in terms}
    for t, cfg in configs.items():
        cls = loss_spec(t).config
        if cls is not None and not isinstance(cfg, cls):
            raise StepError(f"Loss {t!r} takes a {cls.__name__} as its config, got {type(cfg).__name__}; "
                            f"pass {cls.__name__}(...).")
    return configs


def prepare_step(microbatches: Sequence[Mapping[str, np.ndarray]], loss: str | Mapping[str, float],
                 loss_config: Any, *, has_value_head: bool) -> StepPlan:
    """Check a step's arguments against the registered losses and say what to compute (a :class:`StepPlan`)."""
    terms = loss_terms(loss)
    configs = resolve_configs(terms, loss_config)
    if not microbatches:
        raise StepError("train_step needs at least one micro-batch.")
    for mb in microbatches:
        validate_microbatch(mb, terms)
    outputs = tuple(needed_outputs(terms, configs, mb.keys()) for mb in microbatches)
    if not has_value_head and any("values" in o for o in outputs):
        needing = [t for t in terms if "values" in loss_spec(t).outputs(configs[t])]
        raise StepError(f"The {', '.join(repr(t) for t in needing)} loss needs a value head: "
                        "init_train_state(model, optim, value_head=True).")
    return StepPlan(terms=terms, configs=configs, outputs=outputs, int_keys=int_keys(terms))


def host_batch(mb: Mapping[str, np.ndarray], plan: StepPlan) -> dict[str, np.ndarray]:
    """The micro-batch as numpy: integer model inputs as int32, everything else float32."""
    return {k: np.asarray(v, dtype=np.int32 if k in plan.int_keys else np.float32) for k, v in mb.items()}


def loss_inputs(batch: Mapping[str, Array], quantities: Mapping[str, Array], names: Sequence[str],
                stop_gradient: Callable[[Array], Array], outputs: Iterable[str] = ()) -> dict[str, Array]:
    """What the losses read: the batch's constants, the model outputs, ``stop_gradient`` of the source of each
    ``detached_<output>`` among ``outputs`` and, for each absent key with a detached default, ``stop_gradient``
    of its source output (``old_logprobs = sg(logprobs)``).

    A detached copy is made finite (:func:`finite_detached`): the losses check non-model inputs for NaN, which
    on an eager backend (torch) would turn a diverged model into an input error, while under tracing (JAX)
    the NaN would flow into the loss; the source output stays as it is, so a diverged model still gives a
    non-finite loss on both backends and the step is skipped alike.
    """
    ints = int_keys(names)
    inputs = {**{k: v for k, v in batch.items() if k not in ints}, **quantities}
    for name in outputs:
        if name.startswith(DETACHED) and name not in inputs:
            inputs[name] = stop_gradient(finite_detached(quantities[name[len(DETACHED):]]))
    for key, src in layout(names).detached_defaults.items():
        if key not in inputs and src in quantities:
            inputs[key] = stop_gradient(finite_detached(quantities[src]))
    return inputs


def finite_detached(x: Array) -> Array:
    """The source of a detached copy, with NaN and infinities replaced by 0 when its values can be read now
    (eager backends: the only place the losses' input check runs). A finite ``x`` is returned as it is, and
    a traced one too (JAX: the NaN reaches the loss as it would through the source itself); no gradient
    flows through the detached copy, so nothing else changes."""
    if not X.is_concrete(x):
        return x
    xp = X.namespace(x)
    finite = xp.isfinite(x)
    if bool(xp.all(finite)):
        return x
    return xp.where(finite, x, xp.zeros_like(x))


def model_outputs(outputs: frozenset[str], batch: Mapping[str, Any], *, logprobs: Callable[[Any, Any, Any], Array],
                  hidden_states: Callable[[Any, Any], Array], logprobs_and_entropy: Callable[[Array, Any], tuple],
                  values: Callable[[Array], Array],
                  iteration_logprobs: Callable[[Any, Any, Any], Array] | None = None) -> dict[str, Array]:
    """Compute the declared model ``outputs`` with the backend's primitives, running the model as few times as
    both backends agree on: one ``logprobs`` call per side of a preference pair; on ``tokens``, the plain
    ``logprobs`` seam when only log-probs are wanted, else one ``hidden_states`` pass shared by log-probs,
    entropy (one fused kernel call) and the value head.

    Primitives: ``logprobs(tokens, attention_mask, targets)``, ``hidden_states(tokens, attention_mask)``,
    ``logprobs_and_entropy(hidden, targets)`` and ``values(hidden)``; inputs are ``[B, T - 1]`` slices.
    ``iteration_logprobs`` (recurrent models: ``[B, k, T - 1]``, one row per differentiated iteration) comes
    from its own primitive when the backend passes one, else from ``logprobs(tokens, mask, PerIteration(targets))``.
    """
    out: dict[str, Array] = {}
    if "iteration_logprobs" in outputs:
        tok, am = batch["tokens"], batch["attention_mask"]
        seam = iteration_logprobs or (lambda t, m, y: logprobs(t, m, PerIteration(y)))
        out["iteration_logprobs"] = seam(tok[:, :-1], am[:, :-1], tok[:, 1:])
    for side in ("chosen", "rejected"):
        if f"{side}_logprobs" in outputs:
            tok, am = batch[f"{side}_tokens"], batch[f"{side}_attention_mask"]
            out[f"{side}_logprobs"] = logprobs(tok[:, :-1], am[:, :-1], tok[:, 1:])
    need_lp, need_entropy, need_values = ("logprobs" in outputs, "entropy" in outputs, "values" in outputs)
    if not (need_lp or need_entropy or need_values):
        return out
    tok, am = batch["tokens"], batch["attention_mask"]
    if need_lp and not (need_entropy or need_values):
        out["logprobs"] = logprobs(tok[:, :-1], am[:, :-1], tok[:, 1:])
        return out
    hidden = hidden_states(tok[:, :-1], am[:, :-1])
    if need_lp or need_entropy:
        lp, entropy = logprobs_and_entropy(hidden, tok[:, 1:])
        if need_lp:
            out["logprobs"] = lp
        if need_entropy:
            out["entropy"] = entropy
    if need_values:
        out["values"] = values(hidden)
    return out


class PerIteration:
    """Targets wrapped to ask a recurrent backend's ``logprobs`` for every differentiated iteration's log-probs
    (``[B, k, T - 1]``) instead of the final one's; a model without iterations refuses it in one line."""

    def __init__(self, targets: Any) -> None:
        self.targets = targets

    def __array__(self, *a: Any, **k: Any) -> Any:
        raise StepError("The 'iteration_logprobs' output (the 'trajectory' loss with a per-iteration weighting) "
                        "needs a recurrent-depth model; use the 'policy' loss for this model.")


def run_losses(inputs: Mapping[str, Array], names: Sequence[str],
               configs: Mapping[str, Any]) -> list[tuple[Array, Array, dict[str, Array]]]:
    """Each term's ``(unreduced sum, denominator, metrics)`` in the order of ``names``."""
    return [loss_spec(t).fn(inputs, configs[t]) for t in names]


def extra_metrics(inputs: Mapping[str, Array]) -> dict[str, Array]:
    """Step-level diagnostics computed next to the losses (array scalars, reduced by :data:`MAX_METRICS`).

    ``sampler_logprob_gap``: ``max |logprobs - sampler_logprobs|`` over ``mask``, so a trainer that skips the
    old-log-prob forward still sees how far the sampler's log-probs are from the trainer's.
    """
    out: dict[str, Array] = {}
    if all(inputs.get(k) is not None for k in ("logprobs", "sampler_logprobs", "mask")):
        lp = X.upcast(inputs["logprobs"])
        xp = X.namespace(lp)
        gap = xp.abs(lp - X.as_like(inputs["sampler_logprobs"], lp))
        mask = X.as_like(inputs["mask"], lp)
        out["sampler_logprob_gap"] = xp.max(xp.where(mask > 0, gap, xp.zeros_like(gap)))
    return out


def metric_row(names: Sequence[str], term_metrics: Sequence[Mapping[str, Any]],
               to_float: Callable[[Any], float] = float) -> list[dict[str, float]]:
    """Per-term loss metrics of one micro-batch as floats, prefixed ``term/`` when there are several terms."""
    prefix = len(names) > 1
    return [{(f"{t}/" if prefix else "") + k: to_float(v) for k, v in m.items()} for t, m in zip(names, term_metrics)]


def count_tokens(mb: Mapping[str, np.ndarray]) -> int:
    """Non-pad input tokens of a micro-batch (every attention mask it carries)."""
    return sum(int(np.sum(np.asarray(mb[k]))) for k in ATTENTION_MASKS if k in mb)


def check_denominators(names: Sequence[str], dens: Sequence[float]) -> None:
    """Refuse a step whose loss has nothing to average over (a zero total denominator would divide by zero)."""
    for t, d in zip(names, dens):
        if not d > 0:
            raise StepError(f"Loss {t!r} has total denominator {d} over the micro-batches (no tokens or sequences "
                            "to average over); check the masks.")


def combined_loss(weights: Sequence[float], sums: Sequence[float], dens: Sequence[float]) -> float:
    """The weighted sum of each term's mean: ``sum_i w_i * sum_i / den_i``, what the step minimises."""
    return float(sum(w * s / d for w, s, d in zip(weights, sums, dens)))


def skip_step(step: int, total: float, grad_norm: float) -> bool:
    """Whether to skip the update: a non-finite loss or gradient norm leaves weights and optimizer untouched."""
    if math.isfinite(total) and math.isfinite(grad_norm):
        return False
    warnings.warn(f"Skipping optimizer step {step}: non-finite loss ({total}) or gradient norm ({grad_norm}); "
                  "weights and optimizer state are unchanged.", RuntimeWarning, stacklevel=4)
    return True


def step_metrics(*, total: float, grad_norm: float, lr: float, denominator: float, tokens: int,
                 loss_rows: Iterable[Mapping[str, float]],
                 extra_rows: Iterable[Mapping[str, float]] = ()) -> dict[str, float]:
    """The metrics every backend's step returns (``skipped`` is added by the caller of :func:`skip_step`)."""
    out = {"loss": float(total), "grad_norm": float(grad_norm), "lr": float(lr), "denominator": float(denominator),
           "tokens": float(tokens), **reduce_metrics(loss_rows)}
    for row in extra_rows:
        for k, v in row.items():
            out[k] = max(out.get(k, -math.inf), float(v)) if k in MAX_METRICS else float(v)
    return out


@dataclass
class StepTotals:
    """What a step accumulates besides gradients: per-term loss sums and denominators, metric rows, tokens.

    A backend calls :meth:`add` once per micro-batch and :meth:`close` after the last, then reads
    :attr:`loss` and :meth:`report`; its own code keeps only the gradient sums and the optimizer.
    """

    plan: StepPlan
    sums: list[float] = field(default_factory=list)
    dens: list[float] = field(default_factory=list)
    loss_rows: list[dict[str, float]] = field(default_factory=list)
    extra_rows: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0

    def __post_init__(self) -> None:
        n = len(self.plan.names)
        self.sums, self.dens = [0.0] * n, [0.0] * n

    def add(self, mb: Mapping[str, np.ndarray], sums: Sequence[Any], dens: Sequence[Any],
            term_metrics: Sequence[Mapping[str, Any]], extra: Mapping[str, Any],
            to_float: Callable[[Any], float] = float) -> None:
        """Record one micro-batch: its per-term sums, denominators and metrics and its step-level extras."""
        for i, (s, d) in enumerate(zip(sums, dens)):
            self.sums[i] += to_float(s)
            self.dens[i] += to_float(d)
        self.loss_rows += metric_row(self.plan.names, term_metrics, to_float)
        self.extra_rows.append({k: to_float(v) for k, v in extra.items()})
        self.tokens += count_tokens(mb)

    def close(self) -> StepTotals:
        """Check the totals (every term has something to average over) once the last micro-batch is in."""
        check_denominators(self.plan.names, self.dens)
        return self

    @property
    def loss(self) -> float:
        return combined_loss(self.plan.weights, self.sums, self.dens)

    def report(self, step: int, grad_norm: float, lr: float) -> dict[str, float]:
        """The step's metrics, ``skipped`` included (1.0, with a warning, when the update must be skipped)."""
        metrics = step_metrics(total=self.loss, grad_norm=grad_norm, lr=lr, denominator=self.dens[0],
                               tokens=self.tokens, loss_rows=self.loss_rows, extra_rows=self.extra_rows)
        metrics["skipped"] = 1.0 if skip_step(step, self.loss, grad_norm) else 0.0
        return metrics
