"""Preprocessing output pinned to fixed digests: speed work on the pipeline must not move a byte.

``tests/data/preprocess_reference.json`` holds the sha256 of every ``.bin``, ``.idx`` and label
sidecar that two runs write on a fixed corpus (WikiText-2 valid, as articles, and the ToxiGen
statements from the shared data): a raw-only run (no classifier), an srp run with the embedded
classifier (variants raw, filter, tag, srp), and an srp run with a 49,152-entry BPE trained on
the shared data (the embedded classifier then reads segment texts and tokenizes them with its
own tokenizer). It also holds the digests of the two input files, so a changed input is
reported as such, not as changed output.

An intended change of the output (a new tokenizer, a different sidecar field) needs a new
reference: ``SRP_WRITE_PREPROCESS_REFERENCE=1 pytest tests/test_preprocess_reference.py``
rewrites the file; commit it with the change that explains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from megatron_srp.data.outputs import dataset_paths
from megatron_srp.data.preprocess import PreprocessConfig, run_preprocess
from megatron_srp.data.shards import ReaderOptions
from megatron_srp.data.variants import parse_variants
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

REFERENCE = Path(__file__).resolve().parent / "data" / "preprocess_reference.json"
INPUTS = ("wikitext2/valid.txt", "toxigen/toxigen_statements.jsonl")
RUNS = {"raw": "raw", "srp": "raw,filter,tag,srp", "srp-bpe-49152": "srp"}
WRITE = os.environ.get("SRP_WRITE_PREPROCESS_REFERENCE", "") == "1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer(run: str, shared_data: Path, work: Path) -> SRPTokenizer:
    if not run.endswith("-bpe-49152"):
        return SRPTokenizer.from_dir(default_tokenizer_dir())
    from megatron_srp.bench.preprocess import BPE_49K, resolve_tokenizers

    return SRPTokenizer.from_dir(resolve_tokenizers([BPE_49K], work, shared_data)[BPE_49K]["dir"])


def _staged(shared_data: Path) -> Path:
    """The inputs copied to one fixed folder: document ids (in the sidecars and the tags)
    carry the input's path, which must not depend on where the checkout's shared data lies."""
    root = Path(tempfile.gettempdir()) / "srp-preprocess-reference"
    for name in INPUTS:
        target = root / name
        if not target.exists() or target.read_bytes() != (shared_data / name).read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_data / name, target)
    return root


def _digests(shared_data: Path, out: Path, variants: str, workers: int = 1,
             backend: str = "local", run: str = "srp") -> dict[str, str]:
    """sha256 of every dataset file one run writes, keyed ``<variant>.<bin|idx|labels>``."""
    config = PreprocessConfig(
        inputs=[str(_staged(shared_data) / name) for name in INPUTS], output_dir=str(out),
        variants=parse_variants(variants), reader=ReaderOptions(text_split="wikitext-articles"),
        shard_bytes=300_000, workers=workers, backend=backend, progress=False)
    result = run_preprocess(config, _tokenizer(run, shared_data, out.parent))
    digests = {}
    for name, prefix in result.layout.prefixes.items():
        for key in ("bin", "idx", "labels"):
            path = dataset_paths(prefix)[key]
            if path.exists():
                digests[f"{name}.{key}"] = _sha256(path)
    return digests


def _reference(shared_data: Path) -> dict:
    if WRITE:
        pytest.skip("writing the reference")
    if not REFERENCE.exists():
        pytest.fail(f"{REFERENCE} is missing; create it with SRP_WRITE_PREPROCESS_REFERENCE=1")
    reference = json.loads(REFERENCE.read_text())
    for name, digest in reference["inputs"].items():
        actual = _sha256(shared_data / name)
        assert actual == digest, (f"input {shared_data / name} changed (sha256 {actual}, the "
                                  f"reference was made from {digest}): the output digests no "
                                  "longer apply")
    return reference


@pytest.mark.parametrize("run", sorted(RUNS))
def test_output_matches_the_reference(run, shared_data, tmp_path) -> None:
    reference = _reference(shared_data)
    expected = reference["runs"][run]
    actual = _digests(shared_data, tmp_path / run, RUNS[run], run=run)
    assert sorted(actual) == sorted(expected), f"{run}: files differ: {sorted(actual)}"
    changed = [key for key in expected if actual[key] != expected[key]]
    assert not changed, f"{run}: these outputs changed: {changed}"
    if run.startswith("srp"):
        labels = (tmp_path / run / "srp.labels.jsonl").read_text().splitlines()
        assert any(json.loads(line)["label"] == "unsafe" for line in labels)


def test_two_workers_match_the_reference(shared_data, tmp_path) -> None:
    """The same bytes from two worker processes (shards are merged in order)."""
    expected = _reference(shared_data)["runs"]["srp"]
    assert _digests(shared_data, tmp_path / "w2", RUNS["srp"], workers=2) == expected


@pytest.mark.skipif(not WRITE, reason="set SRP_WRITE_PREPROCESS_REFERENCE=1 to rewrite")
def test_write_reference(shared_data, tmp_path) -> None:
    reference = {
        "inputs": {name: _sha256(shared_data / name) for name in INPUTS},
        "runs": {run: _digests(shared_data, tmp_path / run, variants, run=run)
                 for run, variants in RUNS.items()},
    }
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
