"""The PyTorch panel: torch.nn models, torch.optim, safetensors checkpoints, Triton kernels.

``TorchBackend`` is a thin facade: each group of methods lives in the module named after its
concern (``model``, ``sampler``, ``train``, ``checkpoint``, ``recurrent``), mirrored file
for file by ``diptych.backends.jax``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diptych.core.backend import Array, Model


class TorchBackend:
    name = "torch"

    # -- boundary -------------------------------------------------------------------------
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

    # -- foundation -----------------------------------------------------------------------
    def build(self, spec: Any, weights: dict[str, np.ndarray], dtype: str = "float32", **options: Any) -> Model:
        return _impl(spec).build(spec, weights, dtype=dtype, **options)

    def export(self, model: Model) -> dict[str, np.ndarray]:
        return _impl(model).export(model)

    def forward(self, model: Model, tokens: Array, attention_mask: Array | None = None, **kw: Any) -> Array:
        return _impl(model).forward(model, tokens, attention_mask, **kw)

    def logprobs(self, model: Model, tokens: Array, attention_mask: Array | None, targets: Array,
                 temperature: float = 1.0, **kw: Any) -> Array:
        return _impl(model).logprobs(model, tokens, attention_mask, targets, temperature, **kw)

    def set_depth(self, model: Model, num_steps: int | None = None, num_grad_steps: int | None = None) -> Model:
        """Recurrent-depth models: the depth r (and backprop depth k) the next calls use."""
        from diptych.backends.torch import recurrent

        recurrent.set_depth(model, num_steps, num_grad_steps)
        return model

    # -- generation -----------------------------------------------------------------------
    def generate(self, model: Model, prompts: Any, sampling: Any, **kw: Any) -> Any:
        if _impl(model).__name__.endswith("recurrent"):
            return _impl(model).generate(model, prompts, sampling, **kw)
        from diptych.backends.torch import sampler

        return sampler.generate(model, prompts, sampling, **kw)

    # -- trainers -------------------------------------------------------------------------
    def init_train_state(self, model: Model, optim: Any, **kw: Any) -> Any:
        from diptych.backends.torch import train

        return train.init_train_state(model, optim, **kw)

    def train_step(self, state: Any, microbatches: Any, loss: Any, loss_config: Any, **kw: Any) -> Any:
        from diptych.backends.torch import train

        return train.train_step(state, microbatches, loss, loss_config, **kw)

    def export_weights(self, state: Any) -> dict[str, np.ndarray]:
        """Canonical HF-named float32 weights of a train state (the master weights)."""
        from diptych.backends.torch import train

        return train.export_weights(state)

    def gradients(self, state: Any, microbatches: Any, loss: Any, loss_config: Any, **kw: Any) -> Any:
        """The full-batch gradient (canonical names) and loss, without updating: for parity checks."""
        from diptych.backends.torch import train

        return train.gradients(state, microbatches, loss, loss_config, **kw)

    def values(self, state: Any, tokens: Any, attention_mask: Any) -> Any:
        """Value-head predictions ``[B, T-1]`` (PPO old values); needs ``init_train_state(value_head=True)``."""
        from diptych.backends.torch import train

        return train.values(state, tokens, attention_mask)

    def save(self, state: Any, path: Any, **kw: Any) -> Any:
        from diptych.backends.torch import checkpoint

        return checkpoint.save(state, path, **kw)

    def restore(self, path: Any, **kw: Any) -> Any:
        from diptych.backends.torch import checkpoint

        return checkpoint.restore(path, **kw)


def _impl(spec_or_model: Any) -> Any:
    """The module that implements a spec or model: ``recurrent`` for recurrent-depth ones, else ``model``."""
    spec = getattr(spec_or_model, "spec", spec_or_model)
    if getattr(spec, "model_type", None) == "huginn_raven":
        from diptych.backends.torch import recurrent

        return recurrent
    from diptych.backends.torch import model

    return model
