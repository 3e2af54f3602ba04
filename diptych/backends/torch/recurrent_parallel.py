"""The torch primitives of the parallel sampler (``diptych.recurrent.parallel``): every position at once."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diptych.backends.torch.recurrent import _Ops
from diptych.backends.torch.recurrent_layers import Context, RecurrentLM, readout, to_model
from diptych.recurrent.parallel import parallel_generate


class ParallelOps(_Ops):
    """The sequential generator's primitives (prelude, init, one core iteration) plus all-position readouts and
    latents and a per-position keep."""

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
