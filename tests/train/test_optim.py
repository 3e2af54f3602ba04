"""The learning-rate schedule (one numpy implementation for both backends) and OptimConfig validation."""

from __future__ import annotations

import math

import pytest

from diptych.core.config import ConfigError, from_dict
from diptych.core.optim import OptimConfig, lr_at


def test_warmup_then_cosine_hand_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = OptimConfig(lr=2.0, total_steps=10, schedule="linear")
    assert [lr_at(s, lin) for s in (0, 5, 10, 20)] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    assert lr_at(123, OptimConfig(lr=3e-4)) == 3e-4


@pytest.mark.parametrize("bad, word", [
    ({"schedule": "cosine", "total_steps": 0}, "total_steps"),
    ({"betas": (0.9, 1.5)}, "betas"),
    ({"mixed_precision": "fp16"}, "mixed_precision"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_values_name_the_field(bad, word):
    with pytest.raises(ConfigError, match=word):
        OptimConfig(**bad)


def test_typo_in_yaml_dict_suggests_closest_key():
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(OptimConfig, {"warmup_step": 3})
    assert from_dict(OptimConfig, {"betas": "0.8,0.9"}).betas == (0.8, 0.9)
