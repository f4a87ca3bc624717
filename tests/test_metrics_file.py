"""metrics.jsonl and the JSON result files are strict JSON: a figure that does not exist (MFU
on a CPU, a rate over no answers) is null, never NaN, so jq and strict parsers read them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_srp.training.launch import records
from megatron_srp.training.logger import RunLogger
from megatron_srp.units import write_atomic


def _strict(line: str):
    def reject(name: str):
        raise ValueError(f"{name} in {line!r}")
    return json.loads(line, parse_constant=reject)


def test_a_real_cpu_run_writes_strict_json_lines_with_mfu_null(tiny_pretrained: Path) -> None:
    lines = (tiny_pretrained / "metrics.jsonl").read_text().splitlines()
    parsed = [_strict(line) for line in lines]
    with_throughput = [r for r in parsed if "tokens_per_s" in r]
    assert with_throughput, "the run logged no throughput figures"
    assert all(r["mfu"] is None for r in with_throughput)  # no peak FLOP/s known on a CPU
    assert all(isinstance(r["loss"], float) for r in parsed if r["split"] == "train")


def test_the_logger_writes_nan_and_infinity_as_null(tmp_path: Path) -> None:
    log = RunLogger(True, 2, 0, str(tmp_path), None, None, "t", False, {})
    log.step(1, {"loss": 1.5, "mfu": math.nan, "grad_norm": math.inf}, console=False)
    log.close()
    (row,) = records(tmp_path, "train")
    assert row == {"step": 1, "split": "train", "loss": 1.5, "mfu": None, "grad_norm": None}


def test_records_names_the_line_that_is_not_strict_json(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "loss": 1.0}\n'
                                            '{"split": "train", "mfu": NaN}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not strict JSON"):
        records(tmp_path, "train")


def test_result_files_are_strict_json_at_every_depth(tmp_path: Path) -> None:
    write_atomic(tmp_path / "r.json", {"a": [1.0, math.nan, {"b": -math.inf}], "c": "x"})
    assert _strict((tmp_path / "r.json").read_text()) == {"a": [1.0, None, {"b": None}], "c": "x"}


def test_a_missing_figure_read_back_is_nan_again(tmp_path: Path) -> None:
    from megatron_srp.units import figure
    write_atomic(tmp_path / "r.json", {"balanced_accuracy": math.nan, "loss": 0.5})
    back = json.loads((tmp_path / "r.json").read_text())
    assert math.isnan(figure(back["balanced_accuracy"])) and figure(back["loss"]) == 0.5
