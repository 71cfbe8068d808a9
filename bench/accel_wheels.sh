#!/usr/bin/env bash
# The wheels bench/accel.py needs on the GPU image (Python 3.12, x86-64) beyond what it holds
# (/work/.library/device/KINDS.md lists the image: jax 0.11, flax, optax, orbax-checkpoint,
# transformers 5.x, torch 2.11, peft, sacrebleu, ... are there). They come from the import closure of
# the model builder (esrt_jax.speech.build: data pipeline, metrics, audio) and train.loop
# (tensorboardX). ~19 MB. Run here (PyPI reachable), in the repo root; .whl/ is git-ignored locally.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 jiwer==4.0.0 rapidfuzz==3.14.6 \
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 espeakng-loader==0.2.4 tensorboardX==2.6.5
