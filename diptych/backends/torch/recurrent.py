"""Recurrent-depth (Huginn) models in torch: prelude -> core block r times -> coda.

Module names equal Huginn's checkpoint names (``transformer.core_block.0.attn.Wqkv`` ...), so
``state_dict()`` is the canonical weight dict. The training forward runs the first r - k
iterations under ``torch.no_grad`` and the last k with gradient, each rematerialised with
``torch.utils.checkpoint``, so activation memory grows with k, not r. Mirrors
``diptych.backends.jax.recurrent`` function for function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from diptych.backends.torch.recurrent_cache import Decoder
from diptych.backends.torch.recurrent_layers import (  # noqa: F401  (re-exported: tests and benchmarks use them)
    _NEG,
    Attention,
    Context,
    GatedMLP,
    RecurrentLM,
    RMSNorm,
    SandwichBlock,
    _attend,
    _rope,
    _rope_tables,
    core_step,
    final_hidden,
    initial_state,
    model_device,
    prelude,
    readout,
    to_model,
)
from diptych.core.recurrent_spec import RecurrentSpec
from diptych.core.spec import SpecError
from diptych.core.train_step import PerIteration
from diptych.recurrent.generate import generate as neutral_generate
from diptych.recurrent.inputs import (
    call_depth,
    check_dtype,
    check_logprob_arguments,
    reject_arguments,
    reject_build_options,
    split_steps,
)


# -- public API (the facade calls these) ------------------------------------------------------
def build(spec: RecurrentSpec, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> RecurrentLM:
    check_dtype(dtype)
    spec.validate_weights(weights)
    model = RecurrentLM(spec)
    state = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise SpecError(f"Weights do not fit the recurrent model: missing {missing}, unexpected {unexpected}.")
    device = options.pop("device", None) or "cpu"  # every entry point moves its inputs to this device
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.dtype_name = dtype
    set_depth(model, options.pop("num_steps", None), options.pop("num_grad_steps", None))
    reject_build_options(options)
    return model


def set_depth(model: RecurrentLM, num_steps: int | None = None, num_grad_steps: int | None = None) -> None:
    """The depth used when a call passes none: how a depth-unaware trainer runs a recurrent model.

    ``num_grad_steps`` set means truncated backprop; a trainer following a ``DepthSchedule``
    calls this once per step with ``draw.num_steps, draw.n_grad``.
    """
    split_steps(model.spec, num_steps, num_grad_steps)  # validate now, not at first use
    model.depth = (num_steps, num_grad_steps)


def export(model: RecurrentLM) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy().copy() for k, v in model.state_dict().items()}


_split_steps = split_steps  # the old private name


def _iterate(model: RecurrentLM, ctx: Context, x: torch.Tensor, n_no_grad: int, n_grad: int,
             remat: bool) -> torch.Tensor:
    """r - k iterations with no tape, then k differentiable ones (each rematerialised when ``remat``)."""
    with torch.no_grad():
        e_const = ctx.e.detach()
        for _ in range(n_no_grad):
            x = core_step(model, ctx, x, e_const)
    x = x.detach() if n_no_grad else x
    use_ckpt = remat and torch.is_grad_enabled()
    for _ in range(n_grad):
        if use_ckpt:
            x = checkpoint(core_step, model, ctx, x, ctx.e, use_reentrant=False)
        else:
            x = core_step(model, ctx, x)
    return x


def latent_forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                   num_grad_steps: int | None = None, init_state: Any = None, remat: bool = True):
    """(logits, final latent state): the r - k no-grad iterations, then k checkpointed ones."""
    n_no_grad, n_grad, truncated = call_depth(model, num_steps, num_grad_steps)
    ctx = prelude(model, tokens, attention_mask)
    x = _iterate(model, ctx, initial_state(model, ctx, init_state), n_no_grad, n_grad, remat and truncated)
    return readout(model, ctx, x), x


def forward(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
            init_state: Any = None, num_grad_steps: int | None = None, **kw: Any) -> torch.Tensor:
    """Logits [B, T, V] float32 after ``num_steps`` iterations (default: the spec's mean recurrence).

    Differentiable through every iteration unless ``num_grad_steps`` truncates it.
    """
    _reject(kw)
    return latent_forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def forward_train(model: RecurrentLM, tokens: Any, mask: Any, *, num_steps: int, num_grad_steps: int,
                  init_state: Any = None) -> torch.Tensor:
    """Truncated-backprop logits: gradient flows through the last ``num_grad_steps`` iterations only."""
    return latent_forward(model, tokens, mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                          init_state=init_state)[0]


def hidden_states(model: RecurrentLM, tokens: Any, attention_mask: Any = None, *, num_steps: Any = None,
                  num_grad_steps: int | None = None, init_state: Any = None, **kw: Any) -> torch.Tensor:
    """[B, T, H] after the final norm (the decoder API's seam for fused log-prob kernels)."""
    _reject(kw)
    n_no_grad, n_grad, truncated = call_depth(model, num_steps, num_grad_steps)
    ctx = prelude(model, tokens, attention_mask)
    x = _iterate(model, ctx, initial_state(model, ctx, init_state), n_no_grad, n_grad, truncated)
    return final_hidden(model, ctx, x)


def lm_head_weight(model: RecurrentLM) -> torch.Tensor:
    """[V, H]: the embedding when tied."""
    return model.head_weight()


def logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0, *,
             num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
             **kw: Any) -> torch.Tensor:
    """``log_softmax(logits / temperature)[targets]`` [B, T] float32 over the full vocabulary.

    Targets wrapped in ``diptych.core.train_step.PerIteration`` give :func:`iteration_logprobs` instead."""
    if isinstance(targets, PerIteration):
        return iteration_logprobs(model, tokens, attention_mask, targets.targets, temperature, num_steps=num_steps,
                                  num_grad_steps=num_grad_steps, init_state=init_state, **kw)
    check_logprob_arguments(temperature, kw)
    logits = forward(model, tokens, attention_mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                     init_state=init_state)
    targets = to_model(model, targets, torch.long)
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, targets[..., None]).squeeze(-1)


