"""The training cases every distributed test runs: the same numpy arrays on every backend and mesh.

Workers (``jax_worker.py``, ``torch_worker.py``) run in their own processes, so this module imports no framework.
"""

from __future__ import annotations

from typing import Any

from diptych.core.optim import OptimConfig
from diptych.core.recurrent_spec import tiny_recurrent_spec
from diptych.core.spec import tiny_spec

STEPS = 5
ROWS = 8
"""Rows per micro-batch: divisible by every data x fsdp the tests use (1, 2, 4, 8)."""
DEPTH = (3, 2)
"""The recurrent case's (r, k): one iteration without gradient, two with (truncated backprop)."""
MESHES = ("fsdp=4", "data=2,fsdp=2", "fsdp=2,tensor=2")
LOSSES = ("sft", "dpo", "grpo")
TOL = 1e-4
"""fp32 train tolerance (DESIGN.md): relative error of the loss and of the weights after the steps."""


def spec(name: str = "sft") -> Any:
    if name == "recurrent":
        return tiny_recurrent_spec(n_embd=32, intermediate_size=64, vocab_size=64)
    # 4 heads / 2 KV heads split over tensor=2; hidden 32 over fsdp up to 8
    return tiny_spec("llama", vocab_size=64, hidden_size=32, intermediate_size=64)


def optim() -> OptimConfig:
    return OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0)


def build_options(name: str) -> dict[str, Any]:
    return {"num_steps": DEPTH[0], "num_grad_steps": DEPTH[1]} if name == "recurrent" else {}


def remat(name: str) -> str | None:
    """The ``remat`` mode a case trains with (``init_train_state(remat=...)``)."""
    return "layer" if name == "remat" else None


def case(name: str, steps: int = STEPS) -> tuple[Any, OptimConfig, str, Any, list[list[dict]]]:
    """``(spec, optim, loss, loss config, [micro-batches of each step])`` of ``name``."""
    from diptych.core.losses import PolicyLossConfig, PreferenceLossConfig, SFTLossConfig
    from tests.train import batches as B

    if name in ("sft", "recurrent", "remat"):  # remat: sft with every decoder layer recomputed in the backward
        loss, cfg, make = "sft", SFTLossConfig(), B.sft_batch
    elif name == "dpo":
        loss, cfg, make = "preference", PreferenceLossConfig(beta=0.1), B.dpo_batch
    elif name == "grpo":  # fixed rollouts: recorded sampler log-probs and advantages, KL to a reference
        loss, cfg, make = "policy", PolicyLossConfig(beta=0.04), B.grpo_batch
    else:
        raise ValueError(f"unknown case {name!r}")
    steps_mbs = [[make(seed=10 * s + j, b=ROWS) for j in range(2)] for s in range(steps)]
    return spec(name), optim(), loss, cfg, steps_mbs


PROMPTS = [[5, 9, 13, 2], [7, 7, 1], [3, 30, 12, 40, 8], [11]]


def greedy(max_new_tokens: int = 6) -> Any:
    """Greedy decoding: the tokens of a sharded model must be exactly the one-device tokens."""
    from diptych.core.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)


def rel_err(a: dict, b: dict) -> float:
    """Global relative error ||a - b|| / ||b|| over all parameters."""
    import numpy as np

    num = sum(float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
    return (num / den) ** 0.5
