"""Training: mesh + logical-axis rules, optimizer, pure train step, Orbax checkpoints, loop, CLI.

Entry point: `python train.py --stage=asr|smt|srt|all --config configs/X.yaml` (run.py).
`restore` loads a trained run back into a model for inference, serving, evaluation and export.
"""
