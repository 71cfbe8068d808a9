"""The configuration reference (docs/reference/config.md) is generated from the config dataclasses:
the checked-in page must be what the code generates (that every config field carries a description
is tests/test_config.py::test_every_config_field_says_what_it_holds)."""

import dataclasses
import importlib.util
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_page_covers_every_block_and_is_current():
    tool = _tool()
    secs, _ = tool.sections()
    assert {p for p, _ in secs} >= {"", "lora", "mesh", "train", "stages.<name>", "model", "model.adapter",
                                    "model.align", "data", "data.augment"}
    assert tool.main(["--check"]) == 0, "docs/reference/config.md is stale: run python tools/config_reference.py"
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert "| `train.lr` | number | `0.0001` | peak learning rate |" in page
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings  # each section once (`data:` has two classes)


@dataclasses.dataclass(frozen=True)
class _Inner:
    depth: int = dataclasses.field(default=2, metadata={"help": "how deep"})
    width: int = 3  # no description: must be reported


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str = dataclasses.field(default="x", metadata={"help": "a name"})
    inner: _Inner = dataclasses.field(default=_Inner(), metadata={"help": "nested"})
    many: dict[str, _Inner] = dataclasses.field(default_factory=dict, metadata={"help": "by name"})
    maybe: typing.Optional[_Inner] = dataclasses.field(default=None, metadata={"help": "or none"})


def test_a_field_without_description_is_reported_in_every_nested_place():
    tool = _tool()
    secs, missing = tool.sections([("", _Outer)])
    assert [p for p, _ in secs] == ["", "inner", "many.<name>", "maybe"]
    assert [m.split(" ")[0] for m in missing] == ["inner.width", "many.<name>.width", "maybe.width"]
    page = tool.render([("", _Outer)])
    assert "| `inner.depth` | integer | `2` | how deep |" in page and "| `maybe` | mapping \\| null |" in page
