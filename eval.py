"""Evaluate speech translation.

    python eval.py --config CONFIG --checkpoint RUN_DIR [--data test.jsonl] [--src ..] [--tgt ..]
                   [--beam 5] [--batch 64] [--limit N] [--out DIR]     # decode a test set, then score it
    python eval.py --score results.jsonl [--out DIR] [--compare other.jsonl]   # score an existing file

See esrt_jax/cli/eval.py for the options.
"""

import sys

from esrt_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
