"""Backend selection: explicit argument, then DIPTYCH_BACKEND, then a clear error."""

from __future__ import annotations

import pytest
from conftest import needs_torch

from diptych.core import backend as B


def test_unknown_backend_names_the_choices():
    with pytest.raises(B.BackendError, match=r"Unknown backend 'tensorflow'; choices: jax, torch"):
        B.get_backend("tensorflow")


def test_no_backend_chosen_is_an_error(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    with pytest.raises(B.BackendError, match="No backend chosen"):
        B.get_backend(None)


@needs_torch
def test_env_var_is_used_and_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "torch")
    assert B.get_backend().name == "torch"
    monkeypatch.setenv(B.ENV_VAR, "nonsense")
    assert B.get_backend("torch").name == "torch"


def test_missing_framework_names_the_extra(monkeypatch):
    B.register_backend("fake", "diptych_fake_backend", "Fake", ("surely_not_installed_pkg",), "fake")
    try:
        with pytest.raises(B.BackendError, match=r"pip install 'diptych\[fake\]'"):
            B.get_backend("fake")
        assert "fake" not in B.available_backends()
    finally:
        B._REGISTRY.pop("fake")
