"""`python -m esrt_jax.data.prepare_fleurs` / `esrt-prepare-fleurs`: a local FLEURS copy -> ESRT JSONL
(see `esrt_jax.data.prepare_fleurs`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from esrt_jax.data import prepare_fleurs as pf
from esrt_jax.data.prepare_fleurs import SPLITS, FleursError, prepare


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=pf.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=pf.__doc__.split("\n\n", 2)[2])
    ap.add_argument("--root", required=True, help="local FLEURS folder (en_us/, de_de/, ...)")
    ap.add_argument("--langs", required=True, help="comma-separated ISO 639-3 codes, e.g. eng,deu")
    ap.add_argument("--out", required=True, help="output folder for {split}.jsonl")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--max-per-direction", type=int, default=0, help="0 = no cap")
    ap.add_argument("--text", default="raw", choices=("raw", "normalized"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        s = prepare(a.root, [x for x in a.langs.split(",") if x.strip()], a.out,
                    splits=[x for x in a.splits.split(",") if x.strip()],
                    max_per_direction=a.max_per_direction, text=a.text, seed=a.seed)
    except FleursError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s["extracted"]:
        print(f"extracted {s['extracted']} clips from the audio/<split>.tar.gz archives")
    print(", ".join(f"{k}: {v} records" for k, v in s["splits"].items()) + f" -> {a.out}")
    if s["missing_audio"] or s["missing_translation"]:
        print(f"left out: {s['missing_audio']} utterances without audio, "
              f"{s['missing_translation']} (utterance, target) pairs without a translation"
              + (f"; e.g. {s['examples'][0]}" if s["examples"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
