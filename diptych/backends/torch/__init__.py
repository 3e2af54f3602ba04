"""The PyTorch panel: torch.nn models, torch.optim, safetensors checkpoints, Triton kernels.

``TorchBackend`` says only how arrays cross the boundary; everything else routes to this
package's modules (``model``, ``recurrent``, ``sampler``, ``train``, ``checkpoint``), mirrored
file for file by ``diptych.backends.jax`` (see ``diptych.backends.facade``).
"""

from __future__ import annotations

import numpy as np

from diptych.backends.facade import Facade
from diptych.core.backend import Array


class TorchBackend(Facade):
    name = "torch"
    package = __name__

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

