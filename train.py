"""Train the speech LLM: `python train.py --stage=asr|smt|srt|all --config configs/demo.yaml`.

See esrt_jax/cli/train.py for the options (`--set k=v`, `--init-from`, `--dry-run`, ...).
"""

from esrt_jax.cli.train import main

if __name__ == "__main__":
    main()
