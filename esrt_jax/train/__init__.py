"""Training: mesh + logical-axis rules, optimizer, pure train step, Orbax checkpoints, loop.

The command is `esrt_jax.cli.train` (`python train.py --stage=asr|smt|srt|all --config configs/X.yaml`).
`restore` finds checkpoints and restores trained params; the speech system (model, data, loading
a run for inference) is `esrt_jax.speech`, one layer up: this package imports none of it.
"""
