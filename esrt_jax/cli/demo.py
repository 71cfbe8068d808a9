"""`python -m esrt_jax.data.demo` / `esrt-demo-corpus`: build the offline demo corpus (see `esrt_jax.data.demo`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from esrt_jax.data import demo
from esrt_jax.data.demo import AUDIO_FORMATS, DemoCorpusError, build_demo_corpus, default_demo_dir, demo_sentences


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esrt_jax.data.demo", description=demo.__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output dir (default {default_demo_dir()})")
    p.add_argument("--langs", default=None, help=f"comma-separated subset of {','.join(demo_sentences.LANGS)}")
    p.add_argument("--voices-per-lang", type=int, default=2)
    p.add_argument("--max-sentences", type=int, default=None)
    p.add_argument("--format", dest="audio_format", choices=sorted(AUDIO_FORMATS), default="flac")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        out = build_demo_corpus(
            a.out,
            langs=a.langs.split(",") if a.langs else None,
            voices_per_lang=a.voices_per_lang,
            max_sentences=a.max_sentences,
            audio_format=a.audio_format,
            workers=a.workers,
            force=a.force,
            progress=not a.quiet,
        )
    except DemoCorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "counts": manifest["counts"], "audio_seconds": manifest["audio_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
