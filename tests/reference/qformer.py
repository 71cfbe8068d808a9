"""PyTorch reference of LLM-SRT's speech adapter, with LLM-SRT's attribute names (written for the
parity tests; the benches use it too): `torch_reference(cfg)` -> a module whose state dict carries
LLM-SRT's `encoder_projector.*` keys, `numpy_state_dict(module)`."""

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from esrt_jax.models.qformer import QFormerConfig


class EncoderProjectorQFormer(nn.Module):
    """LLM-SRT's plain adapter: queries -> Blip2QFormerModel -> Linear / MLP chosen by llm_dim -> LayerNorm."""

    def __init__(self, qformer_config: Blip2QFormerConfig, query_len: int, llm_dim: int):
        super().__init__()
        hidden = qformer_config.hidden_size
        self.llm_dim = llm_dim
        self.query = nn.Parameter(torch.randn(1, query_len, hidden))
        self.qformer = Blip2QFormerModel(qformer_config)
        if llm_dim <= 1536:
            self.linear = nn.Linear(hidden, llm_dim)
        else:
            mid = 1536 if llm_dim <= 2560 else 2560
            self.linear1 = nn.Linear(hidden, mid)
            self.relu = nn.ReLU()
            self.linear2 = nn.Linear(mid, llm_dim)
        self.norm = nn.LayerNorm(llm_dim, eps=1e-5)

    def qformer_out(self, x, atts):
        query = self.query.expand(x.shape[0], -1, -1)
        return self.qformer(query_embeds=query, encoder_hidden_states=x,
                            encoder_attention_mask=atts).last_hidden_state

    def mlp(self, h):
        if self.llm_dim <= 1536:
            return self.linear(h)
        return self.linear2(self.relu(self.linear1(h)))

    def forward(self, x, atts=None):
        return self.norm(self.mlp(self.qformer_out(x, atts)))


class EncoderProjectorQFormerPool(EncoderProjectorQFormer):
    """LLM-SRT's pooled adapter: Q-Former outputs mean-pooled over windows of k, then a 2560-wide MLP."""

    def __init__(self, qformer_config: Blip2QFormerConfig, query_len: int, llm_dim: int, k: int):
        nn.Module.__init__(self)
        hidden = qformer_config.hidden_size
        self.llm_dim, self.k = llm_dim, k
        self.query = nn.Parameter(torch.randn(1, query_len, hidden))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.linear1 = nn.Linear(hidden, 2560)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(2560, llm_dim)
        self.norm = nn.LayerNorm(llm_dim, eps=1e-5)

    def forward(self, x, atts=None):
        h = self.qformer_out(x, atts)
        b, n, d = h.shape
        h = h[:, : n - n % self.k].reshape(b, n // self.k, self.k, d).mean(2)
        return self.norm(self.linear2(self.relu(self.linear1(h))))


class SlamModel(nn.Module):
    """Stands in for LLM-SRT's model object, so that state-dict keys carry `encoder_projector.`."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.encoder_projector = projector


def torch_reference(cfg: QFormerConfig, seed: int = 0) -> SlamModel:
    torch.manual_seed(seed)
    qcfg = Blip2QFormerConfig(**cfg.to_hf_config(), attn_implementation="eager")
    if cfg.pool_k is None:
        proj = EncoderProjectorQFormer(qcfg, cfg.num_queries, cfg.llm_dim)
    else:
        proj = EncoderProjectorQFormerPool(qcfg, cfg.num_queries, cfg.llm_dim, cfg.pool_k)
    with torch.no_grad():
        for name, p in proj.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layernorm" in name or "norm." in name:
                p.add_(0.1 * torch.randn_like(p))
    return SlamModel(proj).eval()


def numpy_state_dict(module: nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
