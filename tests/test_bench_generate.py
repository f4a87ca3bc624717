"""tools/bench_generate.py end to end at toy size: every method runs on both sides, both sides
generate the same number of tokens, and the report holds what docs/benchmarks.md quotes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_generate_reports_every_case(shared_data, tmp_path) -> None:
    report = tmp_path / "gen.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_generate.py", "--batches", "1,3", "--max-new-tokens", "6",
         "--num-beams", "2", "--repeats", "1", "--seq-length", "64",
         "--text", str(shared_data / "tinyshakespeare" / "input.txt"), "--report", str(report)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(report.read_text())
    rows = {(r["method"], r["batch"], r["impl"]): r for r in data["rows"]}
    for method in ("greedy", "sample", "beam", "safebeam"):
        for batch in (1, 3):
            ours = rows[(method, batch, "megatron-srp")]
            # Every answer is exactly max_new_tokens long, so throughputs compare like with like.
            assert ours["tokens"] == batch * 6 and ours["tokens_per_s"] > 0
            if method != "safebeam":
                assert rows[(method, batch, "hf")]["tokens"] == batch * 6
            else:
                assert (method, batch, "hf") not in rows
    assert set(data["ratios"]["vs_hf"]) == {f"{m}@{b}" for m in ("greedy", "sample", "beam")
                                            for b in (1, 3)}
    assert set(data["ratios"]["safebeam_over_beam_time"]) == {"@1", "@3"}
    text = report.with_suffix(".md").read_text()
    assert "| safebeam | 3 |" in text and "SafeBeam time over beam search time" in text
    assert data["machine"]["commit"] and "fresh tiny" in data["model"]
