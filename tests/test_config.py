import dataclasses
from pathlib import Path

import pytest

from esrt_jax.config import ConfigError, check, from_dict, load, to_dict


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float = 1e-4
    warmup: int = 1000
    schedule: str = "linear"

    def validate(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.schedule in ("linear", "cosine"), "schedule", f"unknown schedule {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "demo"
    langs: tuple[str, ...] = ("eng",)
    opt: Opt = Opt()
    seed: int | None = None


def test_defaults_and_roundtrip():
    cfg = from_dict(Run, {})
    assert cfg == Run()
    assert from_dict(Run, to_dict(cfg)) == cfg


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nopt:\n  lr: 2e-4\nlangs: [eng, deu]\n")
    cfg = load(Run, f, ["opt.lr=1e-5", "opt.warmup=10", "seed=3"])
    assert cfg.name == "x" and cfg.langs == ("eng", "deu")
    assert cfg.opt.lr == pytest.approx(1e-5) and cfg.opt.warmup == 10 and cfg.seed == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"


@pytest.mark.parametrize("data, msg", [
    ({"opt": {"lrr": 1}}, "unknown key(s) opt.lrr"),
    ({"opt": {"lr": -1.0}}, "opt.lr: must be > 0"),
    ({"opt": {"warmup": "many"}}, "opt.warmup: expected an integer"),
    ({"opt": {"schedule": "step"}}, "opt.schedule: unknown schedule"),
    ({"langs": "eng"}, "langs: expected a list"),
    ({"opt": 3}, "opt: expected a mapping"),
])
def test_errors_name_the_key(data, msg):
    with pytest.raises(ConfigError) as e:
        from_dict(Run, data)
    assert msg in str(e.value)


def test_env_interpolation(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("name: ${ESRT_TEST_DIR:-~/x}/m\nlangs: [\"${ESRT_TEST_LANG}\", eng]\n")
    monkeypatch.delenv("ESRT_TEST_DIR", raising=False)
    monkeypatch.setenv("ESRT_TEST_LANG", "deu")
    cfg = load(Run, f)
    assert cfg.name == str(Path("~/x").expanduser() / "m") and cfg.langs == ("deu", "eng")
    monkeypatch.setenv("ESRT_TEST_DIR", "/data/real")
    assert load(Run, f).name == "/data/real/m"
    monkeypatch.delenv("ESRT_TEST_LANG")
    with pytest.raises(ConfigError, match=r"c.yaml: langs\[0\]: environment variable ESRT_TEST_LANG is not set"):
        load(Run, f)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(Run, None, ["opt.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(Run, tmp_path / "nope.yaml")


def test_caches_follow_xdg_cache_home(monkeypatch, tmp_path):
    """The demo corpus and the XLA compile cache move with $XDG_CACHE_HOME (the README says so)."""
    from esrt_jax.config import cache_home
    from esrt_jax.train import run

    monkeypatch.delenv("ESRT_JAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_home() == tmp_path / "esrt_jax"
    assert run.parse_args(["--config", "c.yaml"]).compile_cache == str(tmp_path / "esrt_jax" / "xla")
    monkeypatch.setenv("ESRT_JAX_COMPILE_CACHE", "/elsewhere")
    assert run.parse_args(["--config", "c.yaml"]).compile_cache == "/elsewhere"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_home() == Path("~/.cache/esrt_jax").expanduser()
