"""Chat SFT data: the loss mask covers exactly the answers (and the closing end-of-document
token), special tokens in answers keep their ids, long exchanges are cut and counted, bad
records are named by file and line; on real GSM8K records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_srp.data.chat import (ChatDataError, ChatFormat, SFTDataset, encode_chat,
                                    read_chat_jsonl)
from megatron_srp.data.gpt_data import collate
from megatron_srp.taxonomy import format_reflection
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


def test_the_loss_mask_is_exactly_the_answer(tok) -> None:
    answer = "Paris." + format_reflection(True)
    ids, mask = encode_chat([("user", "Capital of France?"), ("assistant", answer)], tok)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned[-1] == tok.eod and tok.detokenize(learned[:-1]) == answer
    prompt_part = tok.detokenize([i for i, m in zip(ids, mask) if not m])
    assert "Capital of France?" in prompt_part and "Paris" not in prompt_part
    # The reflection markers stay single special tokens inside the answer.
    assert tok.tokenize("<|reflect|>")[0] in learned and tok.tokenize("<|/reflect|>")[0] in learned


def test_samples_shift_labels_and_mask_together(tok) -> None:
    turns = [("user", "2+2?"), ("assistant", "4")]
    ids, mask = encode_chat(turns, tok)
    ds = SFTDataset([turns], tok, seq_length=32)
    item = ds[0]
    k = len(ids) - 1
    assert (item["tokens"][:k] == ids[:-1]).all() and (item["labels"][:k] == ids[1:]).all()
    # The loss applies where the *label* is an answer token or the closing EOD.
    answer_labels = item["labels"][item["loss_mask"] == 1]
    assert tok.detokenize(answer_labels[:-1].tolist()) == "4" and answer_labels[-1] == tok.eod
    assert item["loss_mask"][k:].sum() == 0 and (item["tokens"][k:] == tok.pad).all()
    batch = collate([ds[0], ds[0]])
    assert batch["tokens"].shape == (2, 32) and batch["loss_mask"].dtype.is_floating_point


def test_multi_turn_trains_every_assistant_turn(tok, tmp_path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}) + "\n")
    (turns,) = read_chat_jsonl(path)
    ids, mask = encode_chat(turns, tok)
    learned = tok.detokenize([i for i, m in zip(ids, mask) if m and i != tok.eod])
    assert learned == "HelloGoodbye"


def test_long_exchanges_are_cut_and_counted(tok) -> None:
    long_prompt = [("user", "word " * 200), ("assistant", "answer")]
    ok = [("user", "q"), ("assistant", "a " * 40)]
    ds = SFTDataset([long_prompt, ok], tok, seq_length=16)
    assert ds.stats() == {"samples": 1, "truncated": 2, "dropped_without_answer": 1}


def test_bad_records_are_named(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:2: missing or empty 'response'"):
        read_chat_jsonl(path)
    path.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_chat_jsonl(path)
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(ChatDataError, match="no assistant message"):
        read_chat_jsonl(path)


def test_gsm8k_records(shared_data, tok) -> None:
    convs = read_chat_jsonl(shared_data / "gsm8k" / "train_sample2000.jsonl",
                            ChatFormat(prompt_key="question", response_key="answer"))
    assert len(convs) == 2000
    ds = SFTDataset(convs[:50], tok, seq_length=512)
    assert len(ds) == 50 and ds.truncated == 0
    share = np.mean([ds[i]["loss_mask"].sum() / (ds[i]["tokens"] != tok.pad).sum()
                     for i in range(len(ds))])
    assert 0.3 < share < 0.8  # answers are about half of each exchange
