"""The edge half (Whisper encoder + Q-Former adapter [+ projector]) as an ONNX model.

    python -m esrt_jax.export --edge --format onnx --run RUN_DIR --out OUT [--int8] [--split S]

writes OUT/edge.onnx (fp32) and, with `--int8`, OUT/edge.int8.onnx (dynamic int8 weights,
`onnxruntime.quantization.quantize_dynamic`): mel (B, n_mels, frames) float32 -> features
(B, *feature_shape) float32, B dynamic (batch 1 and any small batch run the same file). The log-mel
front end stays in numpy on the device (`esrt_jax.audio`, no JAX needed). The graph has no input for
each clip's real length, so an adapter with `attend_padding: false` (the one configs/real_small.yaml
trains, `window_means`, `encoder_window: real`) is refused in one line (`require_full_window`): its
edge runs with `python -m esrt_jax.edge --runtime jax`.

The graph is written node by node from our params with `onnx.helper` (no tracing exporter): it
uses onnxruntime's fused CPU kernels from the `com.microsoft` domain where they exist -
`Attention` (packed QKV projection + softmax attention), `MultiHeadAttention` (the Q-Former's
cross-attention), `SkipLayerNormalization` (residual add + bias + LayerNorm in one pass, also
emitting the residual sum that Whisper's pre-LN blocks carry on), `BiasGelu` / `FastGelu`, `Gelu`
- so onnxruntime need not find the patterns itself, and `quantize_dynamic` turns every MatMul and
Attention into its int8 form. Why not jax2onnx or torch.onnx.export: jax2onnx needs an older
orbax than this project pins, and emits scanned layers as an ONNX Loop (slower: docs/edge-cloud.md);
torch.onnx.export would go through the HF torch modules (a torch install
at export time) and still need onnxruntime's transformers optimizer to find the fusions.

Metadata (`metadata_props`, read by `esrt_jax.edge --runtime onnx`): `esrt.fingerprint` (the model
fingerprint the service checks, `infer.cloud.model_fingerprint`), `esrt.split`,
`esrt.feature_shape`, `esrt.mel_shape` (JSON lists), `esrt.format` / `esrt.version`
(`infer.payload.EDGE_MODEL_FORMAT` / `EDGE_MODEL_VERSION`).
Models over 1.8 GB (whisper-large-v3's encoder) keep their weights in an external data file beside
the .onnx (`edge.onnx.data`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx  # this module is the `[onnx]` extra's: `cli.export` imports it only for --edge
from flax import nnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from esrt_jax.export.common import ExportError
from esrt_jax.files import os_error_line
from esrt_jax.infer.payload import EDGE_MODEL_FORMAT, EDGE_MODEL_VERSION
from esrt_jax.models.qformer import QFormerConfig, flat_params
from esrt_jax.models.whisper import WhisperEncoderConfig

OPSET = 17
MS = "com.microsoft"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; above this the weights go beside


class _Graph:
    """Nodes and initializers of one ONNX graph with unique names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], *, outputs: int = 1, domain: str = "", **attrs) -> list[str] | str:
        self.n += 1
        names = [f"{op.lower()}_{self.n}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(onnx.helper.make_node(op, inputs, names, name=f"{op}_{self.n}",
                                                   domain=domain or None, **attrs))
        return names if outputs > 1 else names[0]


