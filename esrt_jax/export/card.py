"""The model card (OUT/README.md) of an export, from the run config, dev metrics and eval summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from esrt_jax import languages as L
from esrt_jax.data.tasks import TASKS
from esrt_jax.export.common import ESRT_CONFIG, POINTER, ExportError
from esrt_jax.speech.config import SpeechModelConfig

def dev_metrics(stage_dir: Path) -> dict:
    """Last dev_* values logged by training (metrics.jsonl) and the last train loss."""
    f = stage_dir / "metrics.jsonl"
    out: dict = {}
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in rec.items():
            if (k.startswith("dev_") or k == "loss") and isinstance(v, (int, float)):
                out[k] = (rec.get("step"), v)
    return out


def find_eval_summaries(run: Path, explicit: str | os.PathLike | None) -> list[dict]:
    """The eval summaries to show: `explicit` alone, else every `summary.json` under the run (each
    test set `eval.py` scored, oldest first), each with its `path`."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise ExportError(f"--eval-summary {p}: file does not exist")
        return [{"path": str(p), **json.loads(p.read_text())}]
    out = []
    for f in sorted(run.rglob("summary.json"), key=lambda p: p.stat().st_mtime):
        try:
            out.append({"path": str(f), **json.loads(f.read_text())})
        except (json.JSONDecodeError, OSError):
            continue
    return out


# What the card's loading snippet needs (esrt-jax itself is not on PyPI; its `torch` extra pins torch).
TORCH_INSTALL = ("`pip install torch==2.13.0 transformers safetensors soundfile` (+ `peft` for a PEFT export; "
                 "in an esrt-jax checkout `pip install -e \".[torch]\"` installs them)")
