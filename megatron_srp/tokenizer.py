"""The project's tokenizer: a Hugging Face fast tokenizer plus the reserved special tokens.

This is the one place special tokens are added. Every dataset and checkpoint saves a copy of
the tokenizer (``tokenizer.json`` + ``srp_tokenizer.json``) and records its fingerprint, so
token ids cannot drift between preprocessing, training and evaluation.

``SRPTokenizer`` duck-types what Megatron-Core's datasets read from ``GPTDatasetConfig.tokenizer``
(``vocab_size``, ``eod``, ``pad``, ``tokenize``, ``detokenize``, ``unique_identifiers``) rather
than subclassing ``MegatronTokenizerBase``: importing any ``megatron.core`` module costs seconds,
and preprocessing workers load this module in every process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_srp.chat_template import ChatSpec, read_hf_chat
from megatron_srp.taxonomy import EOD, PAD, REFLECT_CLOSE, REFLECT_OPEN, SPECIAL_TOKENS, UNSAFE_TAG
from megatron_srp.token_offsets import byte_length_table, encode_with_offsets

TOKENIZER_FILE = "tokenizer.json"
SRP_FILE = "srp_tokenizer.json"
FORMAT_VERSION = 1
FINGERPRINT_CHARS = 16

# Settings that change how text is batched, not which ids it gets; left out of the fingerprint.
_NON_ID_KEYS = ("version", "truncation", "padding")


def default_tokenizer_dir() -> Path:
    """The tokenizer shipped with the package (byte-level BPE, 8192 ids incl. special tokens)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Short sha256 of the canonical tokenizer JSON, over the parts that decide token ids.

    Keys are sorted and BPE merges normalised to ``"a b"`` strings, because ``tokenizers``
    releases write merges differently; the same vocabulary therefore keeps its fingerprint
    across library versions, while any change to vocab, merges, added tokens or pre-/post-
    processing changes it.
    """
    data = json.loads(tokenizer.to_str())
    for key in _NON_ID_KEYS:
        data.pop(key, None)
    model = data.get("model") or {}
    if isinstance(model.get("merges"), list):
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


class SRPTokenizer:
    """A ``tokenizers.Tokenizer`` that owns :data:`~megatron_srp.taxonomy.SPECIAL_TOKENS`.

    Special tokens already in the vocabulary keep their ids (e.g. SmolLM2's ``<|endoftext|>``);
    missing ones are appended in ``SPECIAL_TOKENS`` order. They are matched atomically in input
    text and are never assembled from ordinary BPE pieces. The wrapped ``tokenizer`` is modified
    in place (the special tokens are added to it), so do not share it with other code.
    """

    def __init__(self, tokenizer: Tokenizer, name: str, provenance: dict[str, Any] | None = None,
                 chat: ChatSpec | None = None):
        tokenizer.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                for t in SPECIAL_TOKENS
            ]
        )
        self._tokenizer = tokenizer
        self.name = name
        self.provenance = dict(provenance or {})
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self.special_token_ids: dict[str, int] = {t: vocab[t] for t in SPECIAL_TOKENS}
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        # An imported model's own chat format (chat_template.py); None: the project's format.
        # Not part of the fingerprint: it changes how conversations are written, not the ids.
        self.chat = chat
        if chat is not None:
            missing = [t for t in (chat.end_of_turn, *chat.stop_tokens) if t not in vocab]
            if missing:
                raise ValueError(f"tokenizer {name}: the chat format's token(s) {missing} are "
                                 f"not in the vocabulary")

    @classmethod
    def from_dir(cls, path: str | Path) -> SRPTokenizer:
        """Load ``<path>/tokenizer.json``: any HF fast tokenizer dir, or one :meth:`save` wrote.

        If ``srp_tokenizer.json`` is present, the loaded tokenizer must reproduce its fingerprint
        and special token ids exactly; otherwise the directory was edited and loading fails.
        """
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer directory {path}")
        try:
            hf = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(
                f"{tokenizer_file}: not a valid Hugging Face tokenizer: {exc}"
            ) from exc
        srp_file = path / SRP_FILE
        if not srp_file.is_file():
            return cls(hf, name=path.resolve().name, chat=read_hf_chat(path))
        try:
            record = json.loads(srp_file.read_text(encoding="utf-8"))
            name, expected_fp, expected_ids = (
                record["name"],
                record["fingerprint"],
                record["special_tokens"],
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{srp_file}: corrupt tokenizer record ({exc!r})") from exc
        chat = record.get("chat")
        tok = cls(hf, name=name, provenance=record.get("provenance"),
                  chat=ChatSpec.from_dict(chat, f"{srp_file}:chat") if chat else None)
        if tok.fingerprint != expected_fp or tok.special_token_ids != expected_ids:
            raise ValueError(
                f"{path}: tokenizer does not match {SRP_FILE} (fingerprint {tok.fingerprint} vs "
                f"recorded {expected_fp}; special ids {tok.special_token_ids} vs {expected_ids}); "
                "the directory was modified after it was saved"
            )
        return tok

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``srp_tokenizer.json`` into ``path`` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path / TOKENIZER_FILE), pretty=False)
        (path / SRP_FILE).write_text(json.dumps(self.record(), indent=2) + "\n", encoding="utf-8")
        return path

    def record(self) -> dict[str, Any]:
        """What ``srp_tokenizer.json`` holds."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self.special_token_ids),
            "provenance": self.provenance,
            **({"chat": self.chat.to_dict()} if self.chat is not None else {}),
        }

    @property
    def vocab_size(self) -> int:
        """Size of the id space (largest id + 1), i.e. the embedding rows the model needs."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.special_token_ids[EOD]

    @property
    def pad(self) -> int:
        return self.special_token_ids[PAD]

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: the chat format's, else end of document."""
        if self.chat is None:
            return self.eod
        return self._tokenizer.token_to_id(self.chat.end_of_turn)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end generation: end of document and the chat format's stop tokens."""
        extra = self.chat.stop_tokens if self.chat is not None else ()
        return frozenset([self.eod, *(self._tokenizer.token_to_id(t) for t in extra)])

    @property
    def reflect_open_id(self) -> int:
        return self.special_token_ids[REFLECT_OPEN]

    @property
    def reflect_close_id(self) -> int:
        return self.special_token_ids[REFLECT_CLOSE]

    @property
    def unsafe_tag_id(self) -> int:
        return self.special_token_ids[UNSAFE_TAG]

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every token registered as special, the base tokenizer's own included, in id order."""
        decoder = self._tokenizer.get_added_tokens_decoder()
        return tuple(decoder[i].content for i in sorted(decoder) if decoder[i].special)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Megatron hashes this into its dataset cache names, so a new tokenizer gets new caches."""
        return {
            "class": type(self).__name__,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
        }

    def tokenize(self, text: str) -> list[int]:
        """Ids for ``text``; no BOS/EOS is added (the pipeline appends ``eod`` per document)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`tokenize` for many texts in one native call (on the tokenizer's threads);
        ``encode_batch_fast`` (tokenizers >= 0.20) skips the character offsets, which ids alone
        do not need."""
        fast = getattr(self._tokenizer, "encode_batch_fast", None)
        encode = fast if fast is not None else self._tokenizer.encode_batch
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str]) -> list[Any]:
        """Encodings with ids, offsets and ``char_to_token``, for callers that map character
        spans to token spans. For a byte-level BPE the offsets are derived from the ids
        (:mod:`megatron_srp.token_offsets`, the same values at the cost of ids alone);
        otherwise these are the native ``tokenizers`` encodings."""
        table = self.byte_lengths()
        if table is not None and hasattr(self._tokenizer, "encode_batch_fast"):
            return encode_with_offsets(self._tokenizer, table, texts)
        return self._tokenizer.encode_batch(list(texts), add_special_tokens=False)

    def byte_lengths(self) -> Any:
        """UTF-8 bytes per token id (a numpy array), or None where offsets cannot be derived
        from ids; computed once per process."""
        if "_byte_lengths" not in self.__dict__:
            self.__dict__["_byte_lengths"] = byte_length_table(self._tokenizer)
        return self.__dict__["_byte_lengths"]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text for ``ids`` with special tokens kept, so reflections survive decoding."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; KeyError if the tokenizer does not have it."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in tokenizer {self.name!r}")
        return token_id

    def __repr__(self) -> str:
        return (
            f"SRPTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint!r})"
        )


def train_bpe_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    name: str | None = None,
    min_frequency: int = 2,
) -> SRPTokenizer:
    """Train a byte-level BPE tokenizer on text files and save it with the special tokens.

    ``vocab_size`` counts the special tokens, which take the last ids. Training is
    deterministic for the same files and settings.
    """
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer training files not found: {', '.join(missing)}")
    base_size = vocab_size - len(SPECIAL_TOKENS)
    if base_size <= 256:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for merges beyond the 256 byte tokens "
            f"and {len(SPECIAL_TOKENS)} special tokens"
        )
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train([str(p) for p in paths], trainer)
    if hf.get_vocab_size() != base_size:
        raise ValueError(
            f"training files too small: learned {hf.get_vocab_size()} tokens, need {base_size} "
            f"(vocab_size {vocab_size} minus {len(SPECIAL_TOKENS)} special tokens)"
        )
    provenance = {
        "algorithm": "byte-level BPE",
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "files": [
            {
                "name": f"{p.parent.name}/{p.name}",
                "bytes": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for p in paths
        ],
    }
    tok = SRPTokenizer(hf, name=name or f"srp-bpe-{vocab_size}", provenance=provenance)
    tok.save(out_dir)
    return tok
