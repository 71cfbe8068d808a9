"""Checkpoint IO: Hugging Face / PEFT / LLM-SRT directories and files <-> our params, through the
name maps of `esrt_jax.models` (hf_io, llm, whisper, qformer, tokenizer, peft, llm_srt)."""
