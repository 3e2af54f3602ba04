"""`diptych sample` end to end on the embedded tiny model and on a checkpoint folder."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from diptych.cli import main
from diptych.core.sampling import SamplingConfig
from tests.conftest import needs_jax, needs_torch


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = main(["sample", *argv])
    out = capsys.readouterr()
    return rc, [line for line in out.out.splitlines() if line.strip()], out.err


@needs_torch
def test_greedy_cli_output_equals_backend_generate(capsys):
    from diptych.commands.sample import load_model_and_tokenizer
    from diptych.core.backend import get_backend

    rc, lines, _ = run_cli(capsys, "--backend", "torch", "--prompt", "12+3=", "--max-new-tokens", "6",
                           "--temperature", "0", "--json")
    assert rc == 0 and len(lines) == 1
    row = json.loads(lines[0])
    backend = get_backend("torch")
    model, tok = load_model_and_tokenizer(backend, None)
    ro = backend.generate(model, [tok.encode("12+3=", add_special_tokens=True)],
                          SamplingConfig(max_new_tokens=6, temperature=0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id))
    assert row["tokens"] == ro.completions()[0]
    assert row["completion"] == tok.decode(ro.completions()[0])
    assert row["prompt"] == "12+3=" and row["sample"] == 0


@needs_torch
def test_prompts_file_and_n_samples_give_contiguous_groups(capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ab"}) + "\n\n" + json.dumps("cd") + "\n")
    rc, lines, _ = run_cli(capsys, "--backend", "torch", "--prompts-file", str(f), "--n", "2",
                           "--max-new-tokens", "4", "--json", "--top-k", "5")
    assert rc == 0
    rows = [json.loads(line) for line in lines]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("ab", 0), ("ab", 1), ("cd", 0), ("cd", 1)]
    assert all(len(r["tokens"]) <= 4 for r in rows)


@needs_torch
def test_checkpoint_folder_without_tokenizer_uses_char_tokenizer(capsys, tmp_path):
    from diptych.core.hf import save_hf_folder
    from diptych.core.spec import tiny_spec

    spec = tiny_spec("qwen3")
    save_hf_folder(tmp_path / "ckpt", spec, spec.init_weights(1))
    rc, lines, err = run_cli(capsys, "--backend", "torch", "--checkpoint", str(tmp_path / "ckpt"),
                             "--prompt", "hi", "--max-new-tokens", "3")
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("[0] hi")
    assert "char tokenizer" in err


@needs_jax
def test_jax_backend_runs(capsys):
    rc, lines, _ = run_cli(capsys, "--backend", "jax", "--prompt", "x", "--max-new-tokens", "3", "--json")
    assert rc == 0 and len(json.loads(lines[0])["tokens"]) <= 3
    assert np.isfinite(json.loads(lines[0])["logprob"])


@needs_torch
@pytest.mark.parametrize("flags, msg", [(("--top-p", "0"), "top_p"), (("--temperature", "-1"), "temperature")])
def test_bad_flags_give_a_clear_error(capsys, flags, msg):
    rc, _, err = run_cli(capsys, "--backend", "torch", "--prompt", "x", *flags)
    assert rc == 2 and msg in err


def test_missing_prompts_file_is_reported(capsys, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["sample", "--backend", "torch", "--prompts-file", str(tmp_path / "nope.jsonl")])


# -- streaming and the quickstart's saved model ---------------------------------------------------
@pytest.fixture(scope="module")
def quickstart_final(tmp_path_factory):
    """A (briefly) trained quickstart model saved the way `diptych quickstart` saves it."""
    pytest.importorskip("torch")
    from tests.test_quickstart import run_tiny

    out = tmp_path_factory.mktemp("qs") / "run"
    run_tiny("torch", out)
    return out / "final"


def _json_rows(capsys, *argv: str) -> list[dict]:
    rc, lines, err = run_cli(capsys, *argv)
    assert rc == 0, err
    return [json.loads(line) for line in lines]


@needs_torch
@pytest.mark.parametrize("flags", [("--temperature", "0"), ("--temperature", "1", "--top-k", "20", "--n", "2")])
def test_streamed_output_equals_one_shot(capsys, flags):
    argv = ("--backend", "torch", "--prompt", "12+3=", "--prompt", "7+", "--max-new-tokens", "9", "--json", *flags)
    streamed = _json_rows(capsys, *argv, "--stream-tokens", "2")
    once = _json_rows(capsys, *argv, "--no-stream")
    assert [r["tokens"] for r in streamed] == [r["tokens"] for r in once]
    assert [r["completion"] for r in streamed] == [r["completion"] for r in once]
    assert [r["truncated"] for r in streamed] == [r["truncated"] for r in once]
    np.testing.assert_allclose([r["logprob"] for r in streamed], [r["logprob"] for r in once], rtol=1e-4, atol=1e-4)


def test_generate_stream_ends_where_one_generate_call_ends(backend, chunk=3):
    """Oracle: the backend's own one-shot sampler fed the same parity noise."""
    from diptych.commands.sample import generate_stream, load_model_and_tokenizer, sampling_noise
    from diptych.core.sampling import parity_noise

    model, tok = load_model_and_tokenizer(backend, None)
    ids = [tok.encode("ab", add_special_tokens=True), tok.encode("12+30=", add_special_tokens=True)]
    # 6 tokens in chunks of 3: one chunk shape, so JAX compiles the sampler twice in all (chunk, reference).
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, n=2, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    noise = sampling_noise(4, cfg, model.spec.vocab_size, seed=3)
    np.testing.assert_array_equal(noise, parity_noise(4, 6, model.spec.vocab_size, 3))
    ref = backend.generate(model, ids, cfg, noise=noise)
    updates = [[list(r.tokens) for r in rows] for rows in generate_stream(backend, model, ids, cfg, noise, 3, chunk)]
    assert len(updates) <= -(-6 // chunk)
    assert updates[-1] == ref.completions()
    for earlier, later in itertools.pairwise(updates):           # text only ever grows
        assert all(b[:len(a)] == a for a, b in zip(earlier, later))


@needs_torch
def test_live_display_ends_with_the_plain_lines(quickstart_final):
    import io

    from rich.console import Console

    from diptych.commands.sample import emit, generate_stream, load_model_and_tokenizer
    from diptych.core.backend import get_backend

    backend = get_backend("torch")
    model, tok = load_model_and_tokenizer(backend, quickstart_final)
    texts = ["1+2=", "4+4="]
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    buf = io.StringIO()
    emit(generate_stream(backend, model, ids, cfg, None, 0, 1), texts, tok, 1, False,
         live_console=Console(file=buf, force_terminal=True, width=80))
    ro = backend.generate(model, ids, cfg)
    want = [f"[{i}] {t}{tok.decode(c)}" for i, (t, c) in enumerate(zip(texts, ro.completions()))]
    screen = buf.getvalue()
    assert all(w in screen for w in want), (screen, want)


@pytest.mark.parametrize("native", [False, True])
def test_sample_on_the_quickstart_model_matches_the_python_api(backend, quickstart_final, native, capsys):
    from diptych.core.hf import load_hf_folder
    from diptych.core.tokenizer import CharTokenizer

    folder = quickstart_final / "checkpoint" if native else quickstart_final
    rc, lines, err = run_cli(capsys, "--backend", backend.name, "--checkpoint", str(folder), "--prompt", "3+4=",
                             "--temperature", "0", "--json")
    assert rc == 0 and "char tokenizer" not in err, err      # the saved tokenizer is found, not guessed
    row = json.loads(lines[0])
    spec, weights = load_hf_folder(quickstart_final)
    model, tok = backend.build(spec, weights), CharTokenizer()
    room = spec.max_position_embeddings - len(tok.encode("3+4=", add_special_tokens=True))
    ro = backend.generate(model, [tok.encode("3+4=", add_special_tokens=True)],
                          SamplingConfig(max_new_tokens=room, temperature=0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id))
    assert row["tokens"] == ro.completions()[0] and row["completion"] == tok.decode(ro.completions()[0])


@needs_torch
def test_readme_style_command_needs_no_backend_flag(quickstart_final, capsys, monkeypatch):
    monkeypatch.delenv("DIPTYCH_BACKEND", raising=False)
    rc, lines, err = run_cli(capsys, "--checkpoint", str(quickstart_final), "--prompt", "12+7=")
    assert rc == 0 and lines[0].startswith("[0] 12+7="), err


@needs_torch
def test_too_many_new_tokens_for_the_context_is_an_error(quickstart_final, capsys):
    rc, _, err = run_cli(capsys, "--backend", "torch", "--checkpoint", str(quickstart_final), "--prompt", "1+1=",
                         "--max-new-tokens", "500")
    assert rc == 2 and "lower max_new_tokens" in err


def test_saved_char_tokenizer_reads_back_and_a_bad_marker_is_named(tmp_path):
    from diptych.core.tokenizer import BUILTIN_TOKENIZER_KEY, CharTokenizer, load_tokenizer, save_tokenizer

    save_tokenizer(CharTokenizer(), tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    text = "".join(CharTokenizer.CHARS)
    assert isinstance(tok, CharTokenizer)
    assert tok.encode(text, add_special_tokens=True) == [1, *range(3, 3 + len(text))]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({BUILTIN_TOKENIZER_KEY: "bpe"}))
    with pytest.raises(ValueError, match="only built-in one is 'char'"):
        load_tokenizer(tmp_path / "m")


def test_saved_hf_tokenizer_round_trips(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from diptych.core.tokenizer import HFTokenizer, load_tokenizer, save_tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "ab": 4}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = HFTokenizer(raw, {"eos_token": "<eos>", "pad_token": "<pad>"}, chat_template="{{ messages[0].content }}")
    back = load_tokenizer(save_tokenizer(tok, tmp_path / "hf"))
    assert isinstance(back, HFTokenizer)
    assert back.encode("ab a b") == tok.encode("ab a b") == [4, 2, 3]
    assert (back.eos_id, back.pad_id) == (1, 0)
    assert back.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
