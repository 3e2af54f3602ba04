"""One table of model types: the Python API, the CLI and the error messages list the same ones."""

from __future__ import annotations

import argparse
import re

import pytest

from diptych.core import hf, model_types
from diptych.core.model_types import MODEL_TYPES, is_recurrent, supported_model_types
from diptych.core.recurrent_spec import RecurrentSpec, tiny_recurrent_spec
from diptych.core.spec import DecoderSpec, SpecError, tiny_spec

# the docs' list; adding a family updates this line
EXPECTED = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "huginn_raven")


def _choices(add_arguments, dest: str) -> list[str]:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return next(a.choices for a in p._actions if a.dest == dest)


def test_the_table_is_what_the_docs_list():
    assert supported_model_types() == EXPECTED
    assert model_types.RECURRENT_MODEL_TYPES == ("huginn_raven",)
    assert model_types.DECODER_MODEL_TYPES == ("llama", "qwen2", "qwen3", "mistral", "smollm3")


def test_parity_cli_offers_every_supported_type_and_every_backend():
    from diptych.core.backend import backend_names
    from diptych.parity.cli import add_arguments

    assert tuple(_choices(add_arguments, "model_type")) == supported_model_types()
    assert _choices(add_arguments, "backend") == backend_names()


def test_hf_dispatch_covers_the_table_with_the_right_spec_class():
    assert tuple(hf.SPEC_FROM_CONFIG) == supported_model_types()
    for name in supported_model_types():
        spec = hf.tiny_spec_for(name)
        assert spec.model_type == name and is_recurrent(spec) == MODEL_TYPES[name].recurrent
        assert isinstance(spec, RecurrentSpec if MODEL_TYPES[name].recurrent else DecoderSpec)
        back = hf.spec_from_config(spec.to_hf_config())  # round trip through the dispatch
        assert back == spec and back.to_hf_config()["architectures"] == [MODEL_TYPES[name].architecture]


def _listed(message: str) -> tuple[str, ...]:
    """The comma-separated model types an error message lists after 'supports' / 'supported:'."""
    tail = re.search(r"(?:supported:|supports) ([a-z0-9_, ]+)", message).group(1)
    return tuple(t.strip() for t in tail.split(",") if t.strip())


def test_error_messages_list_the_table():
    with pytest.raises(SpecError) as e:
        hf.spec_from_config({"model_type": "gpt2"})
    assert "'gpt2'" in str(e.value) and _listed(str(e.value)) == supported_model_types()
    with pytest.raises(SpecError) as e:
        DecoderSpec.from_hf_config({"model_type": "gpt2"})
    assert _listed(str(e.value)) == supported_model_types()
    with pytest.raises(SpecError) as e:
        DecoderSpec(model_type="huginn_raven")
    assert "RecurrentSpec" in str(e.value) and _listed(str(e.value)) == supported_model_types()
    listed = "llama, qwen2, qwen3, mistral, smollm3, huginn_raven"
    with pytest.raises(SpecError, match=f"Unknown model_type 'gpt2'; supported: {listed}"):
        hf.tiny_spec_for("gpt2")


def test_is_recurrent_reads_the_table():
    assert is_recurrent(tiny_recurrent_spec()) and not is_recurrent(tiny_spec("qwen3"))
    assert not is_recurrent(object())

    class Carrier:
        spec = tiny_recurrent_spec()

    assert is_recurrent(Carrier())
