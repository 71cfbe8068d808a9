"""Host input-pipeline throughput: utterances/s with log-mel on the host vs raw audio shipped
for on-device mel, with 1 and 2 worker processes, and the host cores needed to feed training.

    python bench/bench_data.py                       # demo corpus (built/cached if needed)
    python bench/bench_data.py --data DIR/train.jsonl --step-rate 2 --global-batch 256
    python bench/bench_data.py --quick               # tiny smoke run (a small corpus subset)

What is timed: the full pipeline of `esrt_jax.data.pipeline` (mixture plan, decode, resample,
30 s pad/trim, log-mel or not, tokenise, batch) after a warm-up batch (which includes starting
the workers). For the on-device variant, the device side (`log_mel_spectrogram_jax`, jitted)
is timed separately, steady state after compilation. Cores needed = ceil(step_rate x
global_batch / utterances per second per worker) + 1 (the training process itself), since each
worker is one busy process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_tokenizer():
    """A small byte-level BPE (any text tokenises); tokenisation cost is realistic enough."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["speech translation for everyone in many languages"] * 8,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def time_host(cfg, tok, n_batches: int) -> tuple[float, float]:
    """(utterances/s, seconds for the warm-up batch)."""
    from esrt_jax.data.pipeline import make_train_iterator

    t0 = time.perf_counter()
    it = make_train_iterator(cfg, tok)
    next(it)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return n_batches * cfg.batch_size / dt, warm


def time_device_mel(batch: int, n_mels: int, reps: int) -> tuple[float, float, str]:
    """(utterances/s of the jitted jax log-mel, compile seconds, device)."""
    import jax
    import jax.numpy as jnp

    from esrt_jax.audio import N_SAMPLES, log_mel_spectrogram_jax

    f = jax.jit(lambda x: log_mel_spectrogram_jax(x, n_mels))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, N_SAMPLES), np.float32) * 0.1)
    t0 = time.perf_counter()
    f(x).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    dt = time.perf_counter() - t0
    return reps * batch / dt, compile_s, str(jax.devices()[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="training JSONL (default: the demo corpus' train.jsonl)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--batch-size", type=int, default=8, help="host batch (per process)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    ap.add_argument("--workers", default="1,2", help="worker counts to time")
    ap.add_argument("--n-mels", type=int, default=128)
    ap.add_argument("--step-rate", type=float, default=1.0, help="training steps/s to feed")
    ap.add_argument("--global-batch", type=int, default=64,
                    help="utterances per training step on this host")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from esrt_jax.data.pipeline import DataConfig

    if a.data:
        data = Path(a.data)
    else:
        from esrt_jax.data.demo import build_demo_corpus

        if a.quick:
            d = build_demo_corpus(Path(tempfile.gettempdir()) / "esrt_bench_data_quick",
                                  langs=["eng", "deu"], voices_per_lang=1, max_sentences=4,
                                  progress=False)
        else:
            d = build_demo_corpus(progress=True)
        data = Path(d) / "train.jsonl"
    if a.quick:
        a.batches, a.batch_size, workers = 2, 2, [1]
    else:
        workers = [int(w) for w in a.workers.split(",") if w.strip()]
    tok = tiny_tokenizer()
    print(f"data {data}; host batch {a.batch_size}; {a.batches} timed batches; "
          f"{os.cpu_count()} cpus")
    rows = []
    for features in ("mel", "audio"):
        for w in workers:
            cfg = DataConfig(train=(str(data),), tasks={"asr": 0.2, "smt": 0.1, "srt": 0.7},
                             batch_size=a.batch_size, features=features, n_mels=a.n_mels,
                             workers=w, shard_index=0, shard_count=1, text_buckets=(128, 256, 512))
            ups, warm = time_host(cfg, tok, a.batches)
            rows.append((features, w, ups, warm))
            where = "host" if features == "mel" else "device"
            print(f"  mel on {where:6s} workers {w}: {ups:8.1f} utt/s  ({ups / w:.1f} per worker; "
                  f"warm-up batch {warm:.1f} s)")
    dev_ups, comp, dev = time_device_mel(a.batch_size, a.n_mels, 2 if a.quick else 10)
    print(f"  device log-mel ({dev}): {dev_ups:.1f} utt/s steady, compile {comp:.1f} s")
    need = a.step_rate * a.global_batch
    print(f"to feed {a.step_rate:g} steps/s x {a.global_batch} utterances = {need:g} utt/s:")
    for features in ("mel", "audio"):
        per_worker = max(r[2] / r[1] for r in rows if r[0] == features)
        cores = math.ceil(need / per_worker) + 1
        print(f"  mel on {'host' if features == 'mel' else 'device'}: {per_worker:.1f} utt/s per "
              f"worker -> {cores} host cores")
    bytes_mel = a.n_mels * 3000 * 4
    bytes_audio = 480000 * 4
    print(f"host->device bytes per utterance: mel {bytes_mel / 1e6:.2f} MB, raw audio "
          f"{bytes_audio / 1e6:.2f} MB (float32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
