"""The speech LLM's training wiring: the default `model.builder` and `data.builder`, the dev
decodes during training, and `build_inference` (the model and tokenizer for serving).

The `model:` block is read by `esrt_jax.speech.config`.

Trainable by default: the adapter (Q-Former + projector) and, with `lora.enabled`, the LoRA
factors; the encoder and the LLM base weights are frozen (`train.trainable` overrides).

Data block (`data:`): the keys of `esrt_jax.data.pipeline.DataConfig` (batch size comes from
`train.batch_size`) plus `dev: [sources]` for dev loss / decodes and `demo: true` to use the
offline demo corpus (built on first use) for both; `demo_voices: n` espeak voices per language
(default 2; the corpus covers `languages`). With `demo_heldout_clips: true` (and optionally
`demo_sentences: n`, the first n training sentences) each training sentence is held out in one
voice (the eval set) and, with 3+ voices, in a second one (the dev set; with 2 voices dev is the
eval set), and trained in the others (`esrt_jax.data.demo.clip_split`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from esrt_jax import languages
from esrt_jax.audio import N_FRAMES
from esrt_jax.config import ConfigError, from_dict
from esrt_jax.convert.llm import load_hf_model
from esrt_jax.convert.tokenizer import check_vocab, load_tokenizer, unit_token_ids
from esrt_jax.convert.whisper import load_whisper_encoder
from esrt_jax.data.demo import clip_split, demo_corpus_for
from esrt_jax.data.encode_cache import FeatureCache, encoder_fingerprint
from esrt_jax.data.pipeline import DataConfig, make_eval_batches, make_train_dataset, open_sources
from esrt_jax.data.records import JsonlSource, ListSource
from esrt_jax.data.tasks import TaskTokenizer, get_task
from esrt_jax.infer.translator import Translator
from esrt_jax.metrics import asr_error, bleu, distinct_share, normalize_transcript
from esrt_jax.models import speech_llm
from esrt_jax.models.layers import dtype_from_name
from esrt_jax.models.qformer import SpeechAdapter
from esrt_jax.models.speech_llm import SpeechLLM, batch_mel
from esrt_jax.models.whisper import WhisperEncoder
from esrt_jax.pytree import merge_trees, swap_partners, swap_rows
from esrt_jax.speech import align
from esrt_jax.speech.config import SpeechDataConfig, SpeechModelConfig, generation_config, speech_config
from esrt_jax.train import mesh as mesh_lib
from esrt_jax.train.bundle import TrainBundle, split_nnx
from esrt_jax.train.config import RunConfig

BATCH_KEYS = ("mel", "audio", "enc", "enc_frames", "tokens", "loss_mask", "attention_mask", "ctc_labels",
              "ctc_paddings")


# ----------------------------------------------------------------------------- tokenizer

def demo_dir(cfg: RunConfig) -> Path:
    return demo_corpus_for(cfg.data, progress=jax.process_index() == 0)


@functools.lru_cache(maxsize=4)
def demo_tokenizer(demo_dir: str, vocab_size: int):
    """A byte-level BPE trained (deterministically, offline) on the demo corpus text + tags."""
    texts: list[str] = []
    tags = set()
    for r in JsonlSource(Path(demo_dir) / "train.jsonl", strict=True):
        texts += [r.transcription, r.translation]
        tags.add(languages.srt_marker(r.src, r.tgt))
    texts += sorted(tags)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tokenizer_for(cfg: RunConfig):
    m = SpeechModelConfig.of(cfg)
    spec = m.tokenizer or m.llm
    if spec == "demo":
        tok = demo_tokenizer(str(demo_dir(cfg)), m.tokenizer_vocab)
    elif spec:
        tok = load_tokenizer(spec)
    else:
        raise ConfigError("model.tokenizer: needed when model.llm is not a local HF dir "
                          "(a tokenizer dir, or 'demo')")
    check_vocab(tok, speech_config(cfg).llm.vocab_size, where=spec)
    return tok


# ----------------------------------------------------------------------------- model

def build_inference(cfg: RunConfig, *, abstract: bool = False):
    """(SpeechLLM with its pretrained / seeded random weights, tokenizer), on the default device
    (serving need not have the training mesh's devices)."""
    model = _build_module(cfg, abstract=abstract)
    return model, (None if abstract else tokenizer_for(cfg))


def _build_module(cfg: RunConfig, *, abstract: bool, on_mesh: bool = False):
    """The SpeechLLM of `cfg`; with `on_mesh`, a loaded LLM is placed on the run's mesh."""
    m = SpeechModelConfig.of(cfg)
    scfg = m.resolve(cfg.lora.model_lora(), speech_units(cfg))
    seed = m.seed
    make = lambda: SpeechLLM(scfg, rngs=nnx.Rngs(seed))  # noqa: E731
    if abstract:
        return nnx.eval_shape(make)
    if not m.whisper and not m.llm:
        return make()
    rngs = nnx.Rngs(seed)
    enc = (load_whisper_encoder(m.whisper, dtype=scfg.encoder.dtype, scan_layers=scfg.encoder.scan_layers)
           if m.whisper else WhisperEncoder(scfg.encoder, rngs=rngs))
    adapter = SpeechAdapter(scfg.adapter, rngs=rngs)
    if m.llm:
        # The one LLM loader: streams tensor by tensor (onto the training mesh: each parameter
        # created on its NamedSharding), so a 12B model never sits whole in one device's memory.
        llm = load_hf_model(m.llm, cfg=scfg.llm, lora=scfg.lora, dtype=dtype_from_name(scfg.llm_dtype),
                            param_dtype=dtype_from_name(scfg.llm_param_dtype), scan_layers=scfg.scan_layers,
                            remat=scfg.remat, seed=seed,
                            mesh=mesh_lib.make_mesh(cfg.mesh) if on_mesh else None,
                            rules=mesh_lib.make_rules(cfg.mesh.rules))
    else:
        llm = make().llm
    return SpeechLLM.from_parts(scfg, enc, adapter, llm)


def speech_units(cfg: RunConfig) -> tuple[int, ...]:
    """With `model.interface: ctc_chars`, the LLM token ids of the align stage's CTC units (read
    from the training transcripts and the tokenizer); else ()."""
    if SpeechModelConfig.of(cfg).interface != "ctc_chars":
        return ()
    return unit_token_ids(tokenizer_for(cfg), align_units(cfg))


def default_trainable(cfg: RunConfig) -> tuple[str, ...]:
    pats = ("^adapter/", "^ctc_head/") if SpeechModelConfig.of(cfg).interface == "ctc_chars" else ("^adapter/",)
    return pats + (r"/lora_[ab]$",) if cfg.lora.enabled else pats


def _model_flops_per_example(scfg, text_len: int) -> float:
    """6 N T for the trained path + 2 N T for the frozen encoder (fwd only), + attention."""
    e, a, l = scfg.encoder, scfg.adapter, scfg.llm
    T_enc = e.max_source_positions
    enc_params = e.encoder_layers * (4 * e.d_model ** 2 + 2 * e.d_model * e.encoder_ffn_dim)
    enc = 2 * enc_params * T_enc + e.encoder_layers * 4 * T_enc ** 2 * e.d_model
    T_llm = a.num_output_tokens + text_len
    d, f, L = l.hidden_size, l.intermediate_size, l.num_hidden_layers
    hd = getattr(l, "head_dim", None) or d // l.num_attention_heads
    attn_p = d * hd * (l.num_attention_heads * 2 + l.num_key_value_heads * 2)
    llm_params = L * (attn_p + 3 * d * f) + d * l.vocab_size
    q = a.hidden_size
    ad_params = a.num_hidden_layers * (4 * q * q + 2 * q * a.intermediate_size) + \
        (a.num_hidden_layers + 1) // a.cross_attention_frequency * 2 * q * e.d_model
    # LLM: forward + backward through activations (weights frozen unless LoRA): ~4 N T; adapter 6 N T.
    return enc + 4 * llm_params * T_llm + 4 * L * T_llm ** 2 * d + 6 * ad_params * a.num_queries


def build_model(cfg: RunConfig, *, abstract: bool = False) -> TrainBundle:
    """model.builder: the speech LLM as a TrainBundle (loss = speech_llm.loss_fn); in the align
    stage the adapter + CTC head without the LLM (`esrt_jax.speech.align`)."""
    if cfg.stage == "align":
        return _build_align(cfg, abstract=abstract)
    model = _build_module(cfg, abstract=abstract, on_mesh=True)
    scfg = model.config

    p_drop = cfg.train.token_dropout
    # abstract (the dry run) reads no tokenizer: any id compiles the same step
    pad_id = (0 if abstract else _pad_id(cfg)) if p_drop else None
    # the answer-only loss compacts answers within each batch shard's rows (keeps them local)
    row_groups = mesh_lib.batch_divisor(mesh_lib.make_mesh(cfg.mesh), mesh_lib.make_rules(cfg.mesh.rules))

    def module_loss(m, batch, rng):
        if p_drop and rng is not None:
            rng, drop_rng = jax.random.split(rng)
            drop = jax.random.bernoulli(drop_rng, p_drop, batch["tokens"].shape) & (batch["loss_mask"] > 0)
            batch = {**batch, "input_tokens": jnp.where(drop, pad_id, batch["tokens"])}
        loss, aux = speech_llm.loss_fn(m, batch, dropout_rng=rng, row_groups=row_groups)
        return loss, {"accuracy": aux["accuracy"], "tokens": aux["tokens"]}

    bundle, graphdef = split_nnx(model, cfg.train.trainable or default_trainable(cfg), module_loss)
    buckets = tuple(cfg.data.get("text_buckets", (64, 128, 256)))
    if cfg.data.get("enc_frame_bucket") and scfg.adapter.attend_padding:
        raise ConfigError("data.enc_frame_bucket cuts the padding off the encoder output, but "
                          "model.adapter.attend_padding is true (LLM-SRT: the adapter attends over the "
                          "padding); set model.adapter.attend_padding: false or drop data.enc_frame_bucket")
    # Training checks its data now; an abstract build (restoring params for inference, export,
    # import: no data at hand) only when a batch is shaped (the dry run).
    feat = None if abstract else _speech_input(cfg, scfg, model.encoder)
    bundle.batch_spec = lambda rows: {
        **_rows(rows, feat or _speech_input(cfg, scfg, None)),
        "enc_frames": jax.ShapeDtypeStruct((rows,), jnp.int32),
        "tokens": jax.ShapeDtypeStruct((rows, max(buckets)), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((rows, max(buckets)), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((rows, max(buckets)), jnp.int32)}
    bundle.flops_per_example = _model_flops_per_example(scfg, max(buckets))
    bundle.speech_keys = ("mel", "audio", "enc", "enc_frames")
    bundle.row_refs = functools.partial(_row_refs, "tokens", "loss_mask")
    if not abstract:
        bundle.decode_fn = _decoder(cfg, graphdef, nnx.state(model))
    return bundle


@functools.lru_cache(maxsize=4)
def _char_units(train_specs: tuple[str, ...]) -> tuple[str, ...]:
    src = open_sources(list(train_specs))
    return align.char_units(src[i].transcription for i in range(len(src)))


def align_units(cfg: RunConfig) -> tuple[str, ...]:
    """The align stage's CTC units: the characters of the training transcripts."""
    return _char_units(tuple(_data_config(cfg, ctc=False).train))


def _build_align(cfg: RunConfig, *, abstract: bool) -> TrainBundle:
    """The align stage's bundle: frozen encoder (unless the batches carry cached encoder output),
    adapter and CTC head; no LLM layer is built."""
    scfg = speech_config(cfg)
    m = SpeechModelConfig.of(cfg)
    acfg = from_dict(align.AlignConfig, dict(m.align), prefix="model.align")
    units = align_units(cfg)
    cached = bool(cfg.data.get("encoder_cache"))
    seed = m.seed

    def make(load: bool):
        rngs = nnx.Rngs(seed)
        enc = None
        if not cached:
            enc = (load_whisper_encoder(m.whisper, dtype=scfg.encoder.dtype,
                                        scan_layers=scfg.encoder.scan_layers)
                   if load and m.whisper else WhisperEncoder(scfg.encoder, rngs=rngs))
        return align.AlignModel(enc, SpeechAdapter(scfg.adapter, rngs=rngs), acfg, len(units), rngs=rngs)

    model = nnx.eval_shape(lambda: make(False)) if abstract else make(True)
    bundle, graphdef = split_nnx(model, cfg.train.trainable or align.TRAINABLE, align.loss)
    a = scfg.adapter
    feat = None if abstract else _speech_input(cfg, scfg, None)  # as build_model's
    labels = max(tuple(cfg.data.get("text_buckets", (64, 128, 256))))
    bundle.batch_spec = lambda rows: {
        **_rows(rows, feat or _speech_input(cfg, scfg, None)),
        "enc_frames": jax.ShapeDtypeStruct((rows,), jnp.int32),
        "ctc_labels": jax.ShapeDtypeStruct((rows, labels), jnp.int32),
        "ctc_paddings": jax.ShapeDtypeStruct((rows, labels), jnp.float32)}
    ad_params = a.num_hidden_layers * (4 * a.hidden_size ** 2 + 2 * a.hidden_size * a.intermediate_size)
    bundle.flops_per_example = 6 * ad_params * a.num_queries
    bundle.speech_keys = align.SPEECH_KEYS
    bundle.row_refs = functools.partial(_row_refs, "ctc_labels", "ctc_paddings", padding=True)
    if not abstract and _dev_source(cfg) is not None:
        bundle.decode_fn = align.decoder(graphdef, nnx.state(model), units, _align_dev_batches(cfg))
    return bundle


def _row_refs(key: str, mask_key: str, batch: dict, padding: bool = False) -> list:
    """Each dev row's reference for the swap rule: its supervised target ids (`batch[key]` where
    `batch[mask_key]` marks them; the mask marks padding instead when `padding`); None for a row
    with no target (eval padding)."""
    ids, mask = np.asarray(batch[key]), np.asarray(batch[mask_key]) > 0
    if padding:
        mask = ~mask
    return [tuple(r[m].tolist()) or None for r, m in zip(ids, mask)]


def _align_dev_batches(cfg: RunConfig):
    def dev_batches(n: int):
        dev = _dev_source(cfg)
        dc = _data_config(cfg, batch_size=n)
        batch = next(make_eval_batches(dc, tokenizer_for(cfg), dev, "asr", batch_size=n))
        rows = [int(i) for i in batch["record"] if i >= 0]
        return ({k: np.asarray(v[:len(rows)]) for k, v in _Select()(batch).items()
                 if k not in ("tokens", "loss_mask", "attention_mask")},
                [dev[i].transcription for i in rows])
    return dev_batches


def _speech_input(cfg: RunConfig, scfg, encoder) -> dict[str, tuple[tuple[int, ...], Any]]:
    """A batch's speech input, {name: (shape per row, dtype)}: the cached encoder output of
    data.encoder_cache (checked: against the encoder's weights when given, its window, and the
    lengths an attend_padding-false adapter needs), else the pipeline's 30 s mel (the step cuts it
    to the encoder's frames)."""
    e = scfg.encoder
    if not cfg.data.get("encoder_cache"):
        _no_cache_window(SpeechModelConfig.of(cfg))
        return {"mel": ((e.num_mel_bins, N_FRAMES), jnp.float32)}
    cache = _feature_cache(cfg, encoder)
    if not scfg.adapter.attend_padding and not cache.has_frames:
        raise ConfigError(f"data.encoder_cache: {cache.path} records no audio lengths (built by "
                          f"an older version), which model.adapter.attend_padding: false needs; "
                          f"rerun python -m esrt_jax.data.encode_cache on it (adds them, encodes nothing)")
    return {"enc": ((e.max_source_positions, e.d_model),
                    jnp.bfloat16 if cache.meta["dtype"] == "bfloat16" else jnp.float32)}


def _rows(rows: int, spec: dict) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((rows, *shape), dt) for k, (shape, dt) in spec.items()}


def _feature_cache(cfg: RunConfig, encoder):
    """data.encoder_cache opened and (given the encoder's weights) checked against them."""
    cache = FeatureCache(cfg.data["encoder_cache"])
    if encoder is not None:
        cache.check(encoder_fingerprint(encoder))
    window = SpeechModelConfig.of(cfg).encoder_window
    if cache.window != window:
        raise ConfigError(f"data.encoder_cache: {cache.path} holds features of the {cache.window} encoder window, "
                          f"but model.encoder_window is {window}; build a cache for it in a new folder "
                          f"(python -m esrt_jax.data.encode_cache --config C --out DIR)")
    return cache


def _no_cache_window(scfg: SpeechModelConfig) -> None:
    """Without the cache the pipeline's 30 s mels reach the encoder inside the step, uncut."""
    if scfg.encoder_window == "real":
        raise ConfigError("model.encoder_window: real trains on the encoder cache (the data pipeline emits "
                          "30 s mels): set data.encoder_cache (python -m esrt_jax.data.encode_cache --config C "
                          "--out DIR)")


def _pad_id(cfg: RunConfig) -> int:
    return TaskTokenizer(tokenizer_for(cfg)).pad_id


def _decoder(cfg: RunConfig, graphdef, state_template):
    """decode_fn(trainable, frozen, n) -> {'bleu' | 'wer' and 'cer', each with its swapped score and
    gain, 'distinct', 'samples'} on the first n dev records."""
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state_template)
    dev = _dev_source(cfg)
    if dev is None:
        return None

    def decode(trainable, frozen, n):
        st = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(st, merge_trees(trainable, frozen))
        model = nnx.merge(graphdef, st)
        tok = tokenizer_for(cfg)
        tt = TaskTokenizer(tok)
        gen = generation_config(cfg, tt.eos_id, tt.pad_id, inference=False)
        tr = Translator(model, tok, gen_cfg=gen, max_batch=max(n, 1))
        dc = _data_config(cfg, batch_size=n)
        batch = next(make_eval_batches(dc, tok, dev, _dev_task(cfg, dc), batch_size=n))
        rows = [int(i) for i in batch["record"] if i >= 0]
        recs = [dev[i] for i in rows]
        task = _dev_task(cfg, dc)
        given = get_task(task).given
        frames = batch["enc_frames"][:len(rows)]  # each row's real frames ride along with its features
        if "enc" in batch:  # cached encoder output: only the adapter runs
            feats, encode = np.asarray(batch["enc"][:len(rows)]), tr.adapt
        else:
            enc = model.config.encoder
            feats = np.asarray(batch_mel({k: v[:len(rows)] for k, v in batch.items() if k in ("mel", "audio")},
                                         enc.num_mel_bins, enc.num_frames))
            encode = tr.encode

        def run(feats, frames):
            return tr.decode(encode(feats, frames), [r.src for r in recs], [r.tgt for r in recs], task=task,
                             transcriptions=[r.transcription for r in recs] if given else None)

        outs = run(feats, frames)
        rep = _report(task, recs, outs)
        # Listening check (esrt_jax.eval.listening): each clip's features swapped with another
        # clip's (the swap rule, `pytree.swap_partners`: never one with the same references); a
        # model that ignores the audio scores the same. Distinct outputs / references.
        partners = swap_partners([(normalize_transcript(r.transcription) if task != "smt" else "",
                                   normalize_transcript(r.translation) if task != "asr" else "") for r in recs])
        swapped = _report(task, recs, run(feats[partners], frames[partners]))
        rep.update({f"{k}_swapped": v for k, v in swapped.items() if k in ("wer", "cer", "bleu")})
        if "bleu" in rep:
            rep["bleu_gain"] = rep["bleu"] - rep["bleu_swapped"]
        for k in ("wer", "cer"):
            if k in rep:
                rep[f"{k}_gain"] = rep[f"{k}_swapped"] - rep[k]
        outputs = get_task(task).outputs
        refs = {(r.transcription if "transcription" in outputs else "",
                 r.translation if "translation" in outputs else "") for r in recs}
        rep["distinct"] = distinct_share(len({o["response"] for o in outs}), len(refs))
        return rep

    def _report(task, recs, outs):
        rep: dict = {}
        tk = get_task(task)
        if "transcription" in tk.outputs:
            for metric in ("wer", "cer"):
                rep[metric] = float(asr_error([r.transcription for r in recs], [o["transcription"] for o in outs],
                                              metric))
        if "translation" in tk.outputs:
            tokz = {languages.get(r.tgt).bleu_tokenize for r in recs}
            rep["bleu"] = float(bleu([o["translation"] for o in outs], [r.translation for r in recs],
                                     "char" if "char" in tokz else "13a")[0])

        def show(texts) -> str:  # the texts the task produces, in its output order (a record's or a decode's)
            return " | ".join(texts[f] for f in tk.outputs)

        def label(r) -> str:  # ASR has a language, not a direction
            return f"{task} {r.src}->{r.tgt}" if tk.translates else f"{task} {r.src}"

        rep["samples"] = [f"{label(r)} ref: {show(vars(r))}\n"
                          f"{' ' * (len(label(r)) + 1)}hyp: {show(o)}"
                          for r, o in zip(recs, outs)]
        return rep

    return decode


# ----------------------------------------------------------------------------- data

def _data_config(cfg: RunConfig, batch_size: int | None = None, *, ctc: bool = True):
    sd, d = SpeechDataConfig.split(cfg)
    if sd.demo and not d.get("train"):
        d["train"] = [str(_demo_split(cfg, "train"))]
    if cfg.stage == "align" and ctc:  # CTC over each record's transcript: task weights do not apply
        d.update(tasks={"asr": 1.0}, schedule=(), ctc_units=align_units(cfg))
    d["batch_size"] = batch_size or cfg.train.batch_size
    d.setdefault("n_mels", speech_config(cfg).encoder.num_mel_bins)
    return from_dict(DataConfig, d, prefix="data")


def _demo_split(cfg: RunConfig, split: str) -> Path:
    """The demo corpus' train/dev file; with data.demo_heldout_clips, its held-out-clip view (dev:
    clips of the training sentences in a voice they are not trained in; see `clip_split`)."""
    d = demo_dir(cfg)
    sd = SpeechDataConfig.of(cfg)
    if not sd.demo_heldout_clips:
        return d / f"{split}.jsonl"
    return clip_split(d, sd.demo_sentences)["train" if split == "train" else "dev"]


def _dev_source(cfg: RunConfig):
    """Dev records in data.languages, in a fixed shuffled order (so the first batches mix
    directions), or None when no dev set is configured."""
    sd = SpeechDataConfig.of(cfg)
    specs = sd.dev or ([str(_demo_split(cfg, "dev"))] if sd.demo else None)
    if not specs:
        return None
    src = open_sources(list(specs))
    langs = set(cfg.data.get("languages") or ())
    keep = [i for i in range(len(src)) if not langs or (src[i].src in langs and src[i].tgt in langs)]
    if not keep:
        raise ConfigError(f"data.dev: no dev record in data.languages {sorted(langs)}")
    order = np.random.default_rng(0).permutation(len(keep))
    return ListSource([src[keep[i]] for i in order], name=f"dev({src.name})")


def _dev_task(cfg: RunConfig, dc) -> str:
    """data.dev_task, else the stage's most weighted task."""
    return SpeechDataConfig.of(cfg).dev_task or max(dc.tasks, key=dc.tasks.get)


class _Select:
    """Keep the keys the loss uses (drops int64 bookkeeping columns before device transfer)."""

    def __call__(self, batch):
        return {k: v for k, v in batch.items() if k in BATCH_KEYS}


def build_data(cfg: RunConfig, split: str, *, process_index: int, process_count: int):
    """data.builder: 'train' -> checkpointable Grain iterator; 'dev' -> iterable of batches."""
    tok = tokenizer_for(cfg)
    dc = _data_config(cfg)
    if split == "train":
        dc = dataclasses.replace(dc, shard_index=process_index, shard_count=process_count)
        return iter(make_train_dataset(dc, tok).map(_Select()))
    dev = _dev_source(cfg)
    if dev is None:
        return iter(())
    task = _dev_task(cfg, dc)
    per = cfg.train.batch_size // process_count

    def gen():
        for b in make_eval_batches(dc, tok, dev, task):
            yield {k: v[process_index * per:(process_index + 1) * per] for k, v in _Select()(b).items()}
    return gen()
