"""Advantage estimators (numpy): group baselines for GRPO-style training, GAE for PPO.

Outcome estimators take one scalar reward per completion, ``rewards [N]`` ordered group by group
(the ``group_size`` completions of a prompt are contiguous), and return one advantage per
completion, which the policy loss broadcasts over the completion's tokens. With ``mu_g`` and
``sigma_g`` the mean and std of a completion's group:

* ``grpo``  (Shao et al. 2024): ``(r - mu_g) / (sigma + eps)``. ``scale="group"`` uses ``sigma_g``,
  ``scale="batch"`` the std of all N rewards (Lite PPO, Liu et al. 2025), ``scale="none"`` no division.
  Std convention: Bessel-corrected (``ddof=1``, as TRL and verl) and ``eps=1e-6`` (verl, Tunix); TRL
  adds 1e-4. So a group [0, 0, 0, 1] has mean 0.25, std 0.5 and advantages [-0.5, -0.5, -0.5, 1.5].
* ``dr_grpo`` (Liu et al. 2025): ``r - mu_g``; no std division, which biased GRPO towards
  groups of near-uniform reward.
* ``rloo``  (Kool et al. 2019; Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j = G/(G-1) (r_i - mu_g)``.
* ``reinforce_pp`` (REINFORCE++, Hu 2025): returns whitened over the whole batch,
  ``(r - mu_B) / (sigma_B + eps)``; ``baseline="group"`` subtracts ``mu_g`` first (REINFORCE++-baseline).
* ``gae``   (Schulman et al. 2016): per-token, see ``gae``.

A group whose rewards are all equal carries no learning signal (all advantages 0 under any group
baseline); ``filter_zero_variance_groups`` finds them for DAPO's dynamic sampling (Yu et al. 2025).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.core.losses.policy import kl_estimate

AdvantageFn = Callable[..., np.ndarray]
ADVANTAGES: dict[str, AdvantageFn] = {}
"""Name -> estimator function (kept for callers that index it directly)."""


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and its contract: what a trainer must hand it and which options it takes.

    ``needs`` names the inputs beyond ``rewards``: ``"groups"`` (contiguous groups of ``group_size``
    completions per prompt), ``"values"`` and ``"mask"`` (a critic's per-token values, PPO). ``options``
    are its keyword-only knobs (``scale``, ``baseline``, ...), read from the function's signature, so a
    config can refuse an option the estimator would not use instead of ignoring it.
    """

    name: str
    fn: AdvantageFn
    needs: tuple[str, ...]
    options: tuple[str, ...]


ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, needs: tuple[str, ...] = ("groups",)) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator adding an outcome-advantage estimator ``fn(rewards [N], group_size, **kw)`` under ``name``."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise KeyError(f"An advantage estimator named {name!r} is already registered.")
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in needs)
        ADVANTAGES[name] = fn
        ESTIMATORS[name] = AdvantageEstimator(name, fn, tuple(needs), options)
        return fn

    return deco


def get_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; an unknown name lists the choices."""
    if name not in ESTIMATORS:
        raise KeyError(f"Unknown advantage estimator {name!r}; registered: {', '.join(sorted(ESTIMATORS))}.")
    return ESTIMATORS[name]


def _groups(rewards: Any, group_size: int) -> np.ndarray:
    """Rewards as a float64 ``[N / G, G]`` array, after checking what commonly goes wrong."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one scalar per completion, shape [N]; got shape {r.shape}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
    if r.size == 0:
        raise ValueError("rewards is empty: there is nothing to compute advantages for.")
    if r.size % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the number of rewards {r.size}: pass the completions "
            f"of each prompt contiguously, group_size per prompt (got {r.size / group_size:.2f} groups)."
        )
    if not np.all(np.isfinite(r)):
        bad = np.flatnonzero(~np.isfinite(r))[:8].tolist()
        raise ValueError(f"rewards contain NaN or inf at indices {bad}; fix the reward function.")
    return r.reshape(-1, group_size)


