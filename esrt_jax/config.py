"""Frozen-dataclass configs, loaded from YAML with `--set a.b=value` overrides.

Every config is a frozen dataclass. `from_dict` builds one from nested plain data and
checks it strictly: an unknown key, a wrong type or a value that `validate()` rejects is a
`ConfigError` naming the dotted key. Dataclasses may define `validate(self)` that raises
`ConfigError` (use `check(cond, key, msg)`), called after construction.

Every field says what it holds: it is declared with `setting(default, help="...")` (or
`setting(factory=..., help=...)`), which keeps the description in the field's
`metadata["help"]`; `field_help(cls)` reads them (the configuration reference is generated from
them, and a test fails on a field without one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """A config dataclass field with its one-line description (kept in `metadata["help"]`)."""
    if not help or not help.strip():
        raise ValueError("setting(): a description (help=...) is required")
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(cls: type) -> dict[str, str | None]:
    """{field name: its description, or None where it has none} of a config dataclass."""
    return {f.name: f.metadata.get("help") for f in dataclasses.fields(cls)}


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


class CheckpointError(ValueError):
    """A checkpoint directory or tensor is missing, unexpected or mis-shaped.

    Defined here, in the lowest layer, because both the pure model modules (name maps that find a
    tensor missing) and the IO in `esrt_jax.convert` raise it."""


def cache_home() -> Path:
    """Where esrt-jax caches what it builds (demo corpus, compiled steps):
    `$XDG_CACHE_HOME/esrt_jax`, else `~/.cache/esrt_jax`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "esrt_jax"


def hf_dict(hf: Any) -> dict:
    """A transformers config object or a plain config.json dict -> dict."""
    if isinstance(hf, Mapping):
        return dict(hf)
    if hasattr(hf, "to_dict"):
        return hf.to_dict()
    raise ConfigError(f"expected a Hugging Face config (object or dict), got {type(hf).__name__}")


def check(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError('key: msg')` unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert plain YAML data `value` to annotated type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from nested plain data; unknown keys and bad values are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing required key(s) {', '.join(where + m for m in missing)}")
    try:
        obj = cls(**kwargs)  # some configs validate in __post_init__ already
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Call `validate()` of `obj` (if defined), re-raising errors with the dotted prefix."""
    fn = getattr(obj, "validate", None)
    if fn is None:
        return
    try:
        fn()
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> nested plain data (tuples become lists), YAML-safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value), the value parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads '1e-5' as a string; accept it as the float it obviously is.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of nested `data` with each 'a.b=value' override set."""

    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return data


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, where: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of nested `data` by the environment
    variable (or the default, `~` expanded), e.g. `llm: ${ESRT_REAL_DIR:-~/.cache/esrt_jax/real}/gemma3-270m`.
    An unset variable without a default is an error naming the dotted key."""
    if isinstance(data, Mapping):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set "
                                  f"(write ${{{m.group(1)}:-default}} to give a default)")
            value = os.path.expanduser(m.group(2))
        return value

    return _ENV_REF.sub(sub, data)


def yaml_error_line(e: Exception) -> str:
    """A YAML parser error (several lines, with a caret drawing) -> one line with its position."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def check_field_types(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    """Type-check the values in `data` of `cls`'s scalar fields (int, float, str, bool, optional or not)
    before a hand-written constructor computes with them: a `ConfigError` naming `prefix.key`.
    Keys that are not fields, and non-scalar fields, are the constructor's business."""
    hints = typing.get_type_hints(cls)
    scalars = (int, float, str, bool)
    for k, v in data.items():
        tp = hints.get(k)
        if tp is None or k not in {f.name for f in dataclasses.fields(cls)}:
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if tp in scalars or (typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1
                             and args[0] in scalars):
            _coerce(v, tp, f"{prefix}.{k}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with an error naming the file when it is missing or malformed;
    `${VAR}` / `${VAR:-default}` in strings are taken from the environment (`expand_env`)."""
    path = Path(path)
    if not path.is_file():
        near = sorted(str(p) for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(str(path), near, n=3, cutoff=0.6)
        raise ConfigError(f"config file {path} does not exist"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    try:
        return expand_env(data)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load dataclass `cls` from a YAML file (optional) plus `--set` style overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


