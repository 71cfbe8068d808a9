"""`python -m esrt_jax.data.encode_cache` / `esrt-encode-cache`: build the frozen-encoder feature
cache of a run config's sources (the cache format and reader: `esrt_jax.data.encode_cache`).

    esrt-encode-cache --config C --out DIR [--dtype bfloat16] [--data test.jsonl] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import sys

import jax

from esrt_jax.config import ConfigError
from esrt_jax.data.encode_cache import DTYPES, build, mel_loader
from esrt_jax.data.pipeline import open_sources
from esrt_jax.speech import build as speech
from esrt_jax.speech.config import SpeechDataConfig
from esrt_jax.train.config import load_run_config


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m esrt_jax.data.encode_cache",
                                description="Run the frozen Whisper encoder once per unique audio of "
                                            "the config's data.train and data.dev sources (and --data files), "
                                            "on the window the config's model.encoder_window names")
    p.add_argument("--config", required=True, help="YAML run config (its model and data blocks)")
    p.add_argument("--out", required=True, help="cache folder (set data.encoder_cache to it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="a further source to cache, e.g. an eval.py test set (repeatable)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--batch", type=int, default=16, help="utterances per encoder call (default 16)")
    p.add_argument("--shard-size", type=int, default=256, help="utterances per shard file (default 256)")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        sd = SpeechDataConfig.of(cfg)
        specs = list(cfg.data.get("train") or ()) + list(sd.dev) + list(args.data)
        if sd.demo:
            d = speech.demo_dir(cfg)
            specs += [str(d / "train.jsonl"), str(d / "dev.jsonl")]
        sources = [open_sources([s]) for s in specs]
        if not sources:
            raise ConfigError("data: no train or dev sources to cache")
        model, _ = speech.build_inference(cfg)
        load = mel_loader(model.config.encoder, sources)
        keys = sorted({str(k) for s in sources for k in s.index().audio_key})
        stats = build(model.encoder, keys, load, args.out, dtype=args.dtype, shard_size=args.shard_size,
                      batch=args.batch, process_index=jax.process_index(), process_count=jax.process_count(),
                      window=model.config.encoder_window)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    added = f", audio lengths added to {stats['frames_added']} older shards" if stats["frames_added"] else ""
    added += f", {stats['rebuilt']} damaged shards rebuilt" if stats["rebuilt"] else ""
    print(f"{args.out}: {stats['built']} shards built, {stats['skipped']} already there{added} "
          f"({len(keys)} utterances)")
    return stats


def command() -> int:
    """The `esrt-encode-cache` console command (`main` returns the build's counts)."""
    main()
    return 0


if __name__ == "__main__":
    main()
