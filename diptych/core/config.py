"""Typed dataclass configs: built from dicts, YAML and ``key=value`` flags, with clear errors.

Every config in diptych is a dataclass. ``from_dict`` refuses unknown keys and names the
closest valid one (a typo must never be a silently ignored setting), coerces scalars to the
annotated type, and recurses into nested dataclass fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that is wrong, with what to do about it."""


ALIASES: dict[str, str] = {
    "learning_rate": "lr", "lr_rate": "lr", "learn_rate": "lr", "adam_beta1": "betas", "adam_beta2": "betas",
    "adam_epsilon": "eps", "lr_scheduler_type": "schedule", "warmup": "warmup_steps", "max_steps": "steps",
    "num_steps": "steps", "gradient_accumulation_steps": "micro_batches", "per_device_train_batch_size": "batch_size",
    "max_new_tokens": "max_completion_length", "max_length": "max_completion_length", "kl_coef": "beta",
    "clip_grad_norm": "max_grad_norm", "group_size": "num_generations", "random_seed": "seed",
}
"""Other tools' names for diptych's keys (HF Trainer, TRL, common spellings): a typo of one of them suggests the
diptych key (``lerning_rate`` -> ``lr``), which string similarity alone would not find."""


def _closest(key: str, valid: list[str]) -> str:
    """The did-you-mean of an unknown key: a known alias (or a near-typo of one), a near-typo of a valid key,
    or a valid key that contains the typed one or is contained in it."""
    low = key.lower()
    alias = ALIASES.get(low) or next((ALIASES[m] for m in difflib.get_close_matches(low, list(ALIASES), n=3,
                                                                                   cutoff=0.8)
                                      if ALIASES[m] in valid), None)
    if alias in valid:
        return f" Did you mean {alias!r}?"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:
        match = [v for v in sorted(valid, key=len) if len(v) >= 3 and len(low) >= 3 and (v in low or low in v)][:1]
    return f" Did you mean {match[0]!r}?" if match else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple) and isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # as in YAML and Hydra: "[a, b]" or "['a', 'b']"
            value = [v.strip().strip("'\"") for v in text[1:-1].split(",")]
        else:  # "a,b": items kept as written (a stop sequence may start or end with a space)
            value = value.split(",")
        value = [v for v in value if v]
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        seq = [_coerce(v, inner, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return bool(value)
    if tp in (int, float, str):
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}.")
        try:
            out = tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}.") from e
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"{where} must be a finite number, got {value!r}: a NaN or infinite setting would "
                              "poison the weights at the first step.")
        return out
    return value


def _warn_renamed(old: str, new: str, where: str = "") -> None:
    warnings.warn(f"{where}{old} is deprecated and will be removed in the next release; use {where}{new} "
                  "(TRL's name).", DeprecationWarning, stacklevel=4)


def renamed_keys(data: dict[str, Any], renamed: dict[str, str], prefix: str = "") -> dict[str, Any]:
    """``data`` with each old key of ``renamed`` moved to its new name (a DeprecationWarning per old key).

    Giving both the old and the new name is refused: which one should win is not knowable.
    """
    out = dict(data)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{prefix}{old} and {prefix}{new} are the same setting ({old} is the deprecated "
                                  f"name); give only {prefix}{new}.")
            _warn_renamed(old, new, prefix)
            out[new] = out.pop(old)
    return out


def with_renamed_fields(cls: type[T]) -> type[T]:
    """Class decorator: the old names in ``cls._renamed`` (``{"old": "new"}``) still work for one release,
    as constructor keywords and as attribute reads, each with a DeprecationWarning naming the new name.

    ``from_dict`` maps the same table for YAML and ``key=value`` keys, so one table serves all three.
    """
    renamed: dict[str, str] = dict(getattr(cls, "_renamed", {}))
    init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **renamed_keys(kwargs, renamed))

    def __getattr__(self: Any, name: str) -> Any:
        if name in renamed:
            _warn_renamed(name, renamed[name])
            return getattr(self, renamed[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return cls


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys raise with a suggestion, deprecated keys
    (``cls._renamed``) are mapped to their new names with a DeprecationWarning, and ``cls._keys`` maps a YAML
    key that cannot be a Python name (``async``) to its field (``async_``) silently."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = renamed_keys(data, getattr(cls, "_renamed", {}), prefix)
    data = {getattr(cls, "_keys", {}).get(k, k): v for k, v in data.items()}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"Unknown config key {prefix + key!r} for {cls.__name__}." + _closest(key, list(fields)))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e
    except ValueError as e:
        raise _with_prefix(e, prefix, fields) from None


def _with_prefix(e: ValueError, prefix: str, fields: dict[str, Any]) -> ValueError:
    """A config class's own check names its field first (``temperature must be > 0``); give it the full key
    (``grpo.temperature must be > 0``) so the user knows which section of the run config to fix."""
    msg = str(e)
    first = re.match(r"\w+", msg)
    if not prefix or first is None or first.group(0) not in fields or msg.startswith(prefix):
        return e
    try:
        out = type(e)(prefix + msg)
    except TypeError:
        out = ConfigError(prefix + msg)
    out.__cause__ = e.__cause__
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}`` (values coerced later by type)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. lr=1e-5 or grpo.beta=0.04).")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at top level, got {type(data).__name__}.")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) then ``key=value`` overrides, validated into ``cls``."""
    data = load_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)
