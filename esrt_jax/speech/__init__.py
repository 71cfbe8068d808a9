"""The speech system: the Whisper -> Q-Former -> LLM model assembled from its parts, above the
generic trainer (`esrt_jax.train` knows only `TrainBundle`s).

- `config`: the run config's `model:` block -> `SpeechLLMConfig`.
- `build`: the default `model.builder` / `data.builder` (TrainBundle, Grain data, dev decodes with
  the listening check) and `build_inference` (model + tokenizer for serving).
- `load`: a trained run -> model for inference (`load_model`), its edge half (`load_edge_half`) or a
  service backend (`load_backend`).
"""
