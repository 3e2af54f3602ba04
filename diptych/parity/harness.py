"""The cross-backend parity harness: same weights, same inputs, every panel, one table.

A parity run builds one model on every installed backend (and on transformers when it is
installed and knows the architecture), feeds all of them the same left-padded batch, and
compares each quantity pairwise against DESIGN.md's tolerances. Further suites (training
steps, recurrent depth, ...) register a function that returns more :class:`Case` rows, so
`diptych parity` grows with the project instead of being rewritten.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.backend import available_backends, get_backend
from diptych.core.hf import SPEC_CLASSES, read_config, save_hf_folder
from diptych.core.model_types import MODEL_TYPES, RECURRENT_MODEL_TYPES, is_recurrent, model_type_of
from diptych.core.spec import tiny_spec
from diptych.recurrent.parity_suite import logits_tolerance_scale

# DESIGN.md "Parity tolerances": max abs for values, rel for gradients / losses.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"logits": 1e-5, "logprobs": 1e-5, "grads": 1e-4, "loss": 1e-4, "weights": 1e-4},
    "bfloat16": {"logits": 2e-2, "logprobs": 2e-2, "grads": 3e-2, "loss": 2e-2, "weights": 2e-2},
}
# Quantities judged by relative error; the rest by max abs.
RELATIVE = {"grads", "loss", "weights"}


@dataclass
class Case:
    """One comparison row: quantity ``quantity`` computed by ``a`` and by ``b``."""

    quantity: str
    a: str
    b: str
    dtype: str
    max_abs: float
    max_rel: float
    tol: float
    passed: bool
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        return d


@dataclass
class Report:
    """The cases, what was skipped, and (with a checkpoint) the config.json fields diptych did not read:
    a field listed there that changes the model shows up as a FAIL against transformers, which loads
    the folder itself; one that does not is still named, so nothing is dropped unseen."""

    cases: list[Case] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored_config_fields: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def as_json(self) -> dict[str, Any]:
        return {"pass": self.passed, "cases": [c.as_json() for c in self.cases], "skipped": self.skipped,
                "ignored_config_fields": self.ignored_config_fields}


def ignored_config_fields(checkpoint: str | os.PathLike) -> list[str]:
    """The folder's config.json fields its spec class neither reads nor knows to be inert."""
    config = read_config(checkpoint)
    entry = MODEL_TYPES.get(config.get("model_type"))
    reader = getattr(SPEC_CLASSES.get(entry.family) if entry else None, "ignored_config_fields", None)
    return list(reader(config)) if reader is not None else []


def compare(quantity: str, a: str, b: str, x: np.ndarray, y: np.ndarray, dtype: str,
            tol: float | None = None, mask: np.ndarray | None = None) -> Case:
    """Compare two arrays; ``max_rel`` is ``max|x - y| / max|y|`` (stable where y is near zero)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape:
        return Case(quantity, a, b, dtype, float("inf"), float("inf"), tol or 0.0, False,
                    f"shape {x.shape} vs {y.shape}")
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, bool).reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)
        x, y = x[m], y[m]
    if tol is None:
        tol = TOLERANCES[dtype][quantity.split(":")[0]]
    if x.size == 0:
        return Case(quantity, a, b, dtype, 0.0, 0.0, tol, True, "empty")
    finite = bool(np.isfinite(x).all() and np.isfinite(y).all())
    max_abs = float(np.max(np.abs(x - y))) if finite else float("inf")
    scale = float(np.max(np.abs(y))) if finite else 1.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    judged = max_rel if quantity.split(":")[0] in RELATIVE else max_abs
    return Case(quantity, a, b, dtype, max_abs, max_rel, tol, finite and judged <= tol,
                "" if finite else "non-finite values")


# -- the inputs ---------------------------------------------------------------------------------
def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0, pad_id: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Random token rows of uneven ``lengths``, left-padded to the longest: ``(tokens, mask)``."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(1, vocab_size, size=n)
        mask[i, t - n:] = 1
    return tokens, mask


# -- suites -------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every suite receives: the model, its weights and the shared inputs."""

    spec: Any
    weights: dict[str, np.ndarray]
    dtype: str
    backends: list[str]
    tokens: np.ndarray
    mask: np.ndarray
    temperature: float = 1.0
    num_steps: int | None = None
    with_transformers: bool = True
    skipped: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    """The user's folder: transformers loads it directly (not diptych's re-export of it)."""


Suite = Callable[[Context], list[Case]]
SUITES: dict[str, Suite] = {}


def register_suite(name: str) -> Callable[[Suite], Suite]:
    """Add a suite of cases to every parity run (``diptych parity --suite NAME`` selects some)."""

    def deco(fn: Suite) -> Suite:
        SUITES[name] = fn
        return fn

    return deco


def _model_kwargs(ctx: Context) -> dict[str, Any]:
    return {"num_steps": ctx.num_steps} if ctx.num_steps is not None else {}


