"""SRPTokenizer: special tokens, id stability, fingerprints, and the shipped asset."""

from __future__ import annotations

import json
import pickle
import runpy
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_srp.taxonomy import EOD, PAD, REFLECT_CLOSE, REFLECT_OPEN, SPECIAL_TOKENS, UNSAFE_TAG
from megatron_srp.tokenizer import (
    SRP_FILE,
    TOKENIZER_FILE,
    SRPTokenizer,
    default_tokenizer_dir,
    train_bpe_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_IDS = {EOD: 8187, PAD: 8188, REFLECT_OPEN: 8189, REFLECT_CLOSE: 8190, UNSAFE_TAG: 8191}


@pytest.fixture(scope="module")
def shipped() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


def _small_corpus(tmp_path: Path, shared_data: Path, chars: int = 60_000) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:chars])
    return path


def test_shipped_tokenizer_ids(shipped: SRPTokenizer) -> None:
    assert shipped.vocab_size == 8192
    assert shipped.special_token_ids == SHIPPED_IDS
    assert (shipped.eod, shipped.pad) == (8187, 8188)
    reflection_ids = (shipped.reflect_open_id, shipped.reflect_close_id, shipped.unsafe_tag_id)
    assert reflection_ids == (8189, 8190, 8191)
    assert shipped.token_to_id(REFLECT_OPEN) == 8189
    assert shipped.special_tokens == SPECIAL_TOKENS
    record = json.loads((default_tokenizer_dir() / SRP_FILE).read_text())
    assert record["fingerprint"] == shipped.fingerprint and record["name"] == shipped.name
    assert (default_tokenizer_dir() / TOKENIZER_FILE).stat().st_size < 1_000_000


def test_shipped_tokenizer_round_trips_shakespeare(
    shipped: SRPTokenizer, shared_data: Path
) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    ids = shipped.tokenize(text)
    assert shipped.detokenize(ids) == text
    assert len(ids) < len(text) / 3  # a trained BPE, not bytes
    assert not set(ids) & set(SHIPPED_IDS.values())


def test_special_tokens_are_atomic(shipped: SRPTokenizer) -> None:
    ids = shipped.tokenize("a<|reflect|>Safe<|/reflect|>")
    assert ids.count(shipped.reflect_open_id) == 1 and ids.count(shipped.reflect_close_id) == 1
    assert ids[-1] == shipped.reflect_close_id
    assert shipped.detokenize(ids) == "a<|reflect|>Safe<|/reflect|>"
    for token, token_id in SHIPPED_IDS.items():
        assert shipped.tokenize(token) == [token_id]
        assert shipped.tokenize(f"x {token} y").count(token_id) == 1


@pytest.mark.parametrize(
    "text",
    [
        "<|reflect",
        "reflect|>",
        "< |reflect|>",
        "<|REFLECT|>",
        "<|reflect |>",
        "<potentially_unsafe>",
        "<|endoftext",
        "<|/ reflect|>",
        "| reflect | Safe | / reflect |",
    ],
)
def test_ordinary_text_never_yields_special_ids(shipped: SRPTokenizer, text: str) -> None:
    ids = shipped.tokenize(text)
    assert not set(ids) & set(SHIPPED_IDS.values())
    assert shipped.detokenize(ids) == text


def test_no_ordinary_token_spells_a_special_token(shipped: SRPTokenizer) -> None:
    special_ids = set(SHIPPED_IDS.values())
    for token_id in range(shipped.vocab_size):
        if token_id not in special_ids:
            piece = shipped.detokenize([token_id])
            assert not any(s in piece for s in SPECIAL_TOKENS), (token_id, piece)


