"""Tokenizers the trainers see through one protocol: a local Hugging Face folder, or a built-in char vocabulary.

The built-in :class:`CharTokenizer` exists so the toy tasks train a tiny model on a CPU in minutes with
no download: one id per printable ASCII character. :class:`HFTokenizer` reads a local ``tokenizer.json``
with the ``tokenizers`` library and renders chat templates with jinja2 configured exactly as
``transformers`` configures it, so prompts built here match ``apply_chat_template`` byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

Message = Mapping[str, Any]


@runtime_checkable
class Tokenizer(Protocol):
    """What trainers and samplers need from a tokenizer; ids are plain Python ints."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...


class CharTokenizer:
    """One id per character: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, then newline, tab and printable ASCII.

    ``vocab_size`` is 128 (ids above the last character are unused and decode to nothing) so a tiny
    model's embedding has a round size. The chat template joins message contents with nothing in
    between: task prompts stay as short as possible, which is what lets a char model learn them fast.
    """

    PAD, BOS, EOS = 0, 1, 2
    SPECIALS = ("<pad>", "<bos>", "<eos>")
    CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))

    def __init__(self) -> None:
        self.vocab_size = 128
        self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
        self._ids = {ch: i + len(self.SPECIALS) for i, ch in enumerate(self.CHARS)}
        self._chars = {i: ch for ch, i in self._ids.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            ids = [self._ids[ch] for ch in text]
        except KeyError:
            bad = sorted({ch for ch in text if ch not in self._ids})
            raise ValueError(
                f"CharTokenizer cannot encode {bad!r}: it knows only newline, tab and printable ASCII. "
                "Use an HFTokenizer for other text."
            ) from None
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.SPECIALS):
                if not skip_special_tokens:
                    out.append(self.SPECIALS[i])
            else:
                out.append(self._chars.get(i, ""))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        return "".join(str(m.get("content") or "") for m in messages)

    def __repr__(self) -> str:
        return "CharTokenizer(vocab_size=128)"


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        kind = type(messages).__name__
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {kind}.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' and 'content', got {m!r}.")


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> Any:
    """Compile ``source`` in the environment ``transformers`` uses (sandboxed, trim/lstrip blocks, its globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %} marks assistant spans; for plain rendering it is a no-op block.
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class()
    return env.from_string(source)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateDict:
    # transformers' `dict` global: building dicts in a template without exposing the dict type itself
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class() -> type:
    """transformers' ``namespace``: jinja's, refusing underscore-prefixed names (a sandbox escape route)."""
    import jinja2
    import jinja2.utils

    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _check_tools(tools: Sequence[Mapping[str, Any]] | None, documents: Sequence[Mapping[str, Any]] | None) -> None:
    if tools is not None:
        for t in tools:
            if not isinstance(t, Mapping):
                raise ValueError(f"Each tool must be a JSON-schema dict ({{'type': 'function', 'function': ...}}), "
                                 f"got {type(t).__name__}; convert functions with transformers.utils.get_json_schema.")
    if documents is not None:
        for d in documents:
            if not isinstance(d, Mapping):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")


def render_chat_template(source: str, messages: Sequence[Message], add_generation_prompt: bool = True,
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         documents: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """Render like ``transformers``: None-valued keys dropped, reasoning aliases filled, specials as variables.

    ``tools`` are JSON-schema dicts and ``documents`` dicts, passed to the template as transformers passes
    them (``tools`` stays ``None`` when not given, which templates test with ``tools is not none``).
    """
    _check_messages(messages)
    _check_tools(tools, documents)
    chat = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    return compile_chat_template(source).render(
        messages=chat, tools=None if tools is None else list(tools),
        documents=None if documents is None else list(documents), add_generation_prompt=add_generation_prompt,
        **variables,
    )


# the named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES)
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json); needs no transformers."""

    def __init__(self, backend: Any, config: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 eos_id: int | None = None) -> None:
        self._tok = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.special_tokens = {k: t for k in _SPECIAL_TOKEN_NAMES
                               if (t := _token_text(self.config.get(k))) is not None}
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"))
        eos = self._id_of(self.special_tokens.get("eos_token"))
        eos = eos if eos is not None else eos_id
        if eos is None:
            raise ValueError("Tokenizer has no eos token: set 'eos_token' in tokenizer_config.json "
                             "(or eos_token_id in generation_config.json).")
        self.eos_id = eos
        pad = self._id_of(self.special_tokens.get("pad_token"))
        self.pad_id = pad if pad is not None else eos  # the usual fallback: pads are masked anyway

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    @classmethod
    def from_folder(cls, path: str | Path) -> HFTokenizer:
        """Load a folder as saved by ``save_pretrained``; the chat template may live in any of its three homes."""
        from tokenizers import Tokenizer as _RawTokenizer

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json; save the tokenizer with a fast tokenizer "
                                    "(transformers' save_pretrained writes it).")
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (folder / "special_tokens_map.json").is_file():
            for k, v in json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")).items():
                config.setdefault(k, v)
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: transformers picks "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        eos_id = None
        gen = folder / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
            eos_id = e[0] if isinstance(e, list) else e
        return cls(_RawTokenizer.from_file(str(tj)), config, template, eos_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
        if not self.chat_template:
            raise ValueError("This tokenizer has no chat_template; add one to tokenizer_config.json "
                             "or pass plain prompts instead of messages.")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools=tools,
                                    **{**self.special_tokens, **variables})

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


BUILTIN_TOKENIZER_KEY = "diptych_tokenizer"
"""Key in a folder's ``tokenizer_config.json`` naming a built-in tokenizer (``"char"``) saved with a model."""


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer`` into a model folder so :func:`load_tokenizer` (and ``diptych sample``) reads it back.

    A saved model is useless without the vocabulary it was trained with. The built-in char tokenizer has no
    ``tokenizer.json``, so it is recorded as a small ``tokenizer_config.json`` naming it, plus the special
    tokens in Hugging Face's spelling for tools that read only those.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CharTokenizer):
        config = {BUILTIN_TOKENIZER_KEY: "char", "tokenizer_class": "DiptychCharTokenizer",
                  "vocab_size": tokenizer.vocab_size, "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out
    if isinstance(tokenizer, HFTokenizer):
        tokenizer._tok.save(str(out / "tokenizer.json"))
        config = dict(tokenizer.config)
        if tokenizer.chat_template:
            config["chat_template"] = tokenizer.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out
    raise TypeError(f"save_tokenizer knows CharTokenizer and HFTokenizer, got {type(tokenizer).__name__}.")


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """``"char"`` gives the built-in char tokenizer; anything else must be a local tokenizer folder."""
    if str(name_or_dir) == "char":
        return CharTokenizer()
    path = Path(name_or_dir)
    if path.is_dir():
        cfg_path = path / "tokenizer_config.json"
        if not (path / "tokenizer.json").is_file() and cfg_path.is_file():
            name = json.loads(cfg_path.read_text(encoding="utf-8")).get(BUILTIN_TOKENIZER_KEY)
            if name == "char":
                return CharTokenizer()
            if name is not None:
                raise ValueError(f"{cfg_path} names built-in tokenizer {name!r}; the only built-in one is 'char'.")
        return HFTokenizer.from_folder(path)
    raise FileNotFoundError(
        f"Unknown tokenizer {str(name_or_dir)!r}: use 'char' or a local folder containing tokenizer.json "
        "(diptych never downloads at run time)."
    )