def _std(x: np.ndarray, ddof: int, axis: int | None, what: str) -> np.ndarray:
    n = x.size if axis is None else x.shape[axis]
    if n - ddof <= 0:
        raise ValueError(f"{what} std with ddof={ddof} needs more than {ddof} value(s), got {n}; use scale='none'.")
    return np.std(x, axis=axis, ddof=ddof, keepdims=axis is not None)


@register_advantage("grpo")
def grpo_advantages(
    rewards: Any, group_size: int, *, scale: str = "group", eps: float = 1e-6, ddof: int = 1
) -> np.ndarray:
    """Group z-score; see the module docstring for the std convention."""
    g = _groups(rewards, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (_std(g, ddof, 1, "group") + eps)
    elif scale == "batch":
        centred = centred / (_std(g, ddof, None, "batch") + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}.")
    return centred.reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Any, group_size: int) -> np.ndarray:
    """Group mean-centred rewards, no std division (Dr.GRPO)."""
    g = _groups(rewards, group_size)
    return (g - g.mean(axis=1, keepdims=True)).reshape(-1)


@register_advantage("rloo")
def rloo_advantages(rewards: Any, group_size: int) -> np.ndarray:
    """Reward minus the mean of the other G-1 rewards of the group."""
    g = _groups(rewards, group_size)
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2: the leave-one-out baseline averages the other completions.")
    loo_mean = (g.sum(axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - loo_mean).reshape(-1)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    rewards: Any, group_size: int = 1, *, baseline: str = "none", eps: float = 1e-6, ddof: int = 1
) -> np.ndarray:
    """Batch-whitened returns (REINFORCE++); ``baseline="group"`` centres within groups first."""
    g = _groups(rewards, group_size)
    if baseline == "group":
        g = g - g.mean(axis=1, keepdims=True)
    elif baseline != "none":
        raise ValueError(f"baseline must be 'none' or 'group', got {baseline!r}.")
    flat = g.reshape(-1)
    return (flat - flat.mean()) / (_std(flat, ddof, None, "batch") + eps)


def _token_arrays(rewards: Any, values: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(rewards, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    m = np.ones_like(r) if mask is None else np.asarray(mask, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"gae rewards must be per-token [batch, time], got shape {r.shape}.")
    for name, x in (("values", v), ("mask", m)):
        if x.shape != r.shape:
            raise ValueError(f"gae {name} has shape {x.shape}, expected {r.shape} (the shape of rewards).")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(v))):
        raise ValueError("gae rewards or values contain NaN or inf.")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("gae mask must hold only 0 and 1.")
    return r, v, m


