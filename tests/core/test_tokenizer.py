"""Tokenizers: char round trips, and HF folders whose chat templates render exactly as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diptych.core.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer, render_chat_template

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


# --- Real templates: Llama 3.1 Instruct and Mistral 7B Instruct v0.3, as shipped in their tokenizer_config.json ---

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TURNS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello \n"}, {"role": "user", "content": "ünïcode & <html> {\"a\": 1}"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


def _real_template_folder(tmp_path, style):
    """A tiny tokenizer with the family's special tokens and pre-tokenizer, and the family's real chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["What is 2+2? Hello Hi Be terse. Say hi. weather city Paris sunny temperature", "system user"] * 20
    if style == "llama3":
        raw = RawTokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=LLAMA3_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        specials = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        template = (TEMPLATES / "llama3_1_instruct.jinja").read_text(encoding="utf-8")
    else:
        raw = RawTokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=MISTRAL_SPECIALS)
        specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        template = (TEMPLATES / "mistral_7b_instruct_v0_3.jinja").read_text(encoding="utf-8")
    raw.train_from_iterator(corpus, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template, **specials)
    hf.save_pretrained(tmp_path)
    return hf, HFTokenizer.from_folder(tmp_path)


def _assert_same(hf, ours, conv, gen, **kw):
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
    got = ours.apply_chat_template(conv, add_generation_prompt=gen, **kw)
    assert got == want
    want_ids = hf.apply_chat_template(conv, tokenize=True, return_dict=False, add_generation_prompt=gen, **kw)
    assert ours.encode(got) == list(want_ids)
    return got


@pytest.mark.parametrize("gen", [True, False])
def test_llama31_template_renders_and_tokenizes_exactly_as_transformers(tmp_path, gen):
    hf, ours = _real_template_folder(tmp_path, "llama3")
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for conv in TURNS:
        text = _assert_same(hf, ours, conv, gen)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
        assert "Today Date: 26 Jul 2024" in text
        header = hf.convert_tokens_to_ids("<|start_header_id|>")
        assert ours.encode(text).count(header) == text.count("<|start_header_id|>")  # specials stay atomic
    # Meta's documented Llama 3.1 prompt format, written out by hand
    assert ours.apply_chat_template(TURNS[0], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    _assert_same(hf, ours, TURNS[2], gen, date_string="01 Dec 2026")
    tool_turns = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                      "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": {"temperature": 21, "sky": "sunny"}},
                  {"role": "assistant", "content": "Sunny, 21."}, {"role": "user", "content": "Thanks"}]
    text = _assert_same(hf, ours, tool_turns, gen, tools=[WEATHER_TOOL])
    assert '"name": "get_weather"' in text and "Environment: ipython" in text
    _assert_same(hf, ours, tool_turns, gen, tools=[WEATHER_TOOL], tools_in_user_message=False,
                 builtin_tools=["brave_search", "code_interpreter"])


def test_llama31_template_errors_come_from_the_template_as_in_transformers(tmp_path):
    import jinja2

    hf, ours = _real_template_folder(tmp_path, "llama3")
    only_system = [{"role": "system", "content": "s"}]
    for render in (lambda: hf.apply_chat_template(only_system, tokenize=False, tools=[WEATHER_TOOL]),
                   lambda: ours.apply_chat_template(only_system, tools=[WEATHER_TOOL])):
        with pytest.raises(jinja2.exceptions.TemplateError, match="no first user message"):
            render()
    with pytest.raises(ValueError, match="JSON-schema dict"):
        ours.apply_chat_template(TURNS[0], tools=[len])


@pytest.mark.parametrize("gen", [True, False])
def test_mistral_v03_template_renders_and_tokenizes_exactly_as_transformers(tmp_path, gen):
    hf, ours = _real_template_folder(tmp_path, "mistral")
    for conv in TURNS:
        text = _assert_same(hf, ours, conv, gen)
        assert text.startswith("<s>[INST] ")
    # Mistral's documented v3 format: no space after [/INST], the system prompt joins the last user turn,
    # and the assistant turn ends in eos
    assert ours.apply_chat_template(TURNS[0]) == "<s>[INST] What is 2+2?[/INST]"
    assert ours.apply_chat_template(TURNS[2]) == "<s>[INST] Hi[/INST] Hello</s>[INST] Be terse.\n\nünïcode & <html> " \
                                                 "{\"a\": 1}[/INST]"
    tool_turns = [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{"id": "abc123XYZ", "type": "function", "function": {
                      "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{\"temperature\": 21}"},
                  {"role": "assistant", "content": "Sunny, 21."}, {"role": "user", "content": "Thanks"}]
    text = _assert_same(hf, ours, tool_turns, gen, tools=[WEATHER_TOOL])
    assert text.count("[AVAILABLE_TOOLS]") == 1 and "[TOOL_CALLS]" in text and "[TOOL_RESULTS]" in text


def test_mistral_v03_template_refuses_what_transformers_refuses(tmp_path):
    import jinja2

    hf, ours = _real_template_folder(tmp_path, "mistral")
    bad = {"must alternate": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
           "length 9": [{"role": "user", "content": "a"},
                        {"role": "assistant", "tool_calls": [{"id": "short", "function": {"name": "f"}}]}]}
    for match, conv in bad.items():
        for render in (lambda c=conv: hf.apply_chat_template(c, tokenize=False),
                       lambda c=conv: ours.apply_chat_template(c)):
            with pytest.raises(jinja2.exceptions.TemplateError, match=match):
                render()


def test_template_globals_match_transformers_dict_namespace_and_strftime(tmp_path):
    import jinja2

    template = ("{% set d = dict(a=1, b=none) %}{{ d | tojson }}|{{ dict.fromkeys(['x'], 0) | tojson }}|"
                "{{ strftime_now('%Y') | length }}|{{ cls_token is defined }}")
    hf = _build_hf_folder(tmp_path, template)
    ours = HFTokenizer.from_folder(tmp_path)
    conv = [{"role": "user", "content": "a"}]
    assert ours.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False) == \
        '{"a": 1, "b": null}|{"x": 0}|4|False'
    sneaky = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        render_chat_template(sneaky, conv)
