"""The speech-LLM wiring of training (esrt_jax/speech/build.py), abstractly: no weights, no data."""

import pytest

from esrt_jax.config import ConfigError
from esrt_jax.speech import build as speech
from esrt_jax.train.bundle import flat_paths
from esrt_jax.train.config import load_run_config


def cfg(*sets, stage="srt"):
    return load_run_config("configs/demo.yaml", list(sets)).for_stage(stage)


def test_paper_configs_parse_and_build_their_models():
    for name, layers, q in (("esrt_4b", 34, 80), ("esrt_12b", 48, 30), ("llm_srt_3b", 36, 80),
                            ("llm_srt_7b", 28, 80), ("llm_srt_32b", 64, 80)):
        c = load_run_config(f"configs/{name}.yaml")
        s = speech.speech_config(c.for_stage("srt"))
        assert s.llm.num_hidden_layers == layers and s.adapter.num_output_tokens == q, name
        assert s.encoder.d_model == 1280 and s.encoder.num_mel_bins == 128
        assert c.for_stage("srt").train.lr == 1e-5 and c.for_stage("asr").train.lr == 1e-4
        assert c.train.warmup_steps == 1000 and c.train.weight_decay == 0.01 and c.train.schedule == "linear"
    assert load_run_config("configs/esrt_4b.yaml").for_stage("srt").data["tasks"] == \
        {"asr": 0.2, "smt": 0.1, "srt": 0.7}


def test_default_trainable_set_is_adapter_plus_lora():
    c = cfg("train.trainable=[]", "lora.enabled=true", "lora.rank=4")
    b = speech.build_model(c, abstract=True)
    assert set(b.trainable) == {"adapter", "llm"} and set(b.frozen) == {"encoder", "llm"}
    t_llm = list(flat_paths(b.trainable["llm"]))
    assert t_llm and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in t_llm), t_llm[:4]
    assert not any("lora_" in p for p in flat_paths(b.frozen))
    b2 = speech.build_model(cfg("train.trainable=[]"), abstract=True)
    assert set(b2.trainable) == {"adapter"} and set(b2.frozen) == {"encoder", "llm"}
    spec = b2.batch_spec(4)
    assert spec["mel"].shape == (4, 80, 3000) and spec["tokens"].shape == (4, 96)


def test_model_block_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.whisper_config.d_modle"):
        speech.speech_config(cfg("model.whisper_config.d_modle=3"))
    with pytest.raises(ConfigError, match="unknown key.*model.wisper"):
        speech.speech_config(cfg("model.wisper=/x"))
    with pytest.raises(ConfigError, match="model.llm_config"):
        c = load_run_config("configs/demo.yaml").for_stage("asr")
        m = dict(c.model)
        m.pop("llm_config")
        import dataclasses
        speech.speech_config(dataclasses.replace(c, model=m))


def test_encoder_gets_gradients_when_trainable_names_it():
    """train.trainable may name the encoder (the demo's random one, configs/demo.yaml): it then
    gets real gradients (no stop_gradient in the model), and is absent from the trainable tree
    otherwise."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    frozen_enc = speech.build_model(cfg("train.token_dropout=0", 'train.trainable=["^adapter/","^llm/"]'), abstract=True)
    assert "encoder" not in frozen_enc.trainable and "encoder" in frozen_enc.frozen
    b = speech.build_model(cfg("train.token_dropout=0", 'train.trainable=["^adapter/","^encoder/"]'))
    assert "encoder" in b.trainable
    spec = b.batch_spec(2)
    rs = np.random.RandomState(0)
    batch = {k: jnp.asarray(rs.randint(3, 200, s.shape) if jnp.issubdtype(s.dtype, jnp.integer)
                            else rs.randn(*s.shape) * 0.1, s.dtype) for k, s in spec.items()}
    batch["loss_mask"] = jnp.ones_like(batch["loss_mask"])
    batch["attention_mask"] = jnp.ones_like(batch["attention_mask"])
    grads = jax.grad(lambda t: b.loss_fn(t, b.frozen, batch, None)[0])(b.trainable)
    enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
    assert np.isfinite(enc_norm) and enc_norm > 0


def test_builder_names_of_older_run_configs_still_load():
    """Run configs saved before the speech system left the trainer name esrt_jax.train.speech."""
    old = cfg("model.builder=esrt_jax.train.speech:build_model", "data.builder=esrt_jax.train.speech:build_data")
    assert old.model_builder() is speech.build_model and old.data_builder() is speech.build_data
    assert cfg().model_builder() is speech.build_model and cfg().data_builder() is speech.build_data
    with pytest.raises(ImportError, match="model.builder"):
        cfg("model.builder=esrt_jax.train.nowhere:build_model").model_builder()
