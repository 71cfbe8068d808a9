"""The frozen-encoder feature cache: cached-feature loss == uncached loss, the pipeline ships
`enc` from it, a cache for another encoder / front end is refused naming both fingerprints, an
audio missing from it is an error naming the audio, and a build killed with SIGKILL resumes
without recomputing its finished shards (a real subprocess)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from esrt_jax.cli import encode_cache as encode_cache_cli
from esrt_jax.config import ConfigError
from esrt_jax.data import encode_cache as ec
from esrt_jax.data.pipeline import DataConfig, make_train_dataset
from esrt_jax.data.records import open_source
from esrt_jax.data.tasks import TaskTokenizer, collate
from esrt_jax.eval import decode as dec
from esrt_jax.infer.generate import GenerateConfig
from esrt_jax.infer.translator import Translator
from esrt_jax.models.speech_llm import loss_fn
from esrt_jax.train.config import load_run_config
from esrt_jax.speech.build import build_inference, build_model
from helpers_sllm import RUN_CONFIG, tiny_speech_llm, write_tone
from helpers_tokenizer import save_tiny_tokenizer, tiny_tokenizer

N_UTT = 6


def _corpus(d, n):
    """n utterances (two languages) in d/train.jsonl -> path."""
    lines = []
    for i in range(n):
        wav = write_tone(d / f"u{i}.wav", 0.3 + 0.05 * i, 200 + 40 * i, seed=i)
        lines.append(json.dumps({"id": f"u{i}", "audio": str(wav), "src": "eng", "tgt": "deu",
                                 "asr": f"hello {i}", "s2tt": f"hallo {i}"}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    src = open_source(str(_corpus(d, N_UTT)))
    model = tiny_speech_llm()
    load = ec.mel_loader(model.config.encoder, [src])
    keys = [str(k) for k in src.index().audio_key]
    stats = ec.build(model.encoder, keys, load, d / "c", shard_size=4, batch=3, progress=False)
    return d, src, model, load, keys, stats


def test_cached_features_give_the_uncached_loss(built):
    d, src, model, load, keys, stats = built
    assert stats == {"built": 2, "skipped": 0, "frames_added": 0, "rebuilt": 0}
    cache = ec.FeatureCache(d / "c", ec.encoder_fingerprint(model.encoder))
    assert len(cache) == N_UTT and cache.shape == (32, 32)
    tt = TaskTokenizer(tiny_tokenizer(320))
    recs = [src[i] for i in range(3)]
    batch = {k: jnp.asarray(v) for k, v in collate(
        [tt.encode("srt", r.src, r.tgt, r.transcription, r.translation) for r in recs], (64,), tt.pad_id).items()}
    plain = loss_fn(model, {**batch, "mel": jnp.asarray(np.stack([load(r.audio) for r in recs]))})
    cached = loss_fn(model, {**batch, "enc": jnp.asarray(np.stack([cache[r.audio] for r in recs]))})
    assert abs(float(plain[0]) - float(cached[0])) <= 1e-6, (float(plain[0]), float(cached[0]))
    assert float(plain[1]["accuracy"]) == float(cached[1]["accuracy"])


def test_pipeline_ships_cached_encoder_output(built):
    d, src, model, load, keys, _ = built
    cfg = DataConfig(train=(str(d / "train.jsonl"),), batch_size=4, text_buckets=(64,), n_mels=80,
                     encoder_cache=str(d / "c"), shard_index=0, shard_count=1)
    batch = next(iter(make_train_dataset(cfg, tiny_tokenizer(320))))
    assert "mel" not in batch and batch["enc"].shape == (4, 32, 32)
    cache = ec.FeatureCache(d / "c")
    for row, r in zip(batch["enc"], batch["record"]):
        np.testing.assert_array_equal(row, cache[src[int(r)].audio])


def test_foreign_cache_and_missing_audio_are_refused(built):
    d, src, model, load, keys, _ = built
    other = tiny_speech_llm(seed=1).encoder
    mine, theirs = ec.encoder_fingerprint(model.encoder), ec.encoder_fingerprint(other)
    assert mine != theirs
    with pytest.raises(ConfigError, match=f"{mine}.*{theirs}"):
        ec.FeatureCache(d / "c", theirs)
    with pytest.raises(ConfigError, match=f"{mine}.*{theirs}"):  # building into it, too
        ec.build(other, keys, load, d / "c", shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="nowhere.wav"):
        ec.FeatureCache(d / "c")["/data/nowhere.wav"]
    # bfloat16 round trip of the same encoder output
    ec.build(model.encoder, keys[:2], load, d / "bf", dtype="bfloat16", shard_size=4, progress=False)
    bf = ec.FeatureCache(d / "bf", mine)
    f32 = ec.FeatureCache(d / "c")
    k = sorted(keys)[0]
    np.testing.assert_allclose(np.asarray(bf[k], np.float32), f32[k], rtol=1e-2, atol=1e-2)


def test_eval_decode_reads_the_cache(built, tmp_path):
    """eval's decode with the cache gives the same features and results file as with the encoder."""
    d, src, model, load, keys, _ = built
    tt = TaskTokenizer(tiny_tokenizer(320))
    tr = Translator(model, tt.tokenizer, max_batch=4,
                    gen_cfg=GenerateConfig(max_new_tokens=6, eos_ids=(tt.eos_id,), pad_id=tt.pad_id))
    cache = ec.FeatureCache(d / "c", ec.encoder_fingerprint(model.encoder))
    np.testing.assert_allclose(tr.adapt(np.stack([cache[k] for k in keys])),
                               tr.encode(np.stack([load(k) for k in keys])), atol=1e-5)
    items, _ = dec.read_items(d / "train.jsonl", task="asr")
    plain = dec.decode_to_file(tr, items, tmp_path / "a.jsonl", task="asr", batch=4, progress=False)
    cached = dec.decode_to_file(tr, items, tmp_path / "b.jsonl", task="asr", batch=4, progress=False,
                                encoder_cache=cache)
    assert plain.decoded == cached.decoded == N_UTT
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    with pytest.raises(dec.DecodeError, match="nowhere.wav"):
        dec.decode_to_file(tr, items, tmp_path / "c.jsonl", task="asr", batch=4, progress=False,
                           encoder_cache=cache, audio_of=lambda p: "/data/nowhere.wav")


