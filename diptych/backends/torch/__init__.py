"""The PyTorch panel: torch.nn models, torch.optim, safetensors checkpoints, Triton kernels.

``TorchBackend`` says only how arrays cross the boundary; everything else routes to this
package's modules (``model``, ``recurrent``, ``sampler``, ``train``, ``checkpoint``), mirrored
file for file by ``diptych.backends.jax`` (see ``diptych.backends.facade``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diptych.backends.facade import Facade
from diptych.core.backend import Array, Model, TrainState
from diptych.core.optim import OptimConfig


class TorchBackend(Facade):
    name = "torch"
    package = __name__

    def init_train_state(self, model: Model, optim: OptimConfig, *, value_head: bool = False, seed: int = 0,
                         **kw: Any) -> TrainState:
        """Wrap ``model`` for training; with ``mesh`` it is sharded over the torchrun job first (``distributed``
        builds on ``train``, so the route goes through it rather than ``train`` importing it)."""
        return self._module("distributed").init_train_state(model, optim, value_head=value_head, seed=seed, **kw)

    def to_numpy(self, x: Array) -> np.ndarray:
        import torch

        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Array:
        import torch

        t = torch.as_tensor(np.asarray(a))
        return t if dtype is None else t.to(getattr(torch, dtype))

