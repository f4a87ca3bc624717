"""What the cluster preprocessing tests share: the command and the byte comparison (the
fixtures ``cluster_inputs`` and ``local_preprocess_run`` are in conftest.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_srp.data.outputs import VOLATILE_META_KEYS, dataset_paths

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("raw", "srp")
RUN_TIMEOUT = 300  # a run that outlives this is a hang


def args(shared: Path, out: Path) -> list[str]:
    inputs = shared / "in"
    return [sys.executable, str(REPO / "tools" / "preprocess_srp.py"),
            "--input", str(inputs / "valid.txt"), "--input", str(inputs / "test.txt"),
            "--input", str(inputs / "toxigen_statements.jsonl"),
            "--text-split", "wikitext-articles", "--variants", ",".join(VARIANTS),
            "--shard-mb", "0.05", "--no-progress", "--keep-work", "--output-dir", str(out)]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_identical(local: Path, other: Path) -> None:
    for name in VARIANTS:
        a, b = dataset_paths(local / name), dataset_paths(other / name)
        for key in ("bin", "idx", "labels"):
            assert a[key].read_bytes() == b[key].read_bytes(), (name, key)
        ma, mb = (json.loads(p["meta"].read_text()) for p in (a, b))
        for key in VOLATILE_META_KEYS:
            ma.pop(key), mb.pop(key)
        assert ma == mb, name
