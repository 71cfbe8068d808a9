"""A tiny, offline, deterministic tokenizer for tests (no hub downloads).

A byte-level BPE trained on a few sentences with the `tokenizers` library, wrapped as a
`transformers.PreTrainedTokenizerFast` with pad / bos / eos / unk tokens, so that any text
(including `<|deu|>`-style language tags written as plain text) tokenizes.

    tok = tiny_tokenizer()                  # in memory
    tok = save_tiny_tokenizer(model_dir)    # also written next to a tiny model's config.json
    len(tok)                                # its vocabulary size; build the model with >= this

Ids: 0 <pad>, 1 <s> (bos), 2 </s> (eos), 3 <unk>, then the 256 byte symbols and the merges.
"""

from __future__ import annotations

import functools
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Speech translation turns spoken words in one language into text in another.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "今天天气很好，我们去公园散步吧。",
    "こんにちは、世界。音声翻訳のテストです。",
    "hello world, this is a tiny tokenizer for unit tests only",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
)


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320, add_bos: bool = False):
    """A fresh `PreTrainedTokenizerFast` of at most `vocab_size` tokens (>= 260).

    `add_bos=True` prepends <s> when encoding (Gemma/Llama style); otherwise no bos is added
    (Qwen style) but `bos_token` is still defined.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size {vocab_size} < {len(SPECIALS) + 256} (specials + bytes)")
    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny_tokenizer(model_dir: str | Path, vocab_size: int = 320, add_bos: bool = False):
    """Write the tiny tokenizer's files (tokenizer.json, tokenizer_config.json) into
    `model_dir` and return it."""
    tok = tiny_tokenizer(vocab_size, add_bos)
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(model_dir))
    return tok
