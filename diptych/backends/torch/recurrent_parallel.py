"""The torch primitives of the parallel sampler (``diptych.recurrent.parallel``), from the sequential
generator's: each outer step runs the prelude, one core iteration and the readout over the whole buffer (no
cache of the frozen prefix) and returns the window's part."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diptych.backends.torch.recurrent import _Ops
from diptych.backends.torch.recurrent_layers import Context, RecurrentLM, readout, to_model
from diptych.recurrent.parallel import parallel_generate


class ParallelOps(_Ops):
    """``begin`` and ``advance`` of ``diptych.recurrent.parallel`` on a torch recurrent model. The prelude is
    rerun only when the tokens or the mask changed (after the last draft most steps change nothing)."""

    def __init__(self, model: RecurrentLM) -> None:
        super().__init__(model)
        self._ctx: tuple[np.ndarray, np.ndarray, Context] | None = None

    def begin(self, rows: int, width: int) -> torch.Tensor:
        self._ctx = None
        weight = self.model.transformer.wte.weight
        return torch.zeros(rows, width, self.spec.n_embd, dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def advance(self, state: torch.Tensor, tokens: np.ndarray, mask: np.ndarray, keep: np.ndarray,
                start: np.ndarray, width: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        if self._ctx is None or not (np.array_equal(self._ctx[0], tokens) and np.array_equal(self._ctx[1], mask)):
            self._ctx = (tokens.copy(), mask.copy(), self.prelude(tokens, mask))
        ctx = self._ctx[2]
        x = torch.where(to_model(self.model, keep, torch.bool)[..., None], state, self.step(ctx, state))
        cur, prev = x.float().cpu().numpy(), state.float().cpu().numpy()
        change = np.linalg.norm(cur - prev, axis=-1) / np.maximum(np.linalg.norm(prev, axis=-1), 1e-30)
        logits = readout(self.model, ctx, x)[..., : self.spec.vocab_size].cpu().numpy()
        where = np.asarray(start)[:, None] + np.arange(width)[None]
        return x, np.take_along_axis(change, where, 1), np.take_along_axis(logits, where[..., None], 1)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Parallel sampling on a torch recurrent model; see ``diptych.recurrent.parallel.parallel_generate``."""
    return parallel_generate(ParallelOps(model), prompts, sampling, **kw)