@register_suite("model")
def model_suite(ctx: Context) -> list[Case]:
    """Logits and per-token log-probs on every backend, pairwise, and against transformers."""
    outputs: dict[str, dict[str, np.ndarray]] = {}
    targets = np.roll(ctx.tokens, -1, axis=1)
    valid = ctx.mask.astype(bool)
    for name in ctx.backends:
        be = get_backend(name)
        model = be.build(ctx.spec, ctx.weights, dtype=ctx.dtype)
        toks, msk = be.from_numpy(ctx.tokens), be.from_numpy(ctx.mask)
        kw = _model_kwargs(ctx)
        outputs[name] = {
            "logits": be.to_numpy(be.forward(model, toks, msk, **kw)),
            "logprobs": be.to_numpy(be.logprobs(model, toks, msk, be.from_numpy(targets), ctx.temperature, **kw)),
        }
        exported = be.export(model)
        if ctx.dtype == "float32":
            diff = max(float(np.max(np.abs(exported[k] - ctx.weights[k]))) for k in ctx.weights)
            outputs[name]["_export_diff"] = np.asarray(diff)
    if ctx.with_transformers:
        hf = _transformers_outputs(ctx, targets)
        if hf is not None:
            outputs["transformers"] = hf
    names = list(outputs)
    cases = []
    for name in ctx.backends:
        if "_export_diff" in outputs[name]:
            d = float(outputs[name]["_export_diff"])
            cases.append(Case("weights:export", name, "numpy init", ctx.dtype, d, d, 0.0, d == 0.0,
                              "bit-identical round trip"))
    tol = None
    if is_recurrent(ctx.spec):  # an unrolled recurrence is as deep as a real model
        tol = logits_tolerance(ctx.spec, int(ctx.num_steps or ctx.spec.mean_recurrence), ctx.dtype)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for q in ("logits", "logprobs"):
                cases.append(compare(q, a, b, outputs[a][q], outputs[b][q], ctx.dtype, tol=tol, mask=valid))
    return cases


def logits_tolerance(spec: Any, num_steps: int, dtype: str) -> float | None:
    """fp32 logits tolerance of a recurrent model at ``num_steps``: the tiny-model 1e-5 up to
    ``recurrent.parity_suite.TINY_DEPTH`` unrolled layers, else 1e-4; None (the table's) for bf16."""
    if dtype != "float32":
        return None
    return TOLERANCES[dtype]["logits"] * logits_tolerance_scale(spec, num_steps)


def _transformers_outputs(ctx: Context, targets: np.ndarray) -> dict[str, np.ndarray] | None:
    try:  # lazy: the oracle is optional and brings its own framework
        import torch
        import transformers
    except ImportError:
        ctx.skipped.append("transformers: not installed")
        return None
    entry = MODEL_TYPES.get(model_type_of(ctx.spec))
    if entry is None or not entry.in_transformers:
        ctx.skipped.append(f"transformers: no class for model_type {model_type_of(ctx.spec) or '?'}")
        return None
    tdtype = torch.bfloat16 if ctx.dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = ctx.checkpoint
        if folder is None:  # the embedded model: transformers reads diptych's export of it
            folder = save_hf_folder(f"{tmp}/m", ctx.spec, ctx.weights)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=tdtype, attn_implementation="eager")
    model.eval()
    tokens = torch.as_tensor(ctx.tokens, dtype=torch.long)
    mask = torch.as_tensor(ctx.mask, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits.float()
    logp = torch.log_softmax(logits / ctx.temperature, dim=-1)
    picked = logp.gather(-1, torch.as_tensor(targets, dtype=torch.long)[..., None])[..., 0]
    return {"logits": logits.numpy(), "logprobs": picked.numpy()}


def run_parity(
    spec: Any = None,
    weights: dict[str, np.ndarray] | None = None,
    *,
    dtype: str = "float32",
    backends: list[str] | None = None,
    suites: list[str] | None = None,
    seed: int = 0,
    lengths: tuple[int, ...] = (7, 12, 3, 9),
    temperature: float = 1.0,
    num_steps: int | None = None,
    with_transformers: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> Report:
    """Run the selected suites (all by default) on the embedded tiny model or the given one.

    ``checkpoint`` is the folder ``spec`` and ``weights`` were loaded from: transformers then loads
    that folder itself, so a config field diptych drops makes the logits disagree instead of being
    re-exported away, and the report lists the fields the spec did not read.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}.")
    if spec is None:
        spec = tiny_spec("llama")
    if num_steps is not None and not is_recurrent(spec):
        raise ValueError(f"--num-steps / num_steps is the recurrence depth of recurrent-depth models "
                         f"({', '.join(RECURRENT_MODEL_TYPES)}); a {model_type_of(spec) or 'decoder'} model has a "
                         "fixed depth: drop it.")
    if weights is None:
        weights = spec.init_weights(seed)
    chosen = backends or available_backends()
    if not chosen:
        raise RuntimeError("No backend is installed: pip install 'diptych[jax]' or 'diptych[torch]'.")
    unknown = [s for s in (suites or []) if s not in SUITES]
    if unknown:
        raise ValueError(f"Unknown parity suite(s) {', '.join(unknown)}; choices: {', '.join(SUITES)}.")
    tokens, mask = left_padded_batch(spec.vocab_size, list(lengths), seed)
    ctx = Context(spec, weights, dtype, chosen, tokens, mask, temperature, num_steps, with_transformers,
                  checkpoint=None if checkpoint is None else Path(checkpoint))
    report = Report()
    if checkpoint is not None:
        report.ignored_config_fields = ignored_config_fields(checkpoint)
    for name in suites or list(SUITES):
        report.cases += SUITES[name](ctx)
    report.skipped = ctx.skipped
    return report
