"""Task formats (docs/design.md table), BOS/EOS handling, label masks, SRT output splitting."""

from __future__ import annotations

import numpy as np
import pytest

from esrt_jax.data.tasks import (TaskError, TaskTokenizer, bucket_for, collate, format_task,
                                 split_srt_output, tokenizer_adds_bos)
from helpers_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def qwen_like():
    return tiny_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def gemma_like():
    return tiny_tokenizer(add_bos=True)


def test_format_table():
    assert format_task("asr", "eng", "deu", " hello ", "hallo") == ("<|eng|>", "hello")
    assert format_task("smt", "eng", "deu", "hello", "hallo") == ("hello<|eng|><|deu|>", "hallo")
    assert format_task("srt", "eng", "deu", "hello", "hallo") == (
        "<|eng|><|deu|>", "hello<|eng|><|deu|>hallo")
    # The spelling asked for is kept (LLM-SRT checkpoints use <|zho|>).
    assert format_task("srt", "zho", "eng", "你好", "hi")[0] == "<|zho|><|eng|>"
    assert format_task("asr", "eng", "", "only asr")[1] == "only asr"  # ASR needs no translation
    with pytest.raises(TaskError, match="empty transcription"):
        format_task("asr", "eng", "deu", "  ")
    with pytest.raises(TaskError, match=r"empty translation \(needed by srt\)"):
        format_task("srt", "eng", "deu", "hello", "")
    with pytest.raises(TaskError, match="unknown language code 'xxq'"):
        format_task("srt", "eng", "xxq", "hello", "x")
    with pytest.raises(TaskError, match="unknown task 'st'"):
        format_task("st", "eng", "deu", "hello", "x")


def test_bos_detection(qwen_like, gemma_like):
    assert not tokenizer_adds_bos(qwen_like)
    assert tokenizer_adds_bos(gemma_like)
    assert TaskTokenizer(qwen_like).add_bos is False
    assert TaskTokenizer(gemma_like).add_bos is True
    assert TaskTokenizer(gemma_like, add_bos=False).add_bos is False


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("task", ["asr", "smt", "srt"])
def test_label_masks(task, bos, qwen_like, gemma_like):
    tok = gemma_like if bos else qwen_like
    tt = TaskTokenizer(tok)
    ex = tt.encode(task, "eng", "deu", "the quick fox", "der schnelle Fuchs")
    prompt, target = format_task(task, "eng", "deu", "the quick fox", "der schnelle Fuchs")
    # Prompt: [bos?] + prompt text, no BOS anywhere else; answer: target + eos.
    assert list(ex.prompt) == ([tok.bos_token_id] if bos else []) + tok.encode(
        prompt, add_special_tokens=False)
    assert list(ex.answer) == tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(list(ex.answer[:-1])) == target
    assert list(ex.prompt) == tt.prompt_ids(task, "eng", "deu", "the quick fox")
    b = collate([ex, None], buckets=(8, 64, 128), pad_id=tt.pad_id)
    T = b["tokens"].shape[1]
    assert T == 64 and all(b[k].dtype == np.int32 for k in b)
    p, n = len(ex.prompt), len(ex)
    assert b["prompt_len"].tolist() == [p, 0] and b["length"].tolist() == [n, 0]
    # loss_mask marks exactly the answer tokens and the eos: the tokens to be predicted.
    want = np.zeros(T, np.int32)
    want[p:n] = 1
    np.testing.assert_array_equal(b["loss_mask"][0], want)
    np.testing.assert_array_equal(b["tokens"][0, b["loss_mask"][0] == 1], ex.answer)
    assert b["tokens"][0, n - 1] == tok.eos_token_id
    np.testing.assert_array_equal(b["attention_mask"][0], (np.arange(T) < n).astype(np.int32))
    assert (b["tokens"][0, n:] == tt.pad_id).all()
    # The empty row (a skipped bad record) carries nothing.
    assert b["loss_mask"][1].sum() == 0 and b["attention_mask"][1].sum() == 0
    assert (b["tokens"][1] == tt.pad_id).all()
    if bos:
        assert b["tokens"][0, 0] == tok.bos_token_id and (b["tokens"][0, 1:] != tok.bos_token_id).all()


def test_buckets():
    assert bucket_for(1, (16, 32)) == 16 and bucket_for(16, (32, 16)) == 16
    assert bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="length 33 exceeds the largest text bucket 32"):
        bucket_for(33, (16, 32))


def test_split_srt_output():
    assert split_srt_output(" hello <|eng|><|deu|> hallo ", "eng", "deu") == ("hello", "hallo")
    # Marker absent: as LLM-SRT's evaluation does, the transcription is the whole text and the
    # translation what follows the last `|>` (the whole text without any tag).
    assert split_srt_output("just text", "eng", "deu") == ("just text", "just text")
    assert split_srt_output("hello<|eng|><|fra|>bonjour", "eng", "deu") == (
        "hello<|eng|><|fra|>bonjour", "bonjour")
    # Marker twice: not a clean split either.
    assert split_srt_output("a<|eng|><|deu|>b<|eng|><|deu|>c", "eng", "deu") == (
        "a<|eng|><|deu|>b<|eng|><|deu|>c", "c")
    assert split_srt_output("x<|eng|><|deu|>y", "ENG", "deu") == ("x", "y")
