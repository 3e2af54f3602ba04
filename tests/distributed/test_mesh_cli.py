"""``--mesh`` on ``diptych train`` and ``mesh`` in the trainer configs: parsed, checked, refused before training."""

from __future__ import annotations

import pytest

from diptych.cli import main
from diptych.commands.train import RUN_CONFIGS
from diptych.core.config import load_config
from diptych.core.mesh import MeshConfig
from tests.train.helpers import needs_jax

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.n_train=16",
        "data.n_test=4", "sft.steps=1", "sft.batch_size=4"]


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo", "ppo"])
def test_every_trainer_config_has_a_mesh_and_remat(trainer):
    cfg = load_config(RUN_CONFIGS[trainer], None, [f"{trainer}.mesh.fsdp=4", f"{trainer}.mesh.tensor=2",
                                                   f"{trainer}.remat=layer"])
    section = getattr(cfg, trainer)
    assert section.mesh == MeshConfig(fsdp=4, tensor=2) and section.remat == "layer"
    assert getattr(load_config(RUN_CONFIGS[trainer], None, []), trainer).mesh is None


@needs_jax
def test_a_mesh_larger_than_the_devices_is_refused_before_training(tmp_path, capsys):
    code = main(["train", "sft", "--backend", "jax", "--quiet", "--mesh", "fsdp=3", f"out={tmp_path / 'run'}",
                 *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "Mesh data=1,fsdp=3,tensor=1 has 3 devices but the run has 1 devices" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_bad_mesh_option_names_the_axes(tmp_path, capsys):
    code = main(["train", "sft", "--backend", "jax", "--quiet", "--mesh", "pipeline=2", f"out={tmp_path}", *TINY])
    assert code == 2
    assert "axis one of data, fsdp, tensor" in capsys.readouterr().err
