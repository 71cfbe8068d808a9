"""Back to Hugging Face: a trained stage checkpoint -> PyTorch-world files, and back again.

    python -m esrt_jax.export --run RUN_DIR [--stage srt] [--step N] --out OUT [--merge-lora | --peft]
    python -m esrt_jax.export --import OUT --run NEW_RUN_DIR

Modules: `to_hf` (export), `from_hf` (import), `card` (the model card), `common` (format and
run discovery); the command line is `esrt_jax.cli.export` (run by `python -m esrt_jax.export`).

Export reads the run's config (`RUN_DIR/config.yaml`, or `--config`), rebuilds the speech LLM
from the base weights it was trained on, restores the stage's trainable params from Orbax
(`esrt_jax.speech.load.load_model`) and writes:

    OUT/llm/                 the LLM as a Hugging Face dir (sharded safetensors + index, config,
                             generation_config with the run's decoding settings and token ids,
                             tokenizer incl. any added language-tag tokens), LoRA merged;
                             with --peft: the untouched base (HF dir, or BASE_MODEL.json pointing
                             at the local base dir when its weights were frozen and unchanged)
                             plus OUT/llm/adapter/ (a PEFT LoRA adapter dir + tokenizer)
    OUT/adapter/             model.safetensors      Q-Former (or window means) + projector, our
                                                    key names (below)
                             config.json            our QFormerConfig + the HF Blip2QFormerConfig
                                                    (null for window means)
                             llm_srt_adapter.safetensors  LLM-SRT state dict (`encoder_projector.*`)
                             llm_srt_adapter.pt     the same as a torch state dict (when torch is
                                                    importable), what LLM-SRT's code loads; neither
                                                    for the window-means adapter (no Q-Former),
                                                    which esrt_config.json says
    OUT/encoder/             the Whisper encoder as an HF dir (config.json + model.safetensors,
                             bare `WhisperEncoder` names), or BASE_MODEL.json pointing at the local
                             base Whisper dir (the encoder is frozen, so it is identical)
    OUT/esrt_config.json     everything needed to reassemble the model: the adapter's kind and
                             sizes, pooling, split point, encoder window, prompt format, languages,
                             dims, tokenizer mode, the run config, file layout
    OUT/README.md            a model card from the run config, dev metrics and eval summary

Adapter key names (`OUT/adapter/model.safetensors`, `esrt_jax.models.qformer.flat_params`):
`query` (1, Q, H); `qformer.layers.{i}.{attention,crossattention}.{query,key,value,out}.{kernel,bias}`,
`...norm.{scale,bias}`, `qformer.layers.{i}.{ffn_in,ffn_out}.{kernel,bias}`, `...ffn_norm.*`,
`qformer.layernorm.{scale,bias}`; or, for the window-means adapter, `window_in.{kernel,bias}` instead
of `query` and `qformer.*`; projector `linear.*` or `linear1.*`/`linear2.*`; `norm.{scale,bias}`.
Kernels are stored (in, out) (the transpose of torch's Linear weight).

Import writes `NEW_RUN_DIR/config.yaml` (the original run config with the model paths pointing into
OUT) and `NEW_RUN_DIR/<stage>/checkpoints/<step>/`, an Orbax checkpoint in the training format
(trainable params, fresh optimizer state, meta, data-iterator state when the data can be opened):
`python -m esrt_jax.infer --config NEW_RUN_DIR/config.yaml --checkpoint NEW_RUN_DIR`, `eval.py` and
`train.py --config NEW_RUN_DIR/config.yaml --init-from NEW_RUN_DIR/<stage>/checkpoints` take it.
With a merged export the new run's LoRA factors (if LoRA is enabled) start fresh with B = 0, so the
model computes exactly the exported function.
"""

from esrt_jax.export.card import model_card  # noqa: F401  (the package's API in one place)
from esrt_jax.export.common import (CONFIG_NAMES, ESRT_CONFIG, FORMAT, POINTER, VERSION,  # noqa: F401
                                    ExportError, find_run_config, stage_checkpoint)
from esrt_jax.export.from_hf import import_config, import_export, read_export  # noqa: F401
from esrt_jax.export.to_hf import ExportResult, export_run  # noqa: F401
