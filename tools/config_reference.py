"""Write docs/reference/config.md, the configuration reference, from the config dataclasses.

Every key of a run config is a field of a frozen dataclass reachable from the roots below; each
field carries its meaning as `esrt_jax.config.setting(default, help="...")` (kept in
`metadata["help"]`). This walks them with
`dataclasses.fields` (a field whose type is a dataclass, a `dict[str, dataclass]` or a
`tuple[dataclass, ...]` gets its own section) and writes one table per section: key, type,
default, meaning.

    python tools/config_reference.py           # (re)write docs/reference/config.md
    python tools/config_reference.py --check   # exit 1 when a field has no help or the page is stale

tests/test_config_reference.py runs the check, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "config.md"
# (dotted prefix of the section in a run config, "module:Class"); "" is the top level.
# The `model:` / `data:` blocks are dicts in RunConfig (read by the configured builders): the default
# speech builders' typed blocks are listed here.
ROOTS = [("", "esrt_jax.train.config:RunConfig"),
         ("model", "esrt_jax.speech.config:SpeechModelConfig"),
         ("model.adapter", "esrt_jax.models.qformer:QFormerConfig"),
         ("model.align", "esrt_jax.speech.align:AlignConfig"),
         ("data", "esrt_jax.speech.config:SpeechDataConfig"),
         ("data", "esrt_jax.data.pipeline:DataConfig")]
# Section titles where a prefix alone does not name the section: the `data:` block's keys come from
# two classes, one section each (a heading may appear once on the page).
TITLES = {("data", "esrt_jax.speech.config:SpeechDataConfig"): "`data`: sources, dev set and demo corpus",
          ("data", "esrt_jax.data.pipeline:DataConfig"): "`data`: the pipeline (mixture, batching, features)"}


def load_class(spec: str | type) -> type:
    if isinstance(spec, type):
        return spec
    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def _unwrap(tp):
    """The dataclass a field's type holds and how: (cls, suffix) with suffix '' (the type itself or
    Optional of it), '.<name>' (dict values) or '[]' (tuple items); (None, '') otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _unwrap(inner[0]) if len(inner) == 1 else (None, "")
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>"
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else \
            "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping {type_name(args[0])} -> {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {"str": "string", "int": "integer", "float": "number", "bool": "true/false"}.get(
        getattr(tp, "__name__", ""), str(tp).replace("typing.", ""))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section below)"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(roots=ROOTS) -> tuple[list[tuple[str, type]], list[str]]:
    """[(dotted prefix, dataclass)] in walk order, and the fields that have no help."""
    out: list[tuple[str, type]] = []
    missing: list[str] = []
    todo = [(p, load_class(s)) for p, s in roots]
    seen = set()
    while todo:
        prefix, cls = todo.pop(0)
        if (prefix, cls) in seen:
            continue
        seen.add((prefix, cls))
        out.append((prefix, cls))
        hints = typing.get_type_hints(cls)
        nested = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            if not str(f.metadata.get("help", "")).strip():
                missing.append(f"{key} ({cls.__module__}.{cls.__qualname__}.{f.name})")
            sub, suffix = _unwrap(hints[f.name])
            if sub is not None:
                nested.append((key + suffix, sub))
        todo[:0] = nested
    return out, missing


def _title(prefix: str, cls: type) -> str:
    return TITLES.get((prefix, f"{cls.__module__}:{cls.__qualname__}"), f"`{prefix}`" if prefix else "Top level")


def render(roots=ROOTS) -> str:
    secs, _ = sections(roots)
    lines = [
        "# Configuration reference", "",
        "<!-- Generated by `python tools/config_reference.py` from the config dataclasses; do not edit. -->", "",
        "Every key a run config (`configs/*.yaml`) may set, with its type, default and meaning. A key is "
        "set in the YAML file or on the command line with `--set key=value` (`--set train.lr=1e-5`); an "
        "unknown key, a wrong type or an impossible value is an error naming the dotted key. Strings may "
        "read the environment: `${VAR}` or `${VAR:-default}`.", "",
        "This page is generated from the dataclasses' field descriptions "
        "(`setting(default, help=...)`); `tests/test_config.py` fails when a field has no description, "
        "`tests/test_config_reference.py` when this page differs from the code.", "",
    ]
    titles = [_title(p, c) for p, c in secs]
    dup = sorted({t for t in titles if titles.count(t) > 1})
    if dup:
        raise ValueError(f"sections titled twice: {dup}; give them names in TITLES")
    for prefix, cls in secs:
        hints = typing.get_type_hints(cls)
        title = _title(prefix, cls)
        src = cls.__module__.replace(".", "/") + ".py"
        lines += [f"## {title}", "", f"`{cls.__qualname__}` in `{src}`."]
        doc = " ".join((cls.__doc__ or "").split())
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += ["", doc]
        lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            lines.append(f"| `{key}` | {_cell(type_name(hints[f.name]))} | `{_cell(default_text(f))}` | "
                         f"{_cell(str(f.metadata.get('help', '')))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check: no missing help, page up to date")
    args = p.parse_args(argv)
    _, missing = sections()
    if missing:
        print("config fields without a description (setting(..., help=...)):\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