# What the demo's test sets measure (eval.py's defaults for a demo run, `esrt_jax.data.demo.clip_split`
# and `noisy_clips`), by the start of their folder name.
DEMO_TEST_SETS = (("trained_clips_", "trained clips with white noise added: new audio of utterances the model was "
                                     "trained on (do the outputs follow the audio?)"),
                  ("heldout_clips_", "the training sentences in a voice held out from training: listening to "
                                     "unseen audio"),
                  ("test_clips_", "held-out sentences: a model trained on the demo's few sentences cannot "
                                  "translate them (BLEU near 0 by design)"))


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def evaluation_lines(summaries: list[dict]) -> list[str]:
    """One row per scored test set: BLEU, ASR error and the listening diagnostic."""
    if not summaries:
        return []
    lines = ["", "## Evaluation (`eval.py`)", "",
             "Each row is one scored test set (its `summary.json`). Audio gain: the score with the real "
             "audio minus the score with another clip's audio; distinct: distinct outputs / distinct "
             "references (1 = every clip its own output).", "",
             "| test set | records | BLEU | ASR error % | BLEU gain | WER gain | distinct |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        av, li = s.get("averages", {}), s.get("listening") or {}
        lines.append(f"| `{Path(s['path']).parent.name}` | {s.get('records', '?')} | {_fmt(av.get('bleu'))} | "
                     f"{_fmt(av.get('asr_error'))} | {_fmt(li.get('bleu_gain'))} | {_fmt(li.get('wer_gain'))} | "
                     f"{_fmt(li.get('distinct_share'), 2)} |")
    names = [Path(s["path"]).parent.name for s in summaries]
    demo = [f"`{prefix}*`: {what}" for prefix, what in DEMO_TEST_SETS if any(n.startswith(prefix) for n in names)]
    if demo:
        lines += ["", "The demo's test sets: " + "; ".join(demo) + "."]
    return lines


def loading_snippet(ec: dict, out: str) -> str:
    """Python that loads export `out` with torch + transformers alone and translates one 16 kHz
    clip (`TORCH_INSTALL`)."""
    llm, enc, a = ec["llm"], ec["encoder"], ec["adapter"]["config"]
    src, tgt = ec["languages"][0], next((c for c in ec["languages"][1:]), ec["languages"][0])
    if enc["format"] == "pointer":  # a full Whisper folder: take its encoder
        enc_line = f"encoder = WhisperModel.from_pretrained({enc['path']!r}).get_encoder().eval()"
    else:
        enc_line = 'encoder = WhisperEncoder.from_pretrained(f"{OUT}/encoder").eval()'
    if llm["format"] == "merged":
        llm_lines = ['llm = AutoModelForCausalLM.from_pretrained(f"{OUT}/llm").eval()',
                     'tok = AutoTokenizer.from_pretrained(f"{OUT}/llm")']
    else:
        base = 'f"{OUT}/llm"' if llm["base"]["format"] == "weights" else repr(llm["base"]["path"])
        llm_lines = ["from peft import PeftModel",
                     f'llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), '
                     'f"{OUT}/llm/adapter").eval()',
                     'tok = AutoTokenizer.from_pretrained(f"{OUT}/llm/adapter")']
    pool = a.get("pool_k")
    means = bool(a.get("window_means"))
    mask = a.get("attend_padding") is False
    real = enc.get("window") == "real"
    lines = [
        "import json",
        "import os",
        "",
        "import soundfile as sf",
        "import torch",
        "from safetensors.torch import load_file",
        *(["from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, WhisperFeatureExtractor,",
           "                          WhisperModel)"] if means else
          ["from transformers import (AutoModelForCausalLM, AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel,",
           "                          GenerationConfig, WhisperFeatureExtractor, WhisperModel)"]),
        "from transformers.models.whisper.modeling_whisper import WhisperEncoder",
        "",
        f"OUT = {json.dumps(out)}",
        'CLIP = "clip.wav"  # 16 kHz mono',
        'ec = json.load(open(f"{OUT}/esrt_config.json"))',
        "",
        "",
        *(_window_means_adapter(pool) if means else _qformer_adapter(pool)),
        "",
        "",
        enc_line,
        "adapter = Adapter(OUT).eval()",
        *llm_lines,
        "",
        'audio, sr = sf.read(os.path.expanduser(CLIP), dtype="float32")',
        'mel = WhisperFeatureExtractor(feature_size=ec["encoder"]["num_mel_bins"])(',
        '    audio, sampling_rate=sr, return_tensors="pt").input_features[..., :ec["encoder"]["frames"]]',
    ]
    if mask or real:  # the real encoder frames of the clip (one per 20 ms of audio)
        lines.append('frames = min(-(-len(audio) * 50 // sr), mel.shape[-1] // 2)')
    if real:  # the encoder reads the clip's real length rounded up to 1 s, not the 30 s window
        lines += ['win = min(mel.shape[-1], -(-2 * frames // ec["encoder"]["window_bucket"]) * '
                  'ec["encoder"]["window_bucket"])',
                  "mel = mel[..., :win]",
                  "# transformers' WhisperEncoder insists on the 30 s window: give it the positions of this one",
                  "encoder.embed_positions = torch.nn.Embedding.from_pretrained(encoder.embed_positions.weight[:win // 2])",
                  "encoder.config.max_source_positions = win // 2"]
    lines += [
        'p = ec["prompt"]',
        f'prompt = p["tasks"]["srt"]["prompt"].replace("<|src|>", "<|{src}|>").replace("<|tgt|>", "<|{tgt}|>")',
        'ids = ([p["bos_token_id"]] if p["add_bos"] else []) + tok(prompt, add_special_tokens=False).input_ids',
        "with torch.no_grad():",
    ]
    if means:
        lines.append("    speech = adapter(encoder(mel).last_hidden_state, frames)  # (1, speech tokens, LLM hidden)")
    elif mask:  # the adapter attends over the real frames only
        lines += ['    enc_mask = (torch.arange(mel.shape[-1] // 2) < frames).long()[None]',
                  "    speech = adapter(encoder(mel).last_hidden_state, enc_mask)"]
    else:
        lines.append("    speech = adapter(encoder(mel).last_hidden_state)  # (1, speech tokens, LLM hidden)")
    lines += [
        "    embeds = torch.cat([speech, llm.get_input_embeddings()(torch.tensor([ids]))], 1)  # [speech][prompt]",
        '    gen = GenerationConfig(**ec["decode"], eos_token_id=p["eos_token_id"], pad_token_id=p["pad_token_id"])',
        "    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),",
        "                       generation_config=gen)",
        "text = tok.decode(out[0], skip_special_tokens=True)",
        f'parts = text.split("<|{src}|><|{tgt}|>")  # as LLM-SRT\'s evaluation splits an SRT output',
        'transcription, translation = parts if len(parts) == 2 else (text, text.split("|>")[-1])',
        'print(json.dumps({"transcription": transcription.strip(), "translation": translation.strip()}))',
    ]
    return "\n".join(lines)


def _qformer_adapter(pool) -> list[str]:
    """The snippet's Adapter: LLM-SRT's module, from the LLM-SRT state dict."""
    lines = [
        "class Adapter(torch.nn.Module):",
        "    \"\"\"LLM-SRT's EncoderProjectorQFormer: learned queries -> BLIP-2 Q-Former over the encoder output ->",
        "    projector (Linear, or Linear-ReLU-Linear) -> LayerNorm, from adapter/llm_srt_adapter.safetensors.\"\"\"",
        "",
        "    def __init__(self, out):",
        "        super().__init__()",
        '        cfg = json.load(open(f"{out}/adapter/config.json"))',
        '        sd = {k.removeprefix("encoder_projector."): v',
        '              for k, v in load_file(f"{out}/adapter/llm_srt_adapter.safetensors").items()}',
        '        self.query = torch.nn.Parameter(torch.zeros_like(sd["query"]))',
        '        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(**cfg["hf_qformer_config"]))',
        '        for name in ("linear", "linear1", "linear2"):',
        '            if f"{name}.weight" in sd:',
        '                setattr(self, name, torch.nn.Linear(*sd[f"{name}.weight"].shape[::-1]))',
        '        self.norm = torch.nn.LayerNorm(cfg["llm_dim"], eps=cfg["projector_eps"])',
        "        self.load_state_dict(sd, strict=True)",
        "",
        "    def forward(self, enc, enc_mask=None):  # (B, frames, d_model) -> (B, speech tokens, LLM hidden)",
        "        q = self.query.expand(enc.shape[0], -1, -1)",
        "        h = self.qformer(query_embeds=q, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).last_hidden_state",
    ]
    if pool:
        lines.append(f"        h = h.unflatten(1, (-1, {pool})).mean(2)  # mean over windows of pool_k queries")
    return lines + [
        '        h = self.linear(h) if hasattr(self, "linear") else self.linear2(torch.relu(self.linear1(h)))',
        "        return self.norm(h)",
    ]


def _window_means_adapter(pool) -> list[str]:
    """The snippet's Adapter: esrt-jax's window-means adapter (no Q-Former), from our own layout."""
    lines = [
        "class Adapter(torch.nn.Module):",
        "    \"\"\"esrt-jax's window-means adapter (no Q-Former): the clip's real encoder frames cut into",
        "    num_queries x window_means equal parts; output i = GELU(Dense(the means of window i's parts side by",
        "    side)) -> projector (Linear, or Linear-ReLU-Linear) -> LayerNorm, from adapter/model.safetensors",
        "    (esrt-jax names, kernels (in, out)).\"\"\"",
        "",
        "    def __init__(self, out):",
        "        super().__init__()",
        '        self.cfg = json.load(open(f"{out}/adapter/config.json"))',
        '        self.p = load_file(f"{out}/adapter/model.safetensors")',
        "",
        "    def dense(self, name, x):",
        '        return x @ self.p[f"{name}.kernel"] + self.p[f"{name}.bias"]',
        "",
        "    def forward(self, enc, frames):  # (1, frames.., d_model), real frames -> (1, speech tokens, LLM hidden)",
        '        q, n = self.cfg["num_queries"], self.cfg["num_queries"] * self.cfg["window_means"]',
        "        means = torch.stack([enc[:, i * frames // n:-(-(i + 1) * frames // n)].mean(1) for i in range(n)], 1)",
        '        h = torch.nn.functional.gelu(self.dense("window_in", means.reshape(enc.shape[0], q, -1)),',
        '                                     approximate="tanh")',
    ]
    if pool:
        lines.append(f"        h = h.unflatten(1, (-1, {pool})).mean(2)  # mean over windows of pool_k outputs")
    return lines + [
        '        h = (self.dense("linear", h) if "linear.kernel" in self.p else',
        '             self.dense("linear2", torch.relu(self.dense("linear1", h))))',
        '        return torch.nn.functional.layer_norm(h, h.shape[-1:], self.p["norm.scale"], self.p["norm.bias"],',
        '                                              self.cfg["projector_eps"])',
    ]


def prompt_lines(tasks: dict[str, dict[str, str]]) -> list[str]:
    """The card's "Prompts" section from an export's task table (`tasks.card_table()`): a row per
    task, and how a registered two-text task's output is split."""
    return ["## Prompts", "", "| task | prompt | target |", "|---|---|---|",
            *[f"| {t} | `{v['prompt']}` | `{v['target']}` |" for t, v in tasks.items()], "",
            *[f"The {t.upper()} output is split at `{TASKS[t].separator()}` into {' and '.join(TASKS[t].outputs)}."
              for t in tasks if t in TASKS and TASKS[t].separator()], ""]


def _adapter_name(m: dict) -> str:
    return "window-means adapter" if m.get("adapter") == "window_means" else "Q-Former adapter"


def _adapter_file_lines(files: dict) -> list[str]:
    if files.get("llm_srt") is None:
        return ["- `adapter/model.safetensors`: the window-means MLP + projector, esrt-jax key names (kernels "
                f"(in, out)); no LLM-SRT state dict: {files.get('llm_srt_absent')}"]
    return ["- `adapter/model.safetensors`: Q-Former + projector, esrt-jax key names (kernels (in, out)); "
            "`adapter/llm_srt_adapter.{safetensors,pt}`: the LLM-SRT `encoder_projector.*` state dict"]


def model_card(ec: dict, cfg, dev: dict, summaries: list[dict], out: str = "OUT") -> str:
    """OUT/README.md: what the model is, how it was trained, how to load it."""
    m, llm, enc = ec["model"], ec["llm"], ec["encoder"]
    src = ec["source"]
    tc = cfg.train
    names = ", ".join(f"{c} ({L.get(c).name})" for c in ec["languages"])
    mc = SpeechModelConfig.of(cfg)
    base_llm = llm.get("base") if isinstance(llm.get("base"), str) else (mc.llm or "tiny random "
                                                                         f"{llm['model_type']} (from the config)")
    base_enc = enc["path"] if enc["format"] == "pointer" else (mc.whisper or
                                                               "tiny random Whisper encoder (from the config)")
    lines = [
        "---", "library_name: transformers", "tags: [speech-translation, esrt, llm-srt, jax]", "---", "",
        f"# Speech LLM exported from esrt-jax (stage `{src['stage']}`, step {src['step']})", "",
        f"Whisper encoder (frozen) -> {_adapter_name(m)} -> decoder LLM, trained with "
        "esrt-jax (JAX/Flax) on the LLM-SRT / ESRT recipe. Input to the LLM: "
        "`[speech embeddings][prompt][answer][eos]` via `inputs_embeds` (speech first, no markers).", "",
        "## Model", "",
        f"- Speech encoder: {base_enc} (d_model {m['encoder_dim']}, {enc['num_mel_bins']} mel bins)"
        + ("; runs on each clip's real length rounded up to 1 s (`model.encoder_window: real`), not Whisper's "
           "30 s window" if enc.get("window") == "real" else ""),
        (f"- Adapter: window means (no Q-Former): {m['num_windows']} equal windows of the clip's real encoder "
         f"frames, each the means of {m['window_parts']} parts -> {m['window_mlp']}"
         if m.get("adapter") == "window_means" else
         f"- Adapter: Q-Former, {m['num_queries']} queries, hidden {m['qformer_hidden']}")
        + (f", mean-pooled in windows of {m['pool_k']}" if m["pool_k"] else "")
        + f" -> {m['num_speech_tokens']} speech tokens; projector {m['projector']} to {m['llm_dim']}",
        f"- LLM: {base_llm} ({llm['model_type']}, hidden {llm['hidden_size']}, vocab {llm['vocab_size']}); "
        + ("LoRA merged into the weights" if llm["format"] == "merged" and llm.get("lora_merged") else
           "PEFT LoRA adapter in `llm/adapter/`" if llm["format"] == "peft" else "no LoRA"),
        f"- Edge/cloud split point: `{m['split']}`",
        f"- Languages ({len(ec['languages'])}): {names}",
        f"- Language tags: `<|xxx|>` as {ec['tokenizer']['language_tags']} tokens", "",
        *prompt_lines(ec["prompt"]["tasks"]),
        "## Training", "",
        f"- Run: `{src['run_dir']}`, config `{src['config']}`"
        + (f" with overrides `{' '.join(src['overrides'])}`" if src["overrides"] else ""),
        f"- Stage `{src['stage']}`: {tc.steps} steps, batch {tc.batch_size}, lr {tc.lr} ({tc.schedule}, "
        f"{tc.warmup_steps} warm-up), weight decay {tc.weight_decay}; tasks "
        f"{cfg.data.get('tasks', {})}",
        "- LoRA: " + (f"r {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {list(cfg.lora.targets)}"
                       if cfg.lora.enabled else "off"),
    ]
    if dev:
        lines += ["", "## Dev metrics (logged by training)", "", "| metric | step | value |", "|---|---|---|"]
        lines += [f"| {k} | {s} | {v:.4f} |" for k, (s, v) in sorted(dev.items())]
    lines += evaluation_lines(summaries)
    lines += [
        "", "## Files", "",
        "- `llm/`: " + ("Hugging Face causal LM (LoRA merged), tokenizer, generation config"
                        if llm["format"] == "merged" else
                        "base LLM (" + ("weights" if llm["base"]["format"] == "weights" else
                                        f"pointer `{POINTER}` to the local base dir") + ") and `adapter/` (PEFT)"),
        *_adapter_file_lines(ec["adapter"]["files"]),
        "- `encoder/`: " + ("Whisper encoder (`transformers` WhisperEncoder layout)" if enc["format"] == "weights"
                            else f"pointer `{POINTER}` to the base Whisper dir (frozen, identical)"),
        f"- `{ESRT_CONFIG}`: everything needed to reassemble the model", "",
        "## Use", "",
        f"With PyTorch and transformers alone ({TORCH_INSTALL}; `soundfile` reads the clip): the encoder, "
        "the adapter ("
        + ("the window means in a few lines of torch, from `adapter/model.safetensors`"
           if m.get("adapter") == "window_means" else
           "LLM-SRT's `encoder_projector`, rebuilt from transformers' BLIP-2 Q-Former")
        + "), then the LLM on `[speech][prompt]`.", "",
        "```python", loading_snippet(ec, out), "```", "",
    ]
    lines += [
        "Back to JAX: `python -m esrt_jax.export --import OUT --run NEW_RUN_DIR`.", "",
    ]
    return "\n".join(lines)
