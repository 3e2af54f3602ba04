"""`diptych convert`: a checkpoint moves to the other backend (and resumes there) and to a HF folder."""

from __future__ import annotations

import numpy as np
import pytest

from diptych.core import checkpointing as ckpt

from . import batches
from .helpers import mods, needs_jax, needs_torch, state

pytestmark = [needs_jax, needs_torch]


@pytest.mark.parametrize("src, dst", [("jax", "torch"), ("torch", "jax")])
def test_converted_checkpoint_resumes_on_the_other_backend(src, dst, tmp_path):
    from diptych.cli import main
    from diptych.core.losses import PolicyLossConfig
    from diptych.core.optim import OptimConfig

    cfg = PolicyLossConfig(beta=0.04)
    optim = OptimConfig(lr=3e-3, weight_decay=0.01)
    _, train_s, ck_s = mods(src)
    _, train_d, ck_d = mods(dst)
    st = state(src, batches.spec(), optim, value_head=True)
    st, _ = train_s.train_step(st, [batches.grpo_batch(seed=0, b=4)], "policy", cfg)
    ck_s.save(st, tmp_path / "a", metadata={"data_position": 1})
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", dst]) == 0
    assert ckpt.read_metadata(tmp_path / "b")["backend"] == dst
    other, meta = ck_d.restore(tmp_path / "b")
    assert meta == {"data_position": 1} and other.step == 1
    assert train_d.export_optimizer(other)["count"] == 1
    nxt = [batches.grpo_batch(seed=1, b=4)]
    st, m_src = train_s.train_step(st, nxt, "policy", cfg)
    other, m_dst = train_d.train_step(other, nxt, "policy", cfg)
    assert m_dst["loss"] == pytest.approx(m_src["loss"], rel=1e-4)
    a, b = train_s.export_weights(st), train_d.export_weights(other)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-4  # Adam moments carried over, not reset


def test_convert_to_hf_folder_loads_in_transformers(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from diptych.commands.convert import convert
    from diptych.core.optim import OptimConfig

    st = state("jax", batches.spec(), OptimConfig())
    mods("jax")[2].save(st, tmp_path / "ck", metadata={})
    convert(tmp_path / "ck", tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = batches.sft_batch(b=2)["tokens"][:, 3:]
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    model = mods("jax")[0]
    ours = np.asarray(model.forward(st.model, tokens))
    assert np.abs(ours - ref).max() <= 1e-4


def test_convert_reports_bad_source(tmp_path, capsys):
    from diptych.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "o"), "--to", "torch"]) == 2
    assert "config.json" in capsys.readouterr().err
