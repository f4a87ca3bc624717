"""Offsets derived from ids (megatron_srp/token_offsets.py) equal the tokenizer's own, token
for token and character for character, on real text; other tokenizers keep the native path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from megatron_srp.token_offsets import IdsEncoding, byte_length_table
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir, train_bpe_tokenizer

# multi-byte characters (2, 3 and 4 bytes), combining marks, tabs, runs of spaces and newlines
CRAFTED = ("Caf\u00e9 na\u00efve \u2014 \u201cquoted\u201d \u4e2d\u6587\u5b57 \U0001F600\U0001F680 "
           "e\u0301\u0301 \t\ttabs   spaces\n\n\nlines \u00a0nbsp <|endoftext|> end")


def _texts(shared_data) -> list[str]:
    wiki = (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    articles = [a for a in wiki.split("\n = ") if a.strip()][:40]
    toxigen = [json.loads(line)["text"] for line in
               (shared_data / "toxigen" / "toxigen_statements.jsonl").read_text().splitlines()[:300]]
    return [CRAFTED, CRAFTED * 3, " leading space", "x", *articles, *toxigen]


@pytest.fixture(scope="module")
def tokenizers_under_test(shared_data, tmp_path_factory):
    small = train_bpe_tokenizer([shared_data / "tinyshakespeare" / "input.txt"], 600,
                                tmp_path_factory.mktemp("bpe600"))
    return {"shipped": SRPTokenizer.from_dir(default_tokenizer_dir()), "bpe-600": small}


@pytest.mark.parametrize("name", ["shipped", "bpe-600"])
def test_offsets_and_char_to_token_equal_the_tokenizers(name, tokenizers_under_test,
                                                        shared_data) -> None:
    tok = tokenizers_under_test[name]
    assert tok.byte_lengths() is not None
    texts = _texts(shared_data)
    derived = tok.encode_batch(texts)
    native = tok._tokenizer.encode_batch(texts, add_special_tokens=False)
    assert all(isinstance(e, IdsEncoding) for e in derived)
    multi_piece = 0  # tokens that share a character's span with their neighbour
    for text, ours, theirs in zip(texts, derived, native):
        assert ours.ids == theirs.ids
        assert ours.offsets == theirs.offsets, text[:80]
        starts, ends = ours.offset_arrays()
        multi_piece += int(np.sum(starts[1:] < ends[:-1]))
        for char in range(len(text) + 1):
            assert ours.char_to_token(char) == theirs.char_to_token(char), (text[:40], char)
    assert multi_piece > 0  # the byte-split case was exercised


def test_bytes_that_do_not_add_up_fall_back_to_the_tokenizers_offsets(tokenizers_under_test
                                                                     ) -> None:
    tok = tokenizers_under_test["shipped"]
    hf = tok._tokenizer
    asked = []

    def fallback(text):
        asked.append(text)
        return hf.encode(text, add_special_tokens=False)

    ids = hf.encode("a different text", add_special_tokens=False).ids
    encoding = IdsEncoding(ids, CRAFTED, tok.byte_lengths(), fallback)
    assert encoding.offsets == hf.encode(CRAFTED, add_special_tokens=False).offsets
    assert asked == [CRAFTED]


def test_a_tokenizer_with_a_normalizer_keeps_the_native_encodings(tmp_path) -> None:
    hf = Tokenizer(models.BPE())
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["Some Text To Learn From"] * 20,
                           trainers.BpeTrainer(vocab_size=300,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert byte_length_table(hf) is None
    tok = SRPTokenizer(hf, name="lowercase")
    encodings = tok.encode_batch(["Mixed CASE text"])
    assert not isinstance(encodings[0], IdsEncoding)
    assert encodings[0].offsets == hf.encode("Mixed CASE text", add_special_tokens=False).offsets