def test_save_load_keeps_ids_and_bytes(shipped: SRPTokenizer, tmp_path: Path) -> None:
    shipped.save(tmp_path / "a")
    loaded = SRPTokenizer.from_dir(tmp_path / "a")
    assert loaded.special_token_ids == shipped.special_token_ids
    assert loaded.fingerprint == shipped.fingerprint and loaded.name == shipped.name
    sample = "To be, or not to be<|reflect|>Unsafe: S2<|/reflect|><|endoftext|>"
    assert loaded.tokenize(sample) == shipped.tokenize(sample)
    loaded.save(tmp_path / "b")
    for name in (TOKENIZER_FILE, SRP_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    clone = pickle.loads(pickle.dumps(shipped))  # what preprocessing workers receive
    assert clone.tokenize(sample) == shipped.tokenize(sample)


def test_existing_special_tokens_keep_their_ids(tmp_path: Path, shared_data: Path) -> None:
    """An HF tokenizer dir (like SmolLM2's) that already owns <|endoftext|> at id 0."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOD, "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(_small_corpus(tmp_path, shared_data))], trainer)
    hf_dir = tmp_path / "SmolLike-1M"
    hf_dir.mkdir()
    hf.save(str(hf_dir / TOKENIZER_FILE))

    tok = SRPTokenizer.from_dir(hf_dir)
    assert tok.name == "SmolLike-1M"
    assert tok.eod == 0
    appended = [tok.pad, tok.reflect_open_id, tok.reflect_close_id, tok.unsafe_tag_id]
    assert appended == [600, 601, 602, 603]
    assert tok.vocab_size == 604
    assert tok.special_tokens == (EOD, "<|im_start|>", PAD, REFLECT_OPEN, REFLECT_CLOSE, UNSAFE_TAG)
    tok.save(tmp_path / "saved")
    assert SRPTokenizer.from_dir(tmp_path / "saved").special_token_ids == tok.special_token_ids


def test_fingerprint_tracks_vocabulary(tmp_path: Path, shared_data: Path) -> None:
    corpus = _small_corpus(tmp_path, shared_data)
    a = train_bpe_tokenizer([corpus], 600, tmp_path / "a")
    again = train_bpe_tokenizer([corpus], 600, tmp_path / "again")
    b = train_bpe_tokenizer([corpus], 700, tmp_path / "b")
    assert a.fingerprint == again.fingerprint
    assert a.fingerprint != b.fingerprint
    assert (a.vocab_size, b.vocab_size) == (600, 700)
    assert a.special_token_ids[EOD] == 595

    hf = Tokenizer.from_file(str(tmp_path / "a" / TOKENIZER_FILE))
    hf.add_tokens(["thou art"])
    assert SRPTokenizer(hf, name="edited").fingerprint != a.fingerprint


def test_edited_directory_is_rejected(tmp_path: Path, shared_data: Path) -> None:
    train_bpe_tokenizer([_small_corpus(tmp_path, shared_data)], 600, tmp_path / "tok")
    path = tmp_path / "tok" / TOKENIZER_FILE
    data = json.loads(path.read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match srp_tokenizer.json"):
        SRPTokenizer.from_dir(tmp_path / "tok")


def test_bad_tokenizer_dirs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in .* {tmp_path}$"):
        SRPTokenizer.from_dir(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer"):
        SRPTokenizer.from_dir(tmp_path)


def test_training_needs_enough_text(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("to be or not to be\n")
    with pytest.raises(ValueError, match="training files too small"):
        train_bpe_tokenizer([tiny], 8192, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe_tokenizer([tmp_path / "missing.txt"], 8192, tmp_path / "out")


def test_tool_defaults_reproduce_shipped_asset(tmp_path: Path, shared_data: Path) -> None:
    tool = runpy.run_path(str(REPO_ROOT / "tools" / "train_tokenizer.py"))
    tool["main"](["--data-dir", str(shared_data), "--out-dir", str(tmp_path)])
    shipped_json = (default_tokenizer_dir() / TOKENIZER_FILE).read_bytes()
    assert (tmp_path / TOKENIZER_FILE).read_bytes() == shipped_json
    shipped_fp = SRPTokenizer.from_dir(default_tokenizer_dir()).fingerprint
    assert SRPTokenizer.from_dir(tmp_path).fingerprint == shipped_fp
