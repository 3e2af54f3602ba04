"""Both backend classes implement every method of the Backend protocol with a compatible signature."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

from diptych.core.backend import PROTOCOL_METHODS, Backend

CLASSES = {"jax": ("diptych.backends.jax", "JaxBackend", "jax"), "torch": ("diptych.backends.torch", "TorchBackend",
                                                                             "torch")}
EXPECTED = {"to_numpy", "from_numpy", "build", "export", "forward", "logprobs", "set_depth", "generate",
            "init_train_state", "train_step", "gradients", "values", "export_weights", "apply_lora", "export_adapters",
            "merged_weights", "save", "restore"}


def incompatibilities(proto: inspect.Signature, impl: inspect.Signature) -> list[str]:
    """Why a call written against ``proto`` could fail on ``impl`` (empty when it cannot)."""
    problems = []
    params = [p for p in impl.parameters.values() if p.name != "self"]
    by_name = {p.name: p for p in params}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    proto_params = [p for p in proto.parameters.values() if p.name != "self"]
    for i, p in enumerate(x for x in proto_params if x.kind is x.POSITIONAL_OR_KEYWORD):
        if i >= len(positional) or positional[i].name != p.name:
            problems.append(f"positional parameter {i} should be {p.name!r}")
    for p in proto_params:
        q = by_name.get(p.name)
        if q is None:
            if not (p.kind is p.KEYWORD_ONLY and var_kw):
                problems.append(f"lacks parameter {p.name!r}")
            continue
        if p.default is not p.empty and q.default != p.default:
            problems.append(f"{p.name!r} defaults to {q.default!r}, not {p.default!r}")
    names = {p.name for p in proto_params}
    for q in params:
        if q.name not in names and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            problems.append(f"extra required parameter {q.name!r}")
    return problems


def test_protocol_lists_every_method_the_code_calls():
    assert set(PROTOCOL_METHODS) == EXPECTED


@pytest.mark.parametrize("backend", sorted(CLASSES))
def test_backend_class_satisfies_protocol(backend):
    module, attr, framework = CLASSES[backend]
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} not installed")
    cls = getattr(importlib.import_module(module), attr)
    bad = {}
    for name in PROTOCOL_METHODS:
        impl = getattr(cls, name, None)
        if not callable(impl):
            bad[name] = ["missing"]
            continue
        problems = incompatibilities(inspect.signature(getattr(Backend, name)), inspect.signature(impl))
        if problems:
            bad[name] = problems
    assert not bad, f"{attr} does not satisfy Backend: {bad}"
    assert isinstance(cls(), Backend)


def test_checker_rejects_an_incompatible_signature():
    def proto(self, model, tokens, attention_mask=None): ...
    def renamed(self, model, toks, attention_mask=None): ...
    def new_default(self, model, tokens, attention_mask=0): ...
    def extra_required(self, model, tokens, attention_mask=None, *, device): ...
    def fine(self, model, tokens, attention_mask=None, *, device=None, **kw): ...

    sig = inspect.signature
    assert incompatibilities(sig(proto), sig(renamed))
    assert incompatibilities(sig(proto), sig(new_default))
    assert incompatibilities(sig(proto), sig(extra_required))
    assert not incompatibilities(sig(proto), sig(fine))
