"""Every command of README's "After the quickstart" section runs, as written, on a (tiny) quickstart run."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from diptych import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## After the quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's 'After the quickstart' section has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


COMMANDS = readme_commands()


def test_section_lists_sample_evaluate_convert_train_and_env() -> None:
    assert all(c.startswith("diptych ") for c in COMMANDS)
    verbs = [shlex.split(c)[1] for c in COMMANDS]
    assert {"sample", "evaluate", "convert", "train", "env"} <= set(verbs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory laid out like the repository root after `diptych quickstart` (tiny settings)."""
    pytest.importorskip("torch")
    from tests.test_quickstart import run_tiny

    root = tmp_path_factory.mktemp("after")
    result = run_tiny("torch", root / "runs" / "quickstart")
    shutil.copytree(ROOT / "configs", root / "configs")
    return root, result


@pytest.fixture
def diptych(workdir, monkeypatch, capsys):
    root, _ = workdir
    monkeypatch.chdir(root)
    monkeypatch.delenv("DIPTYCH_BACKEND", raising=False)
    # Until cli.COMMANDS lists it (the lead's file), register `evaluate` the way cli.py would.
    monkeypatch.setitem(cli.COMMANDS, "evaluate", cli.COMMANDS.get(
        "evaluate", ("diptych.commands.evaluate", "held-out greedy accuracy of a checkpoint on a built-in task")))

    def run(command: str) -> str:
        argv = shlex.split(command)
        assert argv[0] == "diptych"
        rc = cli.main(argv[1:])
        out = capsys.readouterr()
        assert rc == 0, f"{command!r} exited {rc}: {out.err}"
        return out.out

    return run


def test_sample_and_evaluate_commands(workdir, diptych) -> None:
    from diptych.commands.sample import load_model_and_tokenizer
    from diptych.core.backend import get_backend
    from diptych.core.sampling import SamplingConfig

    root, result = workdir
    sample = next(c for c in COMMANDS if c.startswith("diptych sample --checkpoint runs/quickstart/final "))
    lines = [line for line in diptych(sample).splitlines() if line.strip()]
    backend = get_backend("torch")
    model, tok = load_model_and_tokenizer(backend, root / "runs" / "quickstart" / "final")
    prompts = [a for flag, a in zip(shlex.split(sample), shlex.split(sample)[1:]) if flag == "--prompt"]
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    room = model.spec.max_position_embeddings - max(map(len, ids))
    ro = backend.generate(model, ids, SamplingConfig(max_new_tokens=room, temperature=0, eos_ids=(tok.eos_id,),
                                                     pad_id=tok.pad_id))
    assert lines == [f"[{i}] {p}{tok.decode(c)}" for i, (p, c) in enumerate(zip(prompts, ro.completions()))]

    evaluate = next(c for c in COMMANDS if c.startswith("diptych evaluate"))
    out = diptych(evaluate)
    assert f": {result['accuracy_after']:.1%} (recorded when saved: {result['accuracy_after']:.1%})" in out


@pytest.mark.slow
def test_every_command_in_order(workdir, diptych) -> None:
    root, _ = workdir
    outputs = {c: diptych(c) for c in COMMANDS}
    convert = next(c for c in COMMANDS if c.startswith("diptych convert"))
    dst = Path(shlex.split(convert)[3])
    assert json.loads((root / dst / "diptych.json").read_text())["backend"] == shlex.split(convert)[-1]
    jax_sample = next(c for c in COMMANDS if "--backend jax" in c and c.startswith("diptych sample"))
    torch_sample = next(c for c in COMMANDS if c.startswith("diptych sample --checkpoint runs/quickstart/final "))
    assert outputs[jax_sample].splitlines()[0] == outputs[torch_sample].splitlines()[0]   # same model, other panel
    train = next(c for c in COMMANDS if c.startswith("diptych train"))
    out_dir = root / next(a.split("=", 1)[1] for a in shlex.split(train) if a.startswith("out="))
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 20
    env_out = outputs[next(c for c in COMMANDS if c.startswith("diptych env"))]
    assert env_out.startswith("```text") and "torch:" in env_out
