"""Rewards: the interface (``fn(prompts, completions, **columns)``), the combinator, and built-in verifiers.

``get_reward(name, **kw)`` builds a registered reward: ``math``, ``format``, ``partial_credit``,
``overlong``, ``length``, ``code``. See ``base`` for the contract.
"""

from diptych.core.rewards.answers import (
    HAS_MATH_VERIFY,
    MathReward,
    PartialCreditReward,
    extract_answer,
    math_equal,
    strip_thinking,
    to_number,
)
from diptych.core.rewards.base import (
    CombinedReward,
    RewardFn,
    RewardResult,
    available_rewards,
    get_reward,
    register_reward,
)
from diptych.core.rewards.execution import CodeReward, extract_code
from diptych.core.rewards.shaping import FormatReward, LengthReward, OverlongPenalty

__all__ = [
    "HAS_MATH_VERIFY",
    "CodeReward",
    "CombinedReward",
    "FormatReward",
    "LengthReward",
    "MathReward",
    "OverlongPenalty",
    "PartialCreditReward",
    "RewardFn",
    "RewardResult",
    "available_rewards",
    "extract_answer",
    "extract_code",
    "get_reward",
    "math_equal",
    "register_reward",
    "strip_thinking",
    "to_number",
]
