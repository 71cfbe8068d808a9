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
    from esrt_jax.cli import train as run

    monkeypatch.delenv("ESRT_JAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_home() == tmp_path / "esrt_jax"
    assert run.parse_args(["--config", "c.yaml"]).compile_cache == str(tmp_path / "esrt_jax" / "xla")
    monkeypatch.setenv("ESRT_JAX_COMPILE_CACHE", "/elsewhere")
    assert run.parse_args(["--config", "c.yaml"]).compile_cache == "/elsewhere"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_home() == Path("~/.cache/esrt_jax").expanduser()


def test_every_config_field_says_what_it_holds():
    """Each field of every config dataclass in esrt_jax has a description (`setting(..., help=...)`),
    which the configuration reference (tools/config_reference.py, tests/test_config_reference.py) is
    generated from: the one "every field has help" check."""
    import dataclasses
    import importlib
    import pkgutil

    import esrt_jax
    from esrt_jax.config import field_help

    seen, missing = 0, []
    for info in pkgutil.walk_packages(esrt_jax.__path__, "esrt_jax."):
        if info.name.startswith("esrt_jax.cli"):
            continue
        mod = importlib.import_module(info.name)
        for name, cls in vars(mod).items():
            if (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == info.name
                    and (name.endswith("Config") or name == "WeightChange")):
                seen += 1
                missing += [f"{info.name}.{name}.{k}" for k, v in field_help(cls).items() if not v]
    assert seen >= 15 and not missing, missing


def test_speech_blocks_are_typed_and_refuse_unknown_keys():
    from esrt_jax.speech.config import SpeechDataConfig, SpeechModelConfig, generation_config
    from esrt_jax.train.config import load_run_config

    cfg = load_run_config("configs/demo.yaml", ["model.decode.num_beams=2", "model.infer.num_beams=3",
                                                "model.infer.max_new_tokens=7"]).for_stage("srt")
    m = SpeechModelConfig.of(cfg)
    assert m.tokenizer == "demo" and m.seed == 0 and m.resolve().encoder.num_mel_bins == 80
    dev, inf = generation_config(cfg, 2, inference=False), generation_config(cfg, 2, overrides={"num_beams": 4})
    assert (dev.num_beams, dev.max_new_tokens, dev.no_repeat_ngram_size) == (2, 96, 0)
    assert (inf.num_beams, inf.max_new_tokens, inf.eos_ids) == (4, 7, (2,))
    assert SpeechDataConfig.of(cfg).demo and SpeechDataConfig.of(cfg).demo_voices == 8
    with pytest.raises(ConfigError, match=r"^model.decode.beams: unknown key;"):
        SpeechModelConfig.of(load_run_config("configs/demo.yaml", ["model.decode.beams=2"]))
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) model.wisper;"):
        SpeechModelConfig.of(load_run_config("configs/demo.yaml", ["model.wisper=/x"]))