def test_killed_build_resumes_without_recomputing_finished_shards(tmp_path):
    n = 40
    train = _corpus(tmp_path, n)
    save_tiny_tokenizer(tmp_path / "tok", vocab_size=320)
    cfg = yaml.safe_load(RUN_CONFIG.format(run_dir=tmp_path / "runs", tok_dir=tmp_path / "tok"))
    cfg["data"]["train"] = [str(train)]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "esrt_jax.data.encode_cache", "--config", str(tmp_path / "run.yaml"),
           "--out", str(out), "--shard-size", "1", "--batch", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("shard-*.npy"))) < 2:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.npy")}
    assert 2 <= len(done) < n, f"{len(done)} shards before the kill"
    stats = encode_cache_cli.main(["--config", str(tmp_path / "run.yaml"), "--out", str(out), "--shard-size",
                                   "1", "--batch", "1"])
    assert stats == {"built": n - len(done), "skipped": len(done), "frames_added": 0, "rebuilt": 0}
    for name, st in done.items():  # untouched: not rewritten
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == st, name
    assert not list(out.glob(".tmp-*"))  # the killed process's partial write is cleaned up
    cache = ec.FeatureCache(out)
    assert len(cache) == n
    model, _ = build_inference(load_run_config(tmp_path / "run.yaml"))
    load = ec.mel_loader(model.config.encoder, [open_source(str(train))])
    keys = json.loads((out / "keys.json").read_text())
    for k in (keys[0], keys[-1]):  # one shard from before the kill, one from after
        want = np.asarray(model.encoder(jnp.asarray(load(k)[None])))[0]
        np.testing.assert_allclose(cache[k], want, rtol=1e-5, atol=1e-5)


def test_model_builder_checks_the_cache(built, tmp_path):
    """build_model checks data.encoder_cache against its encoder; its batches then carry enc."""
    d = built[0]
    save_tiny_tokenizer(tmp_path / "tok", vocab_size=320)
    cfg = yaml.safe_load(RUN_CONFIG.format(run_dir=tmp_path / "runs", tok_dir=tmp_path / "tok"))
    cfg["data"]["encoder_cache"] = str(d / "c")  # built by another (seed 0) encoder than seed 3's
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc = load_run_config(tmp_path / "run.yaml").for_stage("srt")
    model, _ = build_inference(rc)
    theirs = ec.FeatureCache(d / "c").meta["fingerprint"]
    with pytest.raises(ConfigError, match=f"{theirs}.*{ec.encoder_fingerprint(model.encoder)}"):
        build_model(rc)
    ec.build(model.encoder, built[4], built[3], tmp_path / "mine", shard_size=4, progress=False)
    cfg["data"]["encoder_cache"] = str(tmp_path / "mine")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    spec = build_model(load_run_config(tmp_path / "run.yaml").for_stage("srt")).batch_spec(2)
    assert "mel" not in spec and spec["enc"].shape == (2, 32, 32)


