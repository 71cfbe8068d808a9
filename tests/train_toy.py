"""A small real model + Grain data for testing the training infrastructure (tests only).

Frozen "encoder" Dense (features -> embed), trainable adapter MLP with dropout, trainable
classification head over a small vocab; masked token cross-entropy, like the speech LLM's
loss. Labels come from a fixed random teacher so the loss really goes down.
Builders follow the `model.builder` / `data.builder` contracts of esrt_jax/cli/train.py.
"""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esrt_jax.models.layers import Dense
from esrt_jax.train.bundle import split_nnx

F, D, M, V, T = 8, 16, 32, 16, 4   # features, embed, mlp, vocab, tokens per example


class Toy(nnx.Module):
    def __init__(self, mlp: int = M, *, rngs: nnx.Rngs):
        self.encoder = Dense(F, D, axes=("conv_in", "embed"), rngs=rngs)
        self.adapter_in = Dense(D, mlp, axes=("embed", "mlp"), rngs=rngs)
        self.adapter_out = Dense(mlp, D, axes=("mlp", "embed"), rngs=rngs)
        self.head = Dense(D, V, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, x, rng=None, rate=0.1):
        h = jnp.tanh(self.encoder(x))
        a = jax.nn.gelu(self.adapter_in(h))
        if rng is not None:
            keep = jax.random.bernoulli(rng, 1 - rate, a.shape)
            a = jnp.where(keep, a / (1 - rate), 0)
        return self.head(h + self.adapter_out(a))


def module_loss(model, batch, rng):
    logits = model(batch["x"], rng).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
    mask = batch["mask"].astype(jnp.float32)
    tokens = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(tokens, 1.0)
    acc = ((logits.argmax(-1) == batch["labels"]) * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"tokens": tokens, "accuracy": acc}


def build_model(cfg, *, abstract: bool = False):
    """model.builder: returns a TrainBundle (trainable: adapter + head by default)."""
    seed, mlp = int(cfg.model.get("seed", 0)), int(cfg.model.get("mlp", M))  # model.mlp: a shape-changing key
    make = lambda: Toy(mlp, rngs=nnx.Rngs(seed))  # noqa: E731
    model = nnx.eval_shape(make) if abstract else make()
    patterns = cfg.train.trainable or ("^adapter_", "^head/")
    loss = module_loss
    if cfg.model.get("deaf"):  # a model that ignores its input (for the dev audio-gap check)
        loss = lambda m, b, r: module_loss(m, {**b, "x": 0.0 * b["x"]}, r)  # noqa: E731
    bundle, _ = split_nnx(model, patterns, loss)
    bundle.speech_keys = ("x",)
    bundle.batch_spec = lambda rows: {
        "x": jax.ShapeDtypeStruct((rows, T, F), jnp.float32),
        "labels": jax.ShapeDtypeStruct((rows, T), jnp.int32),
        "mask": jax.ShapeDtypeStruct((rows, T), jnp.int32)}
    return bundle


def _record(i: int) -> dict:
    r = np.random.default_rng(1000 + int(i))
    x = r.normal(size=(T, F)).astype(np.float32)
    teacher = np.random.default_rng(7).normal(size=(F, V))
    labels = (x @ teacher).argmax(-1).astype(np.int32)
    mask = np.ones((T,), np.int32)
    mask[r.integers(1, T + 1):] = 0
    return {"x": x, "labels": labels, "mask": mask}


def build_data(cfg, split: str, *, process_index: int, process_count: int):
    """data.builder: per-process rows of each global batch; train is infinite + checkpointable."""
    gb = cfg.train.batch_size
    n = int(cfg.data.get("size", 256))
    if split == "train":
        ds = grain.MapDataset.range(n).shuffle(seed=cfg.train.seed).repeat(None).map(_record).batch(gb)
    else:
        ds = grain.MapDataset.range(n, n + 64).map(_record).batch(gb)
    per = gb // process_count
    ds = ds.map(lambda b: {k: v[process_index * per:(process_index + 1) * per] for k, v in b.items()})
    if split == "train":
        return iter(ds.to_iter_dataset())
    return ds


# A run config of this toy (model.builder / data.builder above), for the trainer's tests.
TOY = {"model": {"builder": "train_toy:build_model"},
       "data": {"builder": "train_toy:build_data", "size": 128},
       "train": {"steps": 5, "batch_size": 8, "lr": 0.05, "warmup_steps": 1, "ckpt_every": 5,
                 "log_every": 1, "keep": 2, "progress": False, "eval_batches": 1}}


def toy_yaml(tmp_path, **train):
    """TOY with `train` overrides written to tmp_path/toy.yaml (JSON is YAML) -> its path."""
    d = json.loads(json.dumps(TOY))
    d["train"].update(train)
    y = tmp_path / "toy.yaml"
    y.write_text(json.dumps(d))
    return y
