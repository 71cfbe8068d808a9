"""Tiny HF LLMs for the family parity tests: a saved torch model beside ours, and one
left-padded batch."""

import numpy as np
import torch

from esrt_jax.convert.llm import load_hf_model
from esrt_jax.models import llm


def tiny_hf_pair(cls, hc, d):
    """HF model class + config -> (torch model, d, our config, our model): seeded torch weights with
    norms and biases moved off their init (so their mapping is really tested), saved to `d`."""
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = cls(hc).eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    tm.save_pretrained(d)
    cfg = llm.config_from_hf(hc)
    return tm, d, cfg, load_hf_model(d, cfg=cfg)


def left_padded_batch(B: int = 3, T: int = 16, vocab: int = 256):
    """(ids, mask, positions) (B, T): rows 1 and 2 left-padded by 5 and 11."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :5] = False
    mask[2, :11] = False
    ids[~mask] = 0
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    return ids, mask, pos