def test_real_lengths_trimmed_batches_and_attend_padding_false(built, tmp_path):
    """The cache records each audio's real encoder frames; batches carry them (`enc_frames`, the
    same from the cache and from the audio); `enc_frame_bucket` cuts `enc` to the batch's longest
    one rounded up to the bucket; an adapter with attend_padding false gives the same loss on the
    cut batch, the full cached one and the mel (<= 1e-6); the builder refuses the bucket for an
    adapter that attends over the padding, and a cache without lengths for one that does not."""
    import soundfile as sf

    from esrt_jax.audio import encoder_frames

    d, src, model, load, keys, _ = built
    cache = ec.FeatureCache(d / "c")
    assert cache.has_frames
    want = {k: encoder_frames(sf.info(k).frames, 32) for k in keys}
    assert {k: cache.frames(k) for k in keys} == want and 15 <= min(want.values()) < max(want.values()) < 32
    common = dict(train=(str(d / "train.jsonl"),), batch_size=4, text_buckets=(64,), n_mels=80,
                  shard_index=0, shard_count=1)
    cut = next(iter(make_train_dataset(DataConfig(**common, encoder_cache=str(d / "c"), enc_frame_bucket=8),
                                       tiny_tokenizer(320))))
    full = next(iter(make_train_dataset(DataConfig(**common, encoder_cache=str(d / "c")), tiny_tokenizer(320))))
    mel = next(iter(make_train_dataset(DataConfig(**common), tiny_tokenizer(320))))
    real = [want[src[int(r)].audio] for r in cut["record"]]
    assert cut["enc_frames"].tolist() == full["enc_frames"].tolist() == mel["enc_frames"].tolist() == real
    assert cut["enc"].shape == (4, -(-max(real) // 8) * 8, 32) and full["enc"].shape == (4, 32, 32)
    np.testing.assert_array_equal(cut["enc"], full["enc"][:, :cut["enc"].shape[1]])
    m = tiny_speech_llm(attend_padding=False)
    keep = ("tokens", "loss_mask", "attention_mask", "enc_frames")
    losses = [float(loss_fn(m, {k: jnp.asarray(v) for k, v in b.items() if k in keep + (f,)})[0])
              for b, f in ((cut, "enc"), (full, "enc"), (mel, "mel"))]
    assert max(losses) - min(losses) <= 1e-6, losses
    padded = float(loss_fn(model, {k: jnp.asarray(v) for k, v in full.items() if k in keep + ("enc",)})[0])
    assert abs(padded - losses[0]) > 1e-4  # attending over the padding is another model
    # the model builder's checks
    save_tiny_tokenizer(tmp_path / "tok", vocab_size=320)
    cfg = yaml.safe_load(RUN_CONFIG.format(run_dir=tmp_path / "runs", tok_dir=tmp_path / "tok"))
    cfg["data"].update(encoder_cache=str(d / "c"), enc_frame_bucket=8)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="attend_padding"):
        build_model(load_run_config(tmp_path / "run.yaml").for_stage("srt"), abstract=True)
    old = tmp_path / "old"
    old.mkdir()
    for f in (d / "c").iterdir():
        if not f.name.startswith("frames-"):
            (old / f.name).symlink_to(f)
    assert not ec.FeatureCache(old).has_frames and ec.FeatureCache(old).frames(keys[0]) is None
    cfg["data"].update(encoder_cache=str(old), enc_frame_bucket=0)
    cfg["model"]["adapter"]["attend_padding"] = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="no audio lengths"):
        build_model(load_run_config(tmp_path / "run.yaml").for_stage("srt"), abstract=True).batch_spec(1)
    # rerunning the build on the older cache adds the lengths and leaves its shards alone
    stats = ec.build(model.encoder, keys, load, old, shard_size=4, batch=3, progress=False)
    assert stats == {"built": 0, "skipped": 2, "frames_added": 2, "rebuilt": 0}
    assert {k: ec.FeatureCache(old).frames(k) for k in keys} == want
    assert all((old / f.name).is_symlink() for f in (d / "c").glob("shard-*.npy"))


