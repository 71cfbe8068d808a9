"""Long recordings: the segmenter (`esrt_jax.audio.find_segments`), the text join
(`esrt_jax.infer.longform`), and a recording of 20 demo-corpus clips with pauses (~2 min, longer
than Whisper's 30 s and 40 windows of the 3 s test encoder) through the inference CLI, the edge
client against the real HTTP service, and eval: one segment per clip, in order, with monotone
timestamps, the same joined output on every path."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf

from esrt_jax import audio as A
from esrt_jax.infer import longform

SR = A.SAMPLE_RATE


def tone(seconds: float, freq: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def gap(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SR)), np.float32)


def spans(segs):
    return [(s.start_s, s.end_s) for s in segs]


# ----------------------------------------------------------------------------- segmenter

def test_pauses_are_found_and_every_segment_holds_its_speech():
    parts, where, t = [], [], 0.0
    for dur, pause in ((2.0, 1.0), (2.5, 0.8), (1.5, 1.2), (2.8, 0.6)):
        where.append((t, t + dur))
        parts += [tone(dur, 200 + 100 * len(where)), gap(pause)]
        t += dur + pause
    x = np.concatenate(parts) + 1e-4 * np.random.default_rng(0).standard_normal(int(round(t * SR))).astype(np.float32)
    segs = A.find_segments(x, 3.0)
    assert len(segs) == 4
    for (a, b), s in zip(where, segs):
        assert s.start_s <= a and s.end_s >= b and s.end_s - s.start_s <= 3.0  # the whole tone, padded
        assert s.end_s - b <= 0.15 and a - s.start_s <= 0.15                       # ... by about 0.1 s only
    assert all(p.end <= q.start for p, q in zip(segs, segs[1:]))  # in order, no overlap at pauses


def test_neighbours_are_packed_up_to_the_window():
    x = np.concatenate([tone(0.6, 300), gap(0.5), tone(0.6, 400), gap(0.5), tone(0.6, 500), gap(2.0),
                        tone(1.0, 600)])
    segs = A.find_segments(x, 3.0)
    assert len(segs) == 2  # three short phrases share the first window, the last has its own
    assert segs[0].start_s == 0.0 and segs[0].end_s == pytest.approx(2.9)
    assert segs[1].end == x.size


def test_speech_longer_than_the_window_is_cut_with_overlap_at_its_quietest_point():
    x = tone(10.0, 220)
    x[int(4.2 * SR):int(4.3 * SR)] *= 0.05  # a 0.1 s dip: too short for a pause, the best cut
    segs = A.find_segments(x, 3.0, overlap=0.25)
    assert segs[0].start == 0 and segs[-1].end == x.size
    assert all(s.end_s - s.start_s <= 3.0 for s in segs)
    for p, q in zip(segs, segs[1:]):
        assert q.start < p.end and p.end_s - q.start_s == pytest.approx(0.25)  # the overlap
        assert p.end_s - p.start_s >= 1.5  # a cut is never in the window's first half
    assert 4.2 <= segs[1].end_s <= 4.3  # the second cut falls in the dip
    default = A.find_segments(x, 3.0)  # default overlap: min(0.5 s, window / 10)
    assert default[0].end_s - default[1].start_s == pytest.approx(0.3)
    with pytest.raises(ValueError, match="overlap"):
        A.find_segments(x, 3.0, overlap=1.5)


def test_short_audio_is_one_segment_of_all_of_it():
    x = np.concatenate([gap(0.5), tone(1.0, 300), gap(1.0)])
    assert spans(A.find_segments(x, 3.0)) == [(0.0, 2.5)]


def test_noisy_background_still_has_pauses():
    rng = np.random.default_rng(1)
    x = np.concatenate([tone(2.0, 300), gap(1.0), tone(2.0, 400), gap(1.0), tone(2.0, 500)])
    x = x + 0.01 * rng.standard_normal(x.size).astype(np.float32)  # noise at -40 dBFS
    segs = A.find_segments(x, 3.0)
    assert [round(s.start_s) for s in segs] == [0, 3, 6] and all(s.end_s - s.start_s <= 2.25 for s in segs)


def test_silent_and_empty_audio_are_clear_errors():
    with pytest.raises(A.AudioError, match=r"quiet\.wav: no speech found: the audio is silent"):
        A.find_segments(np.zeros(5 * SR, np.float32), 3.0, source="quiet.wav")
    hum = 1e-4 * np.random.default_rng(0).standard_normal(40 * SR).astype(np.float32)  # -80 dBFS
    with pytest.raises(A.AudioError, match="silent"):
        A.find_segments(hum, 30.0)
    with pytest.raises(A.AudioError, match="empty"):
        A.find_segments(np.zeros(0, np.float32), 3.0)


def test_mel_segments_and_the_cut_warning_only_without_segmentation(tmp_path):
    x = np.concatenate([tone(1.0, 300), gap(1.0), tone(1.0, 400)])
    sf.write(tmp_path / "two.wav", x, SR, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # segmenting: no cut, no warning
        mels, segs = A.mel_segments(tmp_path / "two.wav", 80, 200)  # a 2 s encoder window
    assert mels.shape == (2, 80, 200) and len(segs) == 2
    for m, s in zip(mels, segs):
        np.testing.assert_array_equal(m, A.mel_for_model(x[s.start:s.end], 80, 200))
    with pytest.warns(UserWarning, match=r"two\.wav: audio is 3\.00 s, longer than the model's 2 s window; "
                                         r"cut to 2 s \(segmentation is off\)"):
        one, seg = A.mel_segments(tmp_path / "two.wav", 80, 200, segment=False)
    assert one.shape == (1, 80, 200) and spans(seg) == [(0.0, 2.0)]
    np.testing.assert_array_equal(one[0], A.mel_for_model(x[:2 * SR], 80, 200))
    sf.write(tmp_path / "silent.wav", gap(4.0), SR)
    with pytest.raises(A.AudioError, match=r"silent\.wav: no speech found"):
        A.mel_segments(tmp_path / "silent.wav", 80, 200)


def test_join_texts():
    assert longform.join_texts([" Hello there.", "", "How are you? "], "eng") == "Hello there. How are you?"
    assert longform.join_texts(["你好。", "谢谢"], "cmn") == "你好。谢谢"
    # at an overlap (a cut inside speech) the repeated words are dropped, not at a pause
    assert longform.join_texts(["we went to the", "the park today"], "eng", [True]) == "we went to the park today"
    assert longform.join_texts(["we went to the", "the park today"], "eng", [False]) == \
        "we went to the the park today"
    assert longform.join_texts(["I said Hello,", "hello there"], "eng", [True]) == "I said Hello, there"
    assert longform.join_texts(["我们去公园", "公园玩"], "cmn", [True]) == "我们去公园玩"


# ----------------------------------------------------------------------------- end to end

TOKEN = "long-form-token"
N_CLIPS = 20
PAUSE = 5.0  # 20 clips of ~1-2.5 s with these pauses: a recording over two minutes


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """20 demo-corpus clips (10 sentences, eng and deu) with 5 s pauses and a little noise (~2 min), as one
    wav -> (path, waveform, [(start, end) of each clip's speech (samples above 0.02)] seconds)."""
    from esrt_jax.data.demo import build_demo_corpus

    d = tmp_path_factory.mktemp("longform")
    demo = build_demo_corpus(d / "demo", langs=("eng", "deu"), max_sentences=10, voices_per_lang=1,
                             progress=False)
    clips = sorted((demo / "audio").rglob("*.flac"))
    assert len(clips) == N_CLIPS
    parts, where, t = [gap(0.4)], [], 0.4
    for c in clips:
        wav = A.load_audio(c)
        assert wav.size / SR < 3.0 - 0.25  # each clip fits the 3 s window with its padding
        parts += [wav, gap(PAUSE)]
        loud = np.flatnonzero(np.abs(wav) > 0.02)
        where.append((t + loud[0] / SR, t + (loud[-1] + 1) / SR))
        t += wav.size / SR + PAUSE
    x = np.concatenate(parts)
    x = x + 3e-4 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32)
    path = d / "long.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    assert x.size / SR >= 120.0, x.size / SR
    return path, A.load_audio(path, max_seconds=None), where


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny run with the demo's 3 s encoder window (max_source_positions 150)."""
    from esrt_jax.speech.load import load_model, translator_for
    from helpers_sllm import make_tiny_run

    cfg, run, _ = make_tiny_run(tmp_path_factory.mktemp("run"),
                                overrides=["model.whisper_config.max_source_positions=150"])
    loaded = load_model(cfg, run)
    return cfg, run, loaded, translator_for(loaded)


@pytest.fixture(scope="module")
def cli_out(model, recording, tmp_path_factory):
    from esrt_jax.cli import infer as cli

    cfg, run, _, _ = model
    out = tmp_path_factory.mktemp("cli") / "out.jsonl"
    assert cli.main(["--config", str(cfg), "--checkpoint", str(run), "--audio", str(recording[0]), "--src", "eng",
                     "--tgt", "deu", "--output", str(out)]) == 0
    (r,) = [json.loads(x) for x in out.read_text().splitlines()]
    return r


def test_cli_segments_a_long_recording_one_clip_a_segment(cli_out, recording, model):
    _, wav, where = recording
    segs = cli_out["segments"]
    assert len(segs) == N_CLIPS >= 4
    for s, (a, b) in zip(segs, where):
        assert s["start"] <= a and s["end"] >= b and s["end"] - s["start"] <= 3.0
    starts, ends = [s["start"] for s in segs], [s["end"] for s in segs]
    assert all(x < y for x, y in zip(starts, ends)) and all(e <= s for e, s in zip(ends, starts[1:]))
    np.testing.assert_allclose(spans(A.find_segments(wav, 3.0)), list(zip(starts, ends)), atol=1e-3)
    assert cli_out["transcription"] == " ".join(s["transcription"].strip() for s in segs if s["transcription"].strip())
    assert cli_out["translation"] == " ".join(s["translation"].strip() for s in segs if s["translation"].strip())
    # each segment decodes as that stretch of audio alone would
    _, _, _, tr = model
    seg = A.find_segments(wav, 3.0)[7]
    alone = tr.decode(tr.encode(A.mel_for_model(wav[seg.start:seg.end], 80, 300)[None]), ["eng"], ["deu"])[0]
    assert (segs[7]["transcription"], segs[7]["translation"]) == (alone["transcription"], alone["translation"])


def test_no_segment_cuts_to_one_window_with_the_warning(model, recording):
    from esrt_jax.cli import infer as cli

    cfg, run, _, tr = model
    args = ["--config", str(cfg), "--checkpoint", str(run), "--audio", str(recording[0]), "--src", "eng",
            "--tgt", "deu"]
    assert cli.parse_args(args).segment and not cli.parse_args(args + ["--no-segment"]).segment
    utts = cli.utterances([str(recording[0])], src="eng", tgt="deu")
    with pytest.warns(UserWarning, match=r"long\.wav: audio is \d+\.\d\d s, longer than the model's 3 s window"):
        (r,) = cli.translate(tr, utts, segment=False)
    assert [(s["start"], s["end"]) for s in r["segments"]] == [(0.0, 3.0)]


def test_cli_silent_audio_is_a_one_line_error(model, tmp_path, capsys):
    from esrt_jax.cli import infer as cli

    cfg, run, _, _ = model
    sf.write(tmp_path / "quiet.wav", gap(40.0), SR)
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "--checkpoint", str(run), "--audio", str(tmp_path / "quiet.wav"),
                     "--src", "eng", "--tgt", "deu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "quiet.wav: no speech found" in err[0]


@pytest.fixture(scope="module")
def server(model):
    pytest.importorskip("aiohttp")
    from esrt_jax import serve
    from esrt_jax.infer.cloud import CloudBackend
    from helpers_serve import ServerThread

    _, _, loaded, tr = model
    srv = ServerThread(serve.make_app(CloudBackend(tr, loaded.fingerprint),
                                      serve.ServeConfig(max_batch=8, max_wait_ms=50.0, warmup=False), TOKEN))
    yield srv
    srv.stop()


def test_edge_client_and_service_round_trip_a_long_recording(model, recording, server, cli_out, tmp_path, capsys):
    """The edge CLI segments, sends one payload per segment to the real HTTP service (batched
    there), joins the answers: the CLI's output, up to the fp16 payload rounding."""
    from esrt_jax.cli.edge import main as edge_main

    cfg, run, _, _ = model
    (tmp_path / "token").write_text(TOKEN)
    capsys.readouterr()
    assert edge_main(["--config", str(cfg), "--checkpoint", str(run), "--audio", str(recording[0]), "--src", "eng",
                      "--tgt", "deu", "--server", server.url, "--token-file", str(tmp_path / "token")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(s["start"], s["end"]) for s in out["segments"]] == [(s["start"], s["end"]) for s in cli_out["segments"]]
    assert len(out["segments"]) == N_CLIPS and out["bytes_sent"] == sum(s["bytes_sent"] for s in out["segments"])
    assert max(s["batch_size"] for s in out["segments"]) > 1  # concurrent segments were batched by the service
    texts = lambda r: [(s["transcription"], s["translation"]) for s in r["segments"]]  # noqa: E731
    # fp16 payloads: a rare token may flip against the fp32 CLI, most segments must agree exactly
    same = sum(a == b for a, b in zip(texts(out), texts(cli_out)))
    assert same >= N_CLIPS - 2, (texts(out), texts(cli_out))
    if same == N_CLIPS:
        assert (out["transcription"], out["translation"]) == (cli_out["transcription"], cli_out["translation"])


def test_segments_come_back_in_order_through_cli_and_service(model, recording, server, monkeypatch, capsys):
    """A random model says much the same for every clip, so the order is checked with labels: the
    edge half writes each segment's number (found by its log-mel, exactly) into its features, and
    the cloud half answers with the number it reads there (exact in fp16): the joined output of the
    CLI and of the edge client + service must then be `s0 s1 ... s19`."""
    from esrt_jax.edge import EdgeClient
    from esrt_jax.cli import infer as cli
    from esrt_jax.infer.translator import Translator

    cfg, run, loaded, tr = model
    _, wav, _ = recording
    segs = A.find_segments(wav, 3.0)
    ref = np.stack([A.mel_for_model(wav[s.start:s.end], 80, 300) for s in segs]).reshape(len(segs), -1)
    real_encode = Translator.encode

    def labelled_encode(self, mel, enc_frames=None):
        d = np.abs(np.asarray(mel).reshape(len(mel), 1, -1) - ref[None]).max(axis=-1)
        assert (d.min(axis=1) == 0).all()  # every row is exactly one segment's log-mel
        feats = np.array(real_encode(self, mel, enc_frames))
        feats[:, 0, 0] = d.argmin(axis=1)
        return feats

    def labelled_decode(self, features, src, tgt, task="srt", transcriptions=None, gen_cfg=None):
        ks = np.asarray(features)[:, 0, 0].astype(int)
        return [{"response": f"s{k}", "transcription": f"s{k}", "translation": f"t{k}"} for k in ks]

    monkeypatch.setattr(Translator, "encode", labelled_encode)
    monkeypatch.setattr(Translator, "decode", labelled_decode)
    want = (" ".join(f"s{k}" for k in range(len(segs))), " ".join(f"t{k}" for k in range(len(segs))))
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "--checkpoint", str(run), "--audio", str(recording[0]), "--src", "eng",
                     "--tgt", "deu", "--batch-size", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["transcription"], r["translation"]) == want
    client = EdgeClient(tr, loaded.fingerprint, server=server.url, token=TOKEN, concurrency=5)
    out = client.translate(recording[0], "eng", "deu", batch=3)
    assert (out["transcription"], out["translation"]) == want
    assert [(s["start"], s["end"]) for s in out["segments"]] == [(round(s.start_s, 3), round(s.end_s, 3)) for s in segs]


def test_eval_scores_the_joined_output(model, recording, cli_out, tmp_path):
    """eval.py on a test set holding the long recording: one result row, the joined texts."""
    from esrt_jax.eval import decode as dec

    _, _, loaded, tr = model
    from esrt_jax.cli.eval import build_parser

    sf.write(tmp_path / "quiet.wav", gap(5.0), SR)
    (tmp_path / "test.jsonl").write_text("".join(
        json.dumps({"id": i, "audio": str(a), "src": "eng", "tgt": "deu", "asr": "ref", "s2tt": "ref"}) + "\n"
        for i, a in (("long", recording[0]), ("quiet", tmp_path / "quiet.wav"))))
    items, issues = dec.read_items(tmp_path / "test.jsonl")
    assert not issues
    stats = dec.decode_to_file(tr, items, tmp_path / "results.jsonl", batch=8, progress=False,
                               fingerprint=loaded.fingerprint)
    assert (stats.decoded, stats.audio_encoded, stats.failed) == (1, 1, 1)
    assert [(i.line, i.kind) for i in stats.issues] == [(2, "bad_audio")] and "no speech found" in stats.issues[0].message
    assert build_parser().parse_args(["--no-segment"]).segment is False
    (row,) = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (row["asr_r"], row["s2tt_r"]) == (cli_out["transcription"], cli_out["translation"])
    assert json.loads(dec.meta_path(tmp_path / "results.jsonl").read_text())["segment"] is True
