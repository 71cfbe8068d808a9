"""The assembled speech LLM against a PyTorch reference assembled the way LLM-SRT does it:
transformers' WhisperEncoder -> LLM-SRT-style Q-Former projector -> HF causal LM fed
`inputs_embeds = cat(speech, embed_tokens(text))`; plus beam search vs `transformers.generate`,
the edge/cloud split and the no-recompile guarantee of the bucketed generator."""

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config, WhisperConfig)
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from esrt_jax.convert.llm import model_from_hf_state
from esrt_jax.convert.llm_srt import load_llm_srt_into
from esrt_jax.data.tasks import TaskTokenizer, collate
from esrt_jax.infer import generate as gen
from esrt_jax.infer.translator import Translator
from esrt_jax.models import whisper as W
from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter
from esrt_jax.models.speech_llm import SpeechLLM, SpeechLLMConfig, loss_fn
from helpers_tokenizer import tiny_tokenizer
from tests.reference.qformer import numpy_state_dict, torch_reference
from tests.reference.speech_llm import torch_embeds

N_MELS, MAX_POS, D_ENC, Q, VOCAB, D_LLM = 80, 16, 32, 6, 320, 64

LLM_CONFIGS = {
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=D_LLM, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 initializer_range=0.1, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(vocab_size=VOCAB, hidden_size=D_LLM, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, sliding_window=4, initializer_range=0.1,
                                       layer_types=["sliding_attention", "full_attention"],
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def _torch_whisper(seed=0):
    torch.manual_seed(seed)
    cfg = WhisperConfig(num_mel_bins=N_MELS, d_model=D_ENC, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, max_source_positions=MAX_POS, decoder_layers=1,
                        decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    cfg._attn_implementation = "eager"
    return HFWhisperEncoder(cfg).eval(), cfg


def _build(family: str):
    """(ours SpeechLLM, torch parts) with identical weights (torch init -> our converters)."""
    t_enc, wcfg = _torch_whisper()
    enc_cfg = W.WhisperEncoderConfig.from_hf_config(wcfg)
    sd = numpy_state_dict(t_enc)
    enc = W.encoder_from_params(enc_cfg, W.params_from_hf(sd, enc_cfg, prefix="", names=list(sd)))

    ad_cfg = QFormerConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           encoder_hidden_size=D_ENC, num_queries=Q, llm_dim=D_LLM)
    t_proj = torch_reference(ad_cfg, seed=1)
    adapter = SpeechAdapter(ad_cfg, rngs=nnx.Rngs(0))
    load_llm_srt_into(adapter, numpy_state_dict(t_proj))

    torch.manual_seed(2)
    hf_cfg = LLM_CONFIGS[family]()
    hf_cfg._attn_implementation = "eager"
    t_llm = AutoModelForCausalLM.from_config(hf_cfg).eval()
    llm, llm_cfg = model_from_hf_state(hf_cfg, numpy_state_dict(t_llm))

    cfg = SpeechLLMConfig(enc_cfg, ad_cfg, llm_cfg)
    return SpeechLLM.from_parts(cfg, enc, adapter, llm), (t_enc, t_proj.encoder_projector, t_llm)


@pytest.fixture(scope="module", params=sorted(LLM_CONFIGS))
def pair(request):
    ours, torch_parts = _build(request.param)
    tok = tiny_tokenizer(VOCAB, add_bos=request.param == "gemma3")
    return request.param, ours, torch_parts, tok


def _mixed_batch(tok, rows=3, seed=0):
    tt = TaskTokenizer(tok)
    ex = [tt.encode("asr", "eng", "deu", "the quick brown fox"),
          tt.encode("smt", "deu", "eng", "der schnelle braune Fuchs", "the quick brown fox"),
          tt.encode("srt", "fra", "cmn", "le renard brun", "今天天气很好")][:rows]
    batch = collate(ex, (64,), tt.pad_id)
    rs = np.random.RandomState(seed)
    batch["mel"] = rs.randn(rows, N_MELS, 2 * MAX_POS).astype(np.float32)
    return batch


def test_loss_parity_on_mixed_tasks(pair):
    family, ours, torch_parts, tok = pair
    batch = _mixed_batch(tok)
    loss, aux = loss_fn(ours, {k: v for k, v in batch.items()})
    embeds, mask = torch_embeds(torch_parts, batch["mel"], batch["tokens"], batch["attention_mask"])
    labels = np.where(batch["loss_mask"] > 0, batch["tokens"], -100)
    labels = np.concatenate([np.full((labels.shape[0], Q), -100), labels], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = torch_parts[2](inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                             labels=torch.from_numpy(labels).long()).loss.item()
    assert abs(float(loss) - ref) <= 1e-4, (family, float(loss), ref)
    assert float(aux["tokens"]) == batch["loss_mask"].sum()


def test_greedy_and_beam_match_transformers_generate(pair):
    family, ours, torch_parts, tok = pair
    tr = Translator(ours, tok, prompt_buckets=(32,))
    src, tgt = ["eng", "deu"], ["deu", "cmn"]
    mel = np.random.RandomState(3).randn(2, N_MELS, 2 * MAX_POS).astype(np.float32)
    tokens, pmask = tr.prompts(src, tgt)
    embeds, mask = torch_embeds(torch_parts, mel, tokens, pmask.astype(np.int64), left_pad_speech=True)
    feats = tr.encode(mel)
    for beams in (1, 4):
        cfg = gen.GenerateConfig(max_new_tokens=20, num_beams=beams, eos_ids=(tok.eos_token_id,),
                                 pad_id=tok.pad_token_id, no_repeat_ngram_size=3)
        ours_ids = tr.generate_ids(feats, src, tgt, gen_cfg=cfg)
        with torch.no_grad():
            ref = torch_parts[2].generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20,
                                          num_beams=beams, do_sample=False, no_repeat_ngram_size=3,
                                          early_stopping=True, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)
        ref_ids = gen.trim(ref.numpy(), cfg)
        assert ours_ids == ref_ids, (family, beams, ours_ids, ref_ids)


def test_beam_one_equals_greedy(pair):
    _, ours, _, tok = pair
    tr = Translator(ours, tok, prompt_buckets=(32,))
    feats = tr.encode(np.random.RandomState(4).randn(3, N_MELS, 2 * MAX_POS).astype(np.float32))
    kw = dict(max_new_tokens=16, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    a = tr.generate_ids(feats, ["eng"] * 3, ["deu", "fra", "jpn"], gen_cfg=gen.GenerateConfig(**kw))
    b = tr.generate_ids(feats, ["eng"] * 3, ["deu", "fra", "jpn"],
                        gen_cfg=gen.GenerateConfig(num_beams=1, **kw))
    c = gen.trim(gen.beam_search(*_llm_inputs(tr, feats), gen.GenerateConfig(num_beams=1, **kw))[0],
                 gen.GenerateConfig(**kw))
    assert a == b == c


def _llm_inputs(tr, feats):
    model = nnx.merge(tr.graphdef, tr.state)
    tokens, mask = tr.prompts(["eng"] * 3, ["deu", "fra", "jpn"])
    embeds, full = model.llm_inputs(model.speech_embeds(feats), tokens, mask, left_pad=True)
    return model.llm, embeds, full


def test_edge_cloud_split_is_exact(pair, tmp_path):
    _, ours, _, tok = pair
    tr = Translator(ours, tok, prompt_buckets=(32,))
    mel = np.random.RandomState(5).randn(2, N_MELS, 2 * MAX_POS).astype(np.float32)
    one_process = tr.translate(mel, ["eng", "fra"], ["deu", "eng"])
    np.save(tmp_path / "feats.npy", tr.encode(mel))  # the edge's only output
    cloud = Translator(ours, tok, prompt_buckets=(32,))
    assert cloud.decode(np.load(tmp_path / "feats.npy"), ["eng", "fra"], ["deu", "eng"]) == one_process
    qf = Translator(ours, tok, prompt_buckets=(32,), split="qformer")  # projector in the cloud
    assert qf.encode(mel).shape == (2, Q, 32)
    assert qf.translate(mel, ["eng", "fra"], ["deu", "eng"]) == one_process


@pytest.mark.parametrize("pair", ["qwen2"], indirect=True)  # one family is enough
def test_no_recompile_within_buckets(pair):
    family, ours, _, tok = pair
    from esrt_jax.infer import translator as T

    tr = Translator(ours, tok, prompt_buckets=(32,), max_batch=4)
    cfg = gen.GenerateConfig(max_new_tokens=6, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    feats = np.random.RandomState(6).randn(4, Q, D_LLM).astype(np.float32)
    tr.decode(feats[:3], ["eng", "deu", "fra"], ["deu", "eng", "eng"], gen_cfg=cfg)  # warm: (4, 32)
    warm = T._decode._cache_size()
    lengths = set()
    for rows, task, src, tgt in [(4, "asr", "cmn", "vie"), (3, "srt", "jpn", "rus"), (4, "smt", "eng", "deu")]:
        tokens, mask = tr.prompts([src] * rows, [tgt] * rows, task, ["a b c d"] * rows)
        lengths.add(int(mask.sum(1)[0]))
        tr.decode(feats[:rows], [src] * rows, [tgt] * rows, task=task, transcriptions=["a b c d"] * rows,
                  gen_cfg=cfg)
    assert len(lengths) > 1  # really different prompt lengths
    assert T._decode._cache_size() == warm
