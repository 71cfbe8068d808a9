"""Evaluate speech-translation results: `python eval.py --score results.jsonl [--out DIR] [--compare other.jsonl]`.

See esrt_jax/eval/cli.py for the options.
"""

import sys

from esrt_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