def iteration_logprobs(model: RecurrentLM, tokens: Any, attention_mask: Any, targets: Any, temperature: float = 1.0,
                       *, num_steps: Any = None, num_grad_steps: int | None = None, init_state: Any = None,
                       **kw: Any) -> torch.Tensor:
    """[B, k, T] float32 target log-probs of each of the k differentiated iterations (oldest first), each state
    decoded through the coda and head (the trajectory loss's output). Memory stays bounded: each readout goes
    through the chunked selective log-prob kernel and, under gradient, is rematerialised like the core steps."""
    from diptych.backends.torch import kernels as kernels_mod
    from diptych.backends.torch.model import LOGPROB_CHUNK_TOKENS

    check_logprob_arguments(temperature, kw)
    n_no_grad, n_grad, _ = call_depth(model, num_steps, num_grad_steps)
    ctx = prelude(model, tokens, attention_mask)
    x = _iterate(model, ctx, initial_state(model, ctx, init_state), n_no_grad, 0, False)
    y = to_model(model, targets, torch.long)
    use_ckpt = torch.is_grad_enabled()

    def readout_lp(x: torch.Tensor) -> torch.Tensor:
        h = final_hidden(model, ctx, x)
        lp, _ = kernels_mod.selective_logprobs(h, model.head_weight(), y, temperature,
                                               kernels=getattr(model, "kernels", "auto"),
                                               chunk_size=LOGPROB_CHUNK_TOKENS)
        return lp

    out = []
    for _ in range(n_grad):
        x = checkpoint(core_step, model, ctx, x, ctx.e, use_reentrant=False) if use_ckpt else core_step(model, ctx, x)
        out.append(checkpoint(readout_lp, x, use_reentrant=False) if use_ckpt else readout_lp(x))
    return torch.stack(out, dim=1)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Fixed- or adaptive-depth generation; see ``diptych.recurrent.generate``."""
    return neutral_generate(_Ops(model), prompts, sampling, **kw)


class _Ops:
    """The few primitives the backend-neutral generation loop needs, on numpy at the boundary."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model, self.spec = model, model.spec

    @torch.no_grad()
    def prelude(self, tokens: np.ndarray, mask: np.ndarray) -> Context:
        return prelude(self.model, tokens, mask)

    @torch.no_grad()
    def init(self, ctx: Context, init_state: np.ndarray | None) -> torch.Tensor:
        return initial_state(self.model, ctx, init_state)

    @torch.no_grad()
    def step(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:
        return core_step(self.model, ctx, x)

    @torch.no_grad()
    def logits_last(self, ctx: Context, x: torch.Tensor) -> np.ndarray:
        return readout(self.model, ctx, x)[:, -1].cpu().numpy()

    def latent_last(self, x: torch.Tensor) -> np.ndarray:
        return x[:, -1].float().cpu().numpy()

    def warm(self, x: torch.Tensor, prev_final: torch.Tensor) -> torch.Tensor:
        """Continuous CoT: every position restarts from its last final state, the new one from its left neighbour."""
        return torch.cat([prev_final, prev_final[:, -1:]], dim=1)[:, -x.shape[1]:]

    def select(self, keep: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(to_model(self.model, keep, torch.bool)[:, None, None], old, new)

    def decoder(self, rows: int, capacity: int, steps: int) -> Any:
        """The KV-cached decode primitives (``diptych.backends.torch.recurrent_cache.Decoder``)."""
        return Decoder(self.model, rows, capacity, steps)


_reject = reject_arguments


# -- a minimal truncated-backprop trainer (used by diptych.recipes; the trainers issue owns the general one)
class TruncatedTrainer:
    """AdamW on masked next-token NLL with truncated backprop; ``step`` returns the loss as a float."""

    def __init__(self, model: RecurrentLM, lr: float = 1e-3, weight_decay: float = 0.0, clip: float = 1.0) -> None:
        self.model, self.clip = model, clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    def step(self, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
             num_steps: int, num_grad_steps: int, init_state: np.ndarray | None = None) -> float:
        logits = forward_train(self.model, tokens, mask, num_steps=num_steps, num_grad_steps=num_grad_steps,
                               init_state=init_state)
        lp = torch.log_softmax(logits, -1).gather(-1, to_model(self.model, targets, torch.long)[..., None])[..., 0]
        w = to_model(self.model, weights, torch.float32)
        loss = -(lp * w).sum() / w.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss.detach())


def loss_grads(model: RecurrentLM, tokens: Any, mask: Any, targets: Any, weights: Any, *, num_steps: Any,
               num_grad_steps: int | None = None, init_state: Any = None) -> tuple[float, dict[str, np.ndarray]]:
    """``sum(weights * logprobs[targets])`` and its gradient per canonical name (parity and tests)."""
    model.zero_grad(set_to_none=True)
    lp = logprobs(model, tokens, mask, targets, num_steps=num_steps, num_grad_steps=num_grad_steps,
                  init_state=init_state)
    loss = (lp * to_model(model, weights, torch.float32)).sum()
    loss.backward()
    grads = {n: (p.grad.float().cpu().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads
