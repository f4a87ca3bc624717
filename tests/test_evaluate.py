"""tools/evaluate_srp.py end to end: a tiny SRP model trained in the test, labelled segments
from the label sidecar of a real preprocessing run, reflection accuracy by three methods, linear
probes, the report, and resuming after the process is killed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_srp.config import ConfigError
from megatron_srp.evaluation.reflection_accuracy import (LabelError, load_segments,
                                                         pick_shots)
from megatron_srp.evaluation.suite import load_eval_config

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def world(shared_data: Path, tmp_path_factory) -> dict:
    """ToxiGen statements and Wikipedia articles preprocessed into raw and srp datasets with
    the embedded classifier (64-token segments), and a 30-step tiny model trained on srp."""
    tmp = tmp_path_factory.mktemp("evaluate")
    wiki = tmp / "wiki.txt"
    wiki.write_text((shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
                    [:150_000], encoding="utf-8")
    _run([sys.executable, "tools/preprocess_srp.py",
          "--input", str(shared_data / "toxigen" / "toxigen_statements.jsonl"),
          "--input", str(wiki), "--text-split", "wikitext-articles",
          "--output-dir", str(tmp / "data"), "--variants", "raw,srp", "--segment-tokens", "64",
          "--workers", "1"])
    run_dir = tmp / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
          "tools/pretrain_srp.py", "--config", "examples/tiny_cpu.yaml",
          f"data.paths=[{tmp / 'data' / 'srp'}]", f"checkpoint.save={run_dir}",
          "train.train_iters=30", "train.seq_length=128", "train.global_batch_size=8",
          "train.micro_batch_size=8", "train.warmup_iters=3", "train.eval_interval=0",
          "checkpoint.save_interval=15", "logging.progress_bar=false"], timeout=600)
    return {"tmp": tmp, "labels": tmp / "data" / "raw", "run": run_dir}


def _config(world: dict, out: Path, **data) -> Path:
    cfg = {"out_dir": str(out),
           "checkpoints": [{"name": "srp-30", "path": str(world["run"])},
                           {"name": "srp-15", "path": str(world["run"] / "iter_0000015")}],
           "data": {"labels": str(world["labels"]), "max_segments": 80, **data},
           "reflection": {"shots": 4, "batch_size": 16},
           "probes": {"n_train_per_class": 20, "seeds": [0, 1, 2]}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_segments_come_from_the_sidecar(world, tmp_path) -> None:
    from megatron_srp.tokenizer import SRPTokenizer
    tok = SRPTokenizer.from_dir(Path(str(world["labels"]) + ".tokenizer"))
    segs = load_segments(world["labels"], max_segments=60, seed=1)
    assert len(segs) == 60 and sum(not s.safe for s in segs) == 30  # balanced
    assert load_segments(world["labels"], max_segments=60, seed=1)[0].tokens == segs[0].tokens
    # A ToxiGen statement is one whole document and one segment: its tokens are the statement.
    statement = next(s for s in segs if "toxigen" in s.doc_id)
    file, line = statement.doc_id.rsplit(":", 1)
    record = json.loads(Path(file).read_text(encoding="utf-8").splitlines()[int(line) - 1])
    # It starts its document, so the end-of-document token comes first, as in training.
    assert statement.tokens[0] == tok.eod
    assert tok.detokenize(statement.tokens[1:]).strip() == record["text"].strip()
    whole = load_segments(world["labels"], context="document", max_segments=60, seed=1)
    assert all(w.tokens[-len(s.tokens):] == s.tokens for w, s in zip(whole, segs))
    assert any(len(w.tokens) > len(s.tokens) for w, s in zip(whole, segs))
    shots, rest = pick_shots(segs, 4, seed=0)
    assert len(shots) == 4 and sum(not s.safe for s in shots) == 2 and len(rest) == 56


def test_bad_sidecars_are_named(world, tmp_path) -> None:
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        (tmp_path / f"copy{ext}").write_bytes(Path(str(world["labels"]) + ext).read_bytes())
    shutil.copytree(str(world["labels"]) + ".tokenizer", tmp_path / "copy.tokenizer")
    lines = Path(str(world["labels"]) + ".labels.jsonl").read_text().splitlines()
    (tmp_path / "copy.labels.jsonl").write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]))
    with pytest.raises(LabelError, match=r"copy\.labels\.jsonl:4"):
        load_segments(prefix)
    bad = json.loads(lines[0])
    bad["tokens"] = [0, 10 ** 6]
    (tmp_path / "copy.labels.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(LabelError, match=r"copy\.labels\.jsonl:1: tokens"):
        load_segments(prefix)
    with pytest.raises(FileNotFoundError, match="nothing.labels.jsonl"):
        load_segments(tmp_path / "nothing")
    shutil.rmtree(tmp_path / "copy.tokenizer")
    (tmp_path / "copy.labels.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match="copy.tokenizer does not exist"):
        load_segments(prefix)


def test_config_errors_name_the_key(world, tmp_path) -> None:
    path = _config(world, tmp_path / "out")
    with pytest.raises(ConfigError, match="reflection.methods"):
        load_eval_config(path, ["reflection.methods=[telepathy]"])
    with pytest.raises(ConfigError, match="data.context"):
        load_eval_config(path, ["data.context=chapter"])
    with pytest.raises(ConfigError, match="colour"):
        load_eval_config(path, ["colour=blue"])
    with pytest.raises(ConfigError, match="--config"):
        load_eval_config(tmp_path / "missing.yaml")
    proc = subprocess.run([sys.executable, "tools/evaluate_srp.py", "--config", str(path),
                           "--no-progress", "probes.layers=[top]"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "probes.layers" in proc.stderr


def test_evaluation_runs_reports_and_resumes_after_a_kill(world, tmp_path) -> None:
    out = tmp_path / "eval"
    config = _config(world, out)
    cmd = [sys.executable, "tools/evaluate_srp.py", "--config", str(config), "--no-progress"]
    first_unit = out / "units" / "srp-30" / "reflection_reflection.json"
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not first_unit.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first_unit.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = first_unit.stat().st_mtime_ns
    assert not (out / "results.json").exists()  # a killed run leaves no report

    done = _run(cmd)
    assert first_unit.stat().st_mtime_ns == before  # not recomputed
    assert "reused 1" in done.stdout or "reused" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["checkpoints"] == ["srp-30", "srp-15"]
    for name in ("srp-30", "srp-15"):
        units = results["results"][name]
        assert set(units) == {"reflection_reflection", "reflection_few_shot",
                              "reflection_probe", "probes"}
        refl = units["reflection_reflection"]
        assert refl["n"] == 80 and 0.0 <= refl["accuracy"] <= 1.0
        assert refl["confusion"]["true_unsafe"]["pred_safe"] + \
            refl["confusion"]["true_unsafe"]["pred_unsafe"] == 40
        assert units["reflection_few_shot"]["n"] == 76  # 4 shots held out as the prompt
        for layer in ("first", "middle", "last"):
            p = units["probes"][layer]
            assert len(p["aucs"]) == 3 and 0.0 <= p["auc_mean"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Reflection accuracy" in report and "## Linear probes" in report
    assert "| srp-15 | reflection |" in report
    for fig in ("reflection_accuracy.png", "probe_auc.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Everything finished: a rerun computes nothing; a changed setting redoes only its units.
    again = _run(cmd)
    assert "computed 0 unit(s), reused 8" in again.stdout
    changed = _run(cmd + ["reflection.shots=2"])
    assert "computed 2 unit(s), reused 6" in changed.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["srp-30"]["reflection_few_shot"]["n"] == 78
