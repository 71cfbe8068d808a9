"""`python -m esrt_jax.data.tfds_builder` / `esrt-tfds`: record sources -> a TFDS dataset (see `esrt_jax.data.tfds_builder`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from esrt_jax.data import tfds_builder as tb
from esrt_jax.data.records import open_source
from esrt_jax.data.tfds_builder import write_tfds


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=tb.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", required=True,
                    help="a source (JSONL, datasets folder, parquet), optionally PATH:SPLIT")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--embed-audio", action="store_true", help="store the audio files' bytes")
    args = ap.parse_args(argv)
    splits = {}
    for spec in args.src:
        path, split = spec, None
        if ":" in spec and not os.path.exists(spec):
            path, split = spec.rsplit(":", 1)
        split = split or Path(path).stem
        if split in splits:
            raise SystemExit(f"split {split!r} given twice; name it with PATH:SPLIT")
        splits[split] = list(open_source(path))
    d = write_tfds(splits, args.out, embed_audio=args.embed_audio)
    print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in splits.items())} records to {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