def test_real_windows_cache_and_inference_agree(tmp_path):
    """model.encoder_window real: the cache encodes each clip on its own window (its length
    rounded up to 1 s; zeros past it), inference cuts the same way, so the cached features and
    inference agree (<= 1e-5), a clip's features do not depend on its batch, and the window is
    another model than the padded one; caches of the other window are refused, by the builder and
    by the model builder, and so is training without a cache."""
    from flax import nnx
    from transformers import Qwen2Config

    from esrt_jax.audio import real_window
    from esrt_jax.infer.translator import encode_batch
    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.speech_llm import QFormerConfig, SpeechLLM, SpeechLLMConfig, WhisperEncoderConfig

    enc = WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=4,
                               encoder_ffn_dim=64, max_source_positions=150)  # a 3 s window: 3 real windows
    ad = QFormerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       encoder_hidden_size=32, num_queries=4, llm_dim=64, attend_padding=False)
    llm = config_from_hf(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    model = SpeechLLM(SpeechLLMConfig(enc, ad, llm, encoder_window="real"), rngs=nnx.Rngs(0))
    lines = []
    for i, sec in enumerate((0.5, 0.9, 1.4, 2.2)):
        wav = write_tone(tmp_path / f"r{i}.wav", sec, 300 + 50 * i, seed=i)
        lines.append(json.dumps({"id": f"r{i}", "audio": str(wav), "src": "eng", "tgt": "deu", "asr": "a", "s2tt": "b"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(str(tmp_path / "train.jsonl"))
    load = ec.mel_loader(enc, [src])
    keys = sorted(str(k) for k in src.index().audio_key)
    ec.build(model.encoder, keys, load, tmp_path / "c", shard_size=4, batch=4, progress=False, window="real")
    cache = ec.FeatureCache(tmp_path / "c")
    assert cache.window == "real"
    frames = np.array([cache.frames(k) for k in keys], np.int32)
    wins = [real_window([f]) for f in frames]
    assert wins == [100, 100, 200, 300]
    for k, w in zip(keys, wins):
        direct = np.asarray(model.encoder(jnp.asarray(load(k)[None, :, :w])))[0]
        np.testing.assert_allclose(cache[k][:w // 2], direct, atol=1e-5)
        assert not np.any(cache[k][w // 2:])
    tr = Translator(model, tiny_tokenizer(320), max_batch=4)
    mels = np.stack([load(k) for k in keys])
    feats = tr.encode(mels, frames)
    np.testing.assert_allclose(feats, tr.adapt(np.stack([cache[k] for k in keys]), frames), atol=1e-5)
    np.testing.assert_allclose(tr.encode(mels[3:], frames[3:]), feats[3:], atol=1e-5)  # alone or in a batch
    padded = encode_batch(tr.graphdef, tr.state, mels, tr.split, 4, enc_frames=frames)
    assert np.abs(padded[:3] - feats[:3]).max() > 1e-5  # a cut window is another computation
    np.testing.assert_allclose(padded[3], feats[3], atol=1e-5)  # the 3 s clip: its window is the full one
    with pytest.raises(ec.CacheError, match="other settings"):
        ec.build(model.encoder, keys, load, tmp_path / "c", shard_size=4, progress=False)
    with pytest.raises(ValueError, match="real frames"):
        tr.encode(mels)
    # the model builder: a real-window model refuses a padded cache, and training without one
    ec.build(model.encoder, keys, load, tmp_path / "p", shard_size=4, progress=False)
    save_tiny_tokenizer(tmp_path / "tok", vocab_size=320)
    cfg = yaml.safe_load(RUN_CONFIG.format(run_dir=tmp_path / "runs", tok_dir=tmp_path / "tok"))
    cfg["model"].update(encoder_window="real")
    cfg["model"]["adapter"]["attend_padding"] = False
    # (an abstract build opens no data, so that inference, export and import need no cache: the dry
    # run's batch shapes, like training's build, check it)
    for cache_dir, match in ((tmp_path / "p", "padded encoder window"), (None, "trains on the encoder cache")):
        cfg["data"]["encoder_cache"] = None if cache_dir is None else str(cache_dir)
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        bundle = build_model(load_run_config(tmp_path / "run.yaml").for_stage("srt"), abstract=True)
        with pytest.raises(ConfigError, match=match):
            bundle.batch_spec(1)
