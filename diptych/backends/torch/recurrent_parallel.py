"""The torch primitives of the parallel sampler (``diptych.recurrent.parallel``): every position at once."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diptych.backends.torch.recurrent_layers import (
    Context,
    RecurrentLM,
    core_step,
    initial_state,
    prelude,
    readout,
    to_model,
)
from diptych.recurrent.parallel import parallel_generate


class ParallelOps:
    """Full-buffer prelude, one core iteration, all-position readouts and latents, per-position keep."""

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
    def logits_all(self, ctx: Context, x: torch.Tensor) -> np.ndarray:
        return readout(self.model, ctx, x).cpu().numpy()

    def latents(self, x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

    def keep(self, frozen: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(to_model(self.model, frozen, torch.bool)[..., None], old, new)


def generate(model: RecurrentLM, prompts: Any, sampling: Any, **kw: Any) -> Any:
    """Parallel sampling on a torch recurrent model; see ``diptych.recurrent.parallel.parallel_generate``."""
    return parallel_generate(ParallelOps(model), prompts, sampling, **kw)