def _flat_state(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every array of `module` (params and buffers) by dotted path, as float32 numpy."""
    return {".".join(map(str, p)): np.asarray(v[...], np.float32)
            for p, v in nnx.to_flat_state(nnx.state(module))}


def _gelu(g: _Graph, x: str, bias: str | None, act: str, where: str) -> str:
    """act(x + bias) with onnxruntime's fused kernels (exact erf GELU or its tanh form)."""
    if act == "gelu":
        return g.op("BiasGelu", [x, bias], domain=MS) if bias else g.op("Gelu", [x], domain=MS)
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return g.op("FastGelu", [x] + ([bias] if bias else []), domain=MS)
    raise ExportError(f"{where}: activation {act!r} has no ONNX export (gelu and its tanh forms do)")


def _skip_ln(g: _Graph, x: str, skip: str, scale: str, shift: str, bias: str | None, eps: float,
             *, with_sum: bool = False) -> tuple[str, str] | str:
    """LayerNorm(x + skip + bias); with `with_sum` also the sum itself (the residual stream)."""
    ins = [x, skip, scale, shift] + ([bias] if bias else [])
    if not with_sum:
        return g.op("SkipLayerNormalization", ins, domain=MS, epsilon=float(eps))
    out, _, _, total = g.op("SkipLayerNormalization", ins, outputs=4, domain=MS, epsilon=float(eps))
    return out, total


def _whisper(g: _Graph, p: Mapping[str, np.ndarray], cfg: WhisperEncoderConfig, mel: str) -> str:
    """mel (B, n_mels, 2P) -> encoder output (B, P, D) (`models.whisper.WhisperEncoder`)."""
    D, L, N = cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads
    eps = cfg.layer_norm_eps
    # Conv kernels (K, in, out) -> ONNX (out, in, K); the stem's GELU is always exact (as in HF).
    x = g.op("Conv", [mel, g.const("enc.conv1.w", p["conv1.kernel"].transpose(2, 1, 0)),
                      g.const("enc.conv1.b", p["conv1.bias"])], kernel_shape=[3], pads=[1, 1])
    x = g.op("Gelu", [x], domain=MS)
    x = g.op("Conv", [x, g.const("enc.conv2.w", p["conv2.kernel"].transpose(2, 1, 0)),
                      g.const("enc.conv2.b", p["conv2.bias"])], kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.op("Gelu", [x], domain=MS)
    x = g.op("Transpose", [x], perm=[0, 2, 1])
    x = g.op("Add", [x, g.const("enc.pos", p["embed_positions"])])
    b = "blocks."
    h = g.op("LayerNormalization", [x, g.const("enc.0.ln1.s", p[b + "self_attn_layer_norm.scale"][0]),
                                    g.const("enc.0.ln1.b", p[b + "self_attn_layer_norm.bias"][0])],
             axis=-1, epsilon=float(eps))
    for i in range(L):
        pre = f"enc.{i}."
        a = b + "self_attn."
        # q is scaled after its bias in HF/ours; Attention scales q.k by 1/sqrt(head_dim): the same.
        w_qkv = np.concatenate([p[a + "q_proj.kernel"][i], p[a + "k_proj.kernel"][i],
                                p[a + "v_proj.kernel"][i]], axis=1)
        b_qkv = np.concatenate([p[a + "q_proj.bias"][i], np.zeros(D, np.float32), p[a + "v_proj.bias"][i]])
        att = g.op("Attention", [h, g.const(pre + "qkv.w", w_qkv), g.const(pre + "qkv.b", b_qkv)],
                   domain=MS, num_heads=N)
        o = g.op("MatMul", [att, g.const(pre + "out.w", p[a + "out_proj.kernel"][i])])
        h2, x = _skip_ln(g, o, x, g.const(pre + "ln2.s", p[b + "final_layer_norm.scale"][i]),
                         g.const(pre + "ln2.b", p[b + "final_layer_norm.bias"][i]),
                         g.const(pre + "out.b", p[a + "out_proj.bias"][i]), eps, with_sum=True)
        f = g.op("MatMul", [h2, g.const(pre + "fc1.w", p[b + "fc1.kernel"][i])])
        f = _gelu(g, f, g.const(pre + "fc1.b", p[b + "fc1.bias"][i]), cfg.activation_function, "whisper")
        f = g.op("MatMul", [f, g.const(pre + "fc2.w", p[b + "fc2.kernel"][i])])
        fc2_b = g.const(pre + "fc2.b", p[b + "fc2.bias"][i])
        if i + 1 < L:  # the residual add feeds the next block's pre-LN: one fused kernel for both
            nxt = f"enc.{i + 1}."
            h, x = _skip_ln(g, f, x, g.const(nxt + "ln1.s", p[b + "self_attn_layer_norm.scale"][i + 1]),
                            g.const(nxt + "ln1.b", p[b + "self_attn_layer_norm.bias"][i + 1]),
                            fc2_b, eps, with_sum=True)
        else:  # the last residual add + the final LayerNorm
            x = _skip_ln(g, f, x, g.const("enc.ln.s", p["layer_norm.scale"]),
                         g.const("enc.ln.b", p["layer_norm.bias"]), fc2_b, eps)
    return x


def _dense(g: _Graph, p: Mapping[str, np.ndarray], x: str, name: str, *, bias: bool = True) -> str:
    y = g.op("MatMul", [x, g.const(name + ".w", p[name + ".kernel"])])
    return g.op("Add", [y, g.const(name + ".b", p[name + ".bias"])]) if bias else y


def _adapter(g: _Graph, p: Mapping[str, np.ndarray], cfg: QFormerConfig, enc: str, batch: str,
             split: str) -> str:
    """Encoder output (B, P, d_enc) -> Q-Former outputs (B, Q, H) [split "qformer"] or speech
    embeddings (B, Q', llm_dim) (`models.qformer.SpeechAdapter`; no mask: the window is full)."""
    N, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    q = g.op("LayerNormalization", [g.const("ad.query", p["query"]),
                                    g.const("ad.ln.s", p["qformer.layernorm.scale"]),
                                    g.const("ad.ln.b", p["qformer.layernorm.bias"])],
             axis=-1, epsilon=float(eps))
    shape = g.op("Concat", [batch, g.const("ad.qshape", np.asarray(p["query"].shape[1:], np.int64))], axis=0)
    x = g.op("Expand", [q, shape])
    for i in range(cfg.num_hidden_layers):
        pre = f"qformer.layers.{i}."
        a = pre + "attention."
        w_qkv = np.concatenate([p[a + k + ".kernel"] for k in ("query", "key", "value")], axis=1)
        b_qkv = np.concatenate([p[a + k + ".bias"] for k in ("query", "key", "value")])
        att = g.op("Attention", [x, g.const(a + "qkv.w", w_qkv), g.const(a + "qkv.b", b_qkv)],
                   domain=MS, num_heads=N)
        x = _skip_ln(g, _dense(g, p, att, a + "out", bias=False), x, g.const(a + "norm.s", p[a + "norm.scale"]),
                     g.const(a + "norm.b", p[a + "norm.bias"]), g.const(a + "out.b", p[a + "out.bias"]), eps)
        if cfg.has_cross_attention(i):
            c = pre + "crossattention."
            qkv = [_dense(g, p, src, c + k) for src, k in ((x, "query"), (enc, "key"), (enc, "value"))]
            att = g.op("MultiHeadAttention", qkv, domain=MS, num_heads=N)
            x = _skip_ln(g, _dense(g, p, att, c + "out", bias=False), x,
                         g.const(c + "norm.s", p[c + "norm.scale"]), g.const(c + "norm.b", p[c + "norm.bias"]),
                         g.const(c + "out.b", p[c + "out.bias"]), eps)
        f = _gelu(g, _dense(g, p, x, pre + "ffn_in", bias=False), g.const(pre + "ffn_in.b", p[pre + "ffn_in.bias"]),
                  cfg.hidden_act, "Q-Former")
        x = _skip_ln(g, _dense(g, p, f, pre + "ffn_out", bias=False), x,
                     g.const(pre + "ffn_norm.s", p[pre + "ffn_norm.scale"]),
                     g.const(pre + "ffn_norm.b", p[pre + "ffn_norm.bias"]),
                     g.const(pre + "ffn_out.b", p[pre + "ffn_out.bias"]), eps)
    if split == "qformer":
        return x
    if cfg.pool_k is not None:
        k = cfg.pool_k
        x = g.op("Reshape", [x, g.const("ad.pool", np.asarray([0, cfg.num_queries // k, k, cfg.hidden_size],
                                                              np.int64))])
        x = g.op("ReduceMean", [x], axes=[2], keepdims=0)
    if cfg.projector_mid is None:
        x = _dense(g, p, x, "linear")
    else:
        x = _dense(g, p, g.op("Relu", [_dense(g, p, x, "linear1")]), "linear2")
    return g.op("LayerNormalization", [x, g.const("ad.norm.s", p["norm.scale"]), g.const("ad.norm.b", p["norm.bias"])],
                axis=-1, epsilon=float(cfg.projector_eps))


def require_full_window(cfg: Any) -> None:
    """The graph's only input is the mel and its cross-attention attends over every encoder frame:
    an adapter with attend_padding false (window_means, window_queries, `encoder_window: real`
    included) needs each clip's real frames, which it cannot get; refuse before writing anything."""
    a = cfg.adapter
    if not a.attend_padding:
        how = ("window means" if a.window_means else "windowed queries" if a.window_queries else "cross-attention")
        how += ", real-length encoder windows" if cfg.encoder_window == "real" else ""
        raise ExportError(f"--edge --format onnx: this model's adapter has attend_padding: false ({how} over each "
                          f"clip's real encoder frames), and the ONNX edge graph takes only the mel, not those "
                          f"lengths; run its edge half with `python -m esrt_jax.edge --runtime jax` instead")


def edge_model_proto(half: Any, fingerprint: str, split: str | None = None):
    """An `EdgeHalf` (or `SpeechLLM`: its encoder, adapter and config) -> `onnx.ModelProto`:
    mel (B, n_mels, frames) -> features (B, *feature_shape), with the metadata above."""
    helper = onnx.helper
    cfg = half.config
    split = split or cfg.split
    if split not in ("qformer", "projector"):
        raise ExportError(f"unknown split point {split!r}; use qformer or projector")
    enc_cfg, ad_cfg = cfg.encoder, cfg.adapter
    require_full_window(cfg)
    g = _Graph()
    mel = "mel"
    batch = g.op("Shape", [mel], start=0, end=1)
    x = _whisper(g, _flat_state(half.encoder), enc_cfg, mel)
    feats = _adapter(g, flat_params(half.adapter), ad_cfg, x, batch, split)
    g.nodes.append(helper.make_node("Identity", [feats], ["features"], name="features"))
    fshape = list(cfg.feature_shape(split))
    mel_shape = [enc_cfg.num_mel_bins, enc_cfg.num_frames]
    graph = helper.make_graph(
        g.nodes, "esrt_edge",
        [helper.make_tensor_value_info(mel, onnx.TensorProto.FLOAT, ["batch", *mel_shape])],
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", *fshape])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="esrt-jax", doc_string="ESRT edge half: log-mel -> features")
    model.ir_version = 8
    meta = {"esrt.format": EDGE_MODEL_FORMAT, "esrt.version": str(EDGE_MODEL_VERSION),
            "esrt.fingerprint": fingerprint, "esrt.split": split, "esrt.feature_shape": json.dumps(fshape),
            "esrt.mel_shape": json.dumps(mel_shape)}
    helper.set_model_props(model, meta)
    return model


def save_model(model, path: str | os.PathLike) -> Path:
    """Write `model`; weights over `EXTERNAL_DATA_BYTES` go to `<name>.data` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    (path.parent / (path.name + ".data")).unlink(missing_ok=True)  # onnx appends to an existing one
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)
    return path


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 weight quantisation (MatMul and Attention weights; activations quantised at
    run time) of the fp32 edge model at `src`; quantize_dynamic keeps the metadata."""
    src, dst = Path(src), Path(dst)
    big = (src.parent / (src.name + ".data")).exists()
    (dst.parent / (dst.name + ".data")).unlink(missing_ok=True)  # onnx appends to an existing one
    # DefaultTensorType: shape inference cannot type the outputs of com.microsoft ops; all are f32
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
                     use_external_data_format=big,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


def export_edge_onnx(half: Any, fingerprint: str, out: str | os.PathLike, *, split: str | None = None,
                     int8: bool = False) -> dict[str, Path]:
    """Write OUT/edge.onnx (and OUT/edge.int8.onnx with `int8`) -> {"fp32": path[, "int8": path]}.

    Everything is written into a temporary folder inside OUT first and renamed into place only when
    complete (weights file before graph), so a full disk or a failed quantisation never leaves a
    truncated model under a final name; the temporary folder (and quantize_dynamic's intermediate
    `*-inferred.onnx`) is removed either way. An OSError becomes an ExportError with its one-line cause."""
    out = Path(out)
    require_full_window(half.config)  # before OUT is made
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".edge-tmp-", dir=out))
    try:
        names = {"fp32": "edge.onnx"}
        save_model(edge_model_proto(half, fingerprint, split), stage / names["fp32"])
        if int8:
            names["int8"] = "edge.int8.onnx"
            quantize_int8(stage / names["fp32"], stage / names["int8"])
        for name in names.values():
            for f in (stage / (name + ".data"), stage / name):  # weights first: a graph never points at none
                if f.exists():
                    os.replace(f, out / f.name)
                elif f.name.endswith(".data"):
                    (out / f.name).unlink(missing_ok=True)  # a stale one of an earlier, bigger export
        return {k: out / v for k, v in names.items()}
    except OSError as e:
        raise ExportError(f"writing the edge model to {out}: {os_error_line(e)}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