def whiten(x: Any, mask: Any = None, *, eps: float = 1e-8, shift_mean: bool = True) -> np.ndarray:
    """``(x - mean) / (std + eps)`` over the masked entries (Bessel-corrected std); padding stays 0."""
    x = np.asarray(x, dtype=np.float64)
    m = np.ones_like(x) if mask is None else np.asarray(mask, dtype=np.float64)
    n = m.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked entries, got {int(n)}.")
    mean = (x * m).sum() / n
    std = np.sqrt((((x - mean) ** 2) * m).sum() / (n - 1))
    out = (x - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(
    rewards: Any,
    values: Any,
    mask: Any = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    whiten_advantages: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016) over per-token rewards and values.

    ``delta_t = r_t + gamma V_{t'} - V_t`` and ``A_t = delta_t + gamma lam A_{t'}``, where ``t'`` is the
    next position with ``mask = 1`` (padding is skipped, so left and right padding both work) and the
    value after the last valid token is 0 (the episode ends). Returns ``(advantages, returns)`` with
    ``returns = A + V`` computed before the optional whitening, and zeros on padding.
    """
    r, v, m = _token_arrays(rewards, values, mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}.")
    B, T = r.shape
    adv = np.zeros_like(r)
    next_value = np.zeros(B)
    next_adv = np.zeros(B)
    for t in range(T - 1, -1, -1):
        valid = m[:, t] > 0
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = np.where(valid, a, 0.0)
        next_value = np.where(valid, v[:, t], next_value)
        next_adv = np.where(valid, a, next_adv)
    returns = (adv + v) * m
    if whiten_advantages:
        adv = whiten(adv, m)
    return adv, returns


def kl_shaped_rewards(
    rewards: Any, logprobs: Any, ref_logprobs: Any, mask: Any, kl_coef: float, estimator: str = "k1"
) -> np.ndarray:
    """Per-token rewards for PPO: ``-kl_coef * KL_t`` on every token plus the sequence reward on its last token.

    This is the KL-in-reward shaping of InstructGPT (Ouyang et al. 2022) and TRL's PPO, with the
    k1 estimator ``logp - logp_ref`` by default (unbiased in expectation; the estimators are those of
    ``diptych.core.losses.kl_estimate``). Feed the result to ``gae``.
    """
    lp, ref, m = (np.asarray(a, dtype=np.float64) for a in (logprobs, ref_logprobs, mask))
    r = np.asarray(rewards, dtype=np.float64)
    if lp.ndim != 2 or ref.shape != lp.shape or m.shape != lp.shape:
        raise ValueError(f"logprobs, ref_logprobs and mask must share one [batch, time] shape; got "
                         f"{lp.shape}, {ref.shape}, {m.shape}.")
    if r.shape != (lp.shape[0],):
        raise ValueError(f"rewards must be one per sequence, shape [{lp.shape[0]}], got {r.shape}.")
    if np.any(m.sum(axis=1) == 0):
        raise ValueError("a sequence has an empty mask: its reward has no token to land on.")
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown KL estimator {estimator!r}; choose k1, k2 or k3.")
    kl = kl_estimate(np.where(m > 0, lp, 0.0), np.where(m > 0, ref, 0.0), estimator)
    out = -kl_coef * np.asarray(kl) * m
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1] > 0, axis=1)
    out[np.arange(m.shape[0]), last] += r
    return out


@register_advantage("gae", needs=("values", "mask"))
def _gae_advantages(
    rewards: Any, group_size: int = 1, *, values: Any, mask: Any = None, gamma: float = 1.0, lam: float = 0.95,
    whiten_advantages: bool = False,
) -> np.ndarray:
    """``gae`` through the registry: per-token ``rewards`` [B, T]; returns the advantages only."""
    return gae(rewards, values, mask, gamma, lam, whiten_advantages=whiten_advantages)[0]


def compute_advantages(name: str, rewards: Any, group_size: int, **kw: Any) -> np.ndarray:
    """Advantages from the estimator registered as ``name`` (``grpo``, ``dr_grpo``, ``rloo``,
    ``reinforce_pp``, ``gae``), as float32 for the trainer; an option it does not take is refused."""
    est = get_estimator(name)
    unknown = sorted(set(kw) - set(est.options) - {n for n in est.needs if n != "groups"})
    if unknown:
        takes = ", ".join(est.options) or "no options"
        raise ValueError(f"Advantage estimator {name!r} takes {takes}; it does not use {', '.join(unknown)}.")
    return est.fn(rewards, group_size, **kw).astype(np.float32)


def filter_zero_variance_groups(rewards: Any, group_size: int, *, atol: float = 0.0) -> tuple[np.ndarray, int]:
    """DAPO dynamic sampling: ``keep_mask [N]`` (False for every completion of a group whose rewards
    span at most ``atol``) and the number of groups dropped. Use the mask to drop the rows, or to zero
    their loss mask with ``allow_empty_sequences=True``."""
    g = _groups(rewards, group_size)
    flat = np.ptp(g, axis=1) <= atol
    keep = np.repeat(~flat, group_size)
    return keep, int(flat.sum())
