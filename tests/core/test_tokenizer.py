"""Tokenizers: char round trips, and HF folders whose chat templates render exactly as transformers renders them."""

from __future__ import annotations

import json

import pytest

from diptych.core.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + message['content'] | trim + eos_token }}
    {% endif %}
{% endfor %}
"""
TOOLISH = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if not loop.last %},{% endif %}{% endfor %}|{{ ns.n }}{% if add_generation_prompt %}>{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "ünïcode & <html>"}],
]


def test_char_tokenizer_round_trips_and_fits_128_ids():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    text = "12+34=46\n\t~ !"
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < 128 and min(ids) >= 3
    assert tok.decode(ids) == text
    assert tok.encode("1", add_special_tokens=True) == [1, tok.encode("1")[0]]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 128)
    assert tok.decode([1, *ids, 2, 0]) == text
    assert tok.decode([1, *ids, 2], skip_special_tokens=False) == "<bos>" + text + "<eos>"
    assert load_tokenizer("char").encode("a") == tok.encode("a")


def test_char_tokenizer_rejects_unknown_characters_clearly():
    with pytest.raises(ValueError, match="cannot encode"):
        CharTokenizer().encode("café")


def _build_hf_folder(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["What is 2+2? Hello Hi Be terse. You are helpful.", "system user assistant INST"] * 20
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("template", [CHATML, LLAMA, TOOLISH], ids=["chatml", "llama", "namespace_tojson"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tmp_path, template, gen):
    hf = _build_hf_folder(tmp_path, template)
    ours = HFTokenizer.from_folder(tmp_path)
    convs = CONVERSATIONS if template != LLAMA else [CONVERSATIONS[0], CONVERSATIONS[1][1:]]
    if template == TOOLISH:
        convs = [*convs, [{"role": "assistant", "content": "x", "reasoning": "because", "tool_calls": None}]]
    for conv in convs:
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        got = ours.apply_chat_template(conv, add_generation_prompt=gen)
        assert got == want
    text = ours.apply_chat_template(convs[0], add_generation_prompt=gen)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False),
                                                      skip_special_tokens=True)


def test_hf_special_ids_and_template_errors(tmp_path):
    hf = _build_hf_folder(tmp_path, LLAMA)
    ours = load_tokenizer(tmp_path)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id)
    assert ours.vocab_size == len(hf)
    for text in ("What is 2+2?", "<s>Hi</s> there"):
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text)
        assert ours.decode(hf.encode(text), skip_special_tokens=False) == hf.decode(hf.encode(text))
    bad = [{"role": "assistant", "content": "no user first"}]
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ours.apply_chat_template(bad)


def test_template_in_separate_jinja_file_and_missing_pieces(tmp_path):
    _build_hf_folder(tmp_path, CHATML)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert HFTokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat_template"):
        HFTokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="char"):
        load_tokenizer("gpt2")
