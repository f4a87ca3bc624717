"""The preprocessing benchmark: corpus builder, process-tree measurement, report, skip paths.

Real files and real subprocesses on a ~0.3 MB corpus. The comparison with Megatron-LM runs only
when ``SRP_MEGATRON_LM`` names a checkout (and is marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_srp.bench import preprocess as bench
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MB = 0.3


@pytest.fixture(scope="module")
def tiny_corpus(shared_data: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    bench.build_corpus(path, TINY_MB, shared_data)
    return path


def test_corpus_is_deterministic_and_hits_the_target(shared_data: Path, tiny_corpus: Path,
                                                     tmp_path: Path) -> None:
    again = tmp_path / "again.jsonl"
    record = bench.build_corpus(again, TINY_MB, shared_data)
    assert again.read_bytes() == tiny_corpus.read_bytes()
    lines = again.read_bytes().splitlines(keepends=True)
    target = int(TINY_MB * bench.MB)
    assert target <= record["bytes"] == again.stat().st_size < target + max(map(len, lines))
    assert record["documents"] == len(lines)
    docs = [json.loads(line) for line in lines]
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(300 <= len(d["text"]) <= 20_000 for d in docs)
    assert len(record["documents_per_source"]) >= 5  # several sources, not one file

    # Same parameters: reused as is. Another seed: rebuilt, and different.
    mtime = again.stat().st_mtime_ns
    assert bench.build_corpus(again, TINY_MB, shared_data) == record
    assert again.stat().st_mtime_ns == mtime
    bench.build_corpus(again, TINY_MB, shared_data, seed=1)
    assert again.read_bytes() != tiny_corpus.read_bytes()
    assert json.loads((tmp_path / "again.jsonl.json").read_text())["params"]["seed"] == 1
    assert not list(tmp_path.glob("*.tmp*"))


def test_corpus_cycles_without_identical_documents(shared_data: Path, tmp_path: Path) -> None:
    # One small source (toxigen, 0.2 MB) for a 0.6 MB corpus: the material is cycled.
    data = tmp_path / "data" / "toxigen"
    data.mkdir(parents=True)
    (data / "toxigen_statements.jsonl").write_bytes(
        (shared_data / "toxigen" / "toxigen_statements.jsonl").read_bytes())
    out = tmp_path / "cycled.jsonl"
    record = bench.build_corpus(out, 0.6, tmp_path / "data")
    assert record["cycles"] >= 3 and list(record["documents_per_source"]) == ["toxigen"]
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(set(texts)) == len(texts)


def test_measure_sums_rss_over_the_process_tree(tmp_path: Path) -> None:
    # The parent holds ~60 MB and its child another ~120 MB: the sum must exceed either.
    code = ("import subprocess, sys, time\n"
            "a = bytearray(60 << 20)\n"
            "c = subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(120 << 20); time.sleep(1.0)'])\n"
            "c.wait()\n")
    run = bench.measure([sys.executable, "-c", code], tmp_path / "log.txt")
    assert run["returncode"] == 0
    assert run["peak_rss_bytes"] > 180 * bench.MB
    assert 1.0 <= run["seconds"] < 30 and run["cpu_seconds"] > 0
    assert run["peak_pss_bytes"] and run["polls"] > 5 and run["max_processes"] == 2


def test_raw_and_bare_cases_count_the_same_tokens(shared_data: Path, tiny_corpus: Path,
                                                  tmp_path: Path) -> None:
    """Our raw case and bare tokenization at 1 worker, measured as real subprocesses, and the
    memory-scaling run: only the chosen case, once."""
    report = bench.run_bench(tmp_path, TINY_MB, [1], ["bare", "ours-raw"], data_dir=shared_data,
                             scaling_mb=TINY_MB / 10, scaling_cases=["ours-raw"])
    corpus = Path(report["corpora"][f"{TINY_MB:g}"]["path"])
    assert corpus.read_bytes() == tiny_corpus.read_bytes()
    assert [(r["case"], r["corpus_mb"]) for r in report["runs"]] == [
        ("bare", TINY_MB), ("ours-raw", TINY_MB), ("ours-raw", TINY_MB / 10)]
    bare, run, small = report["runs"]
    assert all(r["returncode"] == 0 for r in report["runs"]), [r.get("error") for r in
                                                               report["runs"]]
    ds = IndexedDataset(run["prefix"])
    assert run["tokens"] == int(ds.sequence_lengths.sum()) and run["documents"] == len(ds)
    # Independently: our tokenizer over the corpus, one end-of-document per document.
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert not any(t in text for text in texts for t in tok.special_tokens)
    assert run["tokens"] == sum(len(ids) + 1 for ids in tok.tokenize_batch(texts))
    assert (bare["tokens"], bare["documents"]) == (run["tokens"], run["documents"])
    assert run["documents"] == run["input_documents"] == len(texts)
    assert run["peak_rss_bytes"] > 50 * bench.MB and run["docs_per_s"] > 0
    assert run["max_processes"] >= 1 and run["cpu_seconds"] > 0
    assert small["documents"] < run["documents"]
    assert report["machine"]["cpu_count"] and report["machine"]["git_commit"]
    rows = {(r["case"], r["corpus_mb"]): r for r in report["summary"]}
    row = rows[("ours-raw", TINY_MB)]
    assert row["tokens"] == run["tokens"] and row["seconds"] == run["seconds"]
    assert row["x_bare"] == pytest.approx(run["seconds"] / bare["seconds"])
    assert rows[("bare", TINY_MB)]["x_bare"] == 1.0 and row["mlm_speedup"] is None
    goals = {g["goal"].split(" (")[0]: g for g in report["goals"]}
    assert goals["raw <= 1.25 x bare"]["ratio"] == pytest.approx(row["x_bare"])
    assert goals["ours-raw peak RSS flat"]["big_mb"] == row["peak_rss_mb"]
    text = (tmp_path / "report.md").read_text()
    assert text == bench.markdown_report(json.loads((tmp_path / "report.json").read_text()))
    assert (f"| shipped | ours-raw | 1 | {TINY_MB:g} | {run['documents']} | {run['tokens']} |"
            in text)


def test_bare_tokenize_names_the_bad_line(tmp_path: Path) -> None:
    from megatron_srp.bench import bare_tokenize

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    tokenizer = default_tokenizer_dir() / "tokenizer.json"
    with pytest.raises(ValueError, match=r"c\.jsonl:2: no text under key 'text'"):
        bare_tokenize.tokenize_corpus(corpus, tokenizer)
    corpus.write_text('{"text": "one two"}\n{"text": "three"}\n')
    counts = bare_tokenize.tokenize_corpus(corpus, tokenizer, batch_docs=1)
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    assert counts == {"documents": 2, "tokens": len(tok.tokenize("one two")) + 1
                      + len(tok.tokenize("three")) + 1}


def test_the_49k_tokenizer_is_trained_once(shared_data: Path, tmp_path: Path) -> None:
    (tok,) = bench.resolve_tokenizers([bench.BPE_49K], tmp_path, shared_data).values()
    assert tok["vocab_size"] == 49152 and "<|endoftext|>" in tok["special_tokens"]
    path = Path(tok["dir"]) / "tokenizer.json"
    mtime = path.stat().st_mtime_ns
    assert bench.resolve_tokenizers([bench.BPE_49K], tmp_path, shared_data)[bench.BPE_49K] == tok
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="no .*tokenizer.json"):
        bench.resolve_tokenizers([str(tmp_path / "nowhere")], tmp_path, shared_data)


@pytest.mark.slow
def test_ray_case_matches_local_bytes(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    report = bench.run_bench(tmp_path, TINY_MB, [2], ["ours-srp", "ours-srp-ray"],
                             data_dir=shared_data, ours_args=["--shard-mb", "0.1"])
    assert all(r["returncode"] == 0 for r in report["runs"])
    (check,) = report["ray_checks"]
    assert check["identical"] and check["files"] == ["bin", "idx", "labels.jsonl"]
    assert any(g["goal"].startswith("ours-srp --backend ray") and g["met"]
               for g in report["goals"])


def test_cli_reports_the_megatron_skip(shared_data: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "tools/bench_preprocess.py", "--corpus-mb", str(TINY_MB),
           "--cases", "megatron-lm", "--work-dir", str(tmp_path), "--data-dir", str(shared_data)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert bench.SKIP_NO_MEGATRON in done.stderr
    assert f"## Skipped\n\n- {bench.SKIP_NO_MEGATRON}" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == [
        bench.SKIP_NO_MEGATRON]


def test_megatron_case_skips_with_a_clear_message(tmp_path: Path) -> None:
    args = (["megatron-lm"], [1], sys.executable)
    assert bench.plan_cases(*args, None, sys.executable, tmp_path)[1] == [bench.SKIP_NO_MEGATRON]
    planned, skipped = bench.plan_cases(*args, str(tmp_path / "nope"), sys.executable, tmp_path)
    assert not planned and "does not exist" in skipped[0]


def _dataset(prefix: Path, docs: list[list[int]]) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(8192))
    for ids in docs:
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_compare_datasets_explains_special_token_differences(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    texts = ["plain", "has <|endoftext|> inside", "plain again"]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = _dataset(tmp_path / "ours", [[1, 2, 9], [3, 9], [4, 9]])
    same = _dataset(tmp_path / "same", [[1, 2, 9], [3, 9, 9], [4, 9]])
    other = _dataset(tmp_path / "other", [[1, 2, 9], [3, 9], [5, 9]])
    specials = ["<|endoftext|>"]
    check = bench.compare_datasets(ours, same, corpus, specials)
    assert check["same_tokens"] and check["identical"] == 2
    assert check["differing_explained_by_special_tokens"] == 1
    check = bench.compare_datasets(ours, other, corpus, specials)
    assert not check["same_tokens"] and check["first_unexplained"] == [2]


def test_goals_and_markdown_from_summary_rows() -> None:
    def run(case: str, workers: int, mb: float, seconds: float, rss: float, repeat: int = 0
            ) -> dict:
        return {"tokenizer": "shipped", "case": case, "workers": workers, "corpus_mb": mb,
                "returncode": 0, "documents": 10, "tokens": 99, "input_documents": 10,
                "seconds": seconds, "docs_per_s": 10 / seconds, "tokens_per_s": 99 / seconds,
                "mb_per_s": 1.0, "cpu_seconds": seconds, "peak_rss_bytes": rss * bench.MB,
                "peak_pss_bytes": None, "max_processes": 4, "repeat": repeat}

    runs = [run("bare", 2, 50, 4.0, 300), run("ours-raw", 2, 50, 4.8, 400),
            run("ours-srp", 2, 50, 10.0, 500), run("megatron-lm", 2, 50, 12.0, 900),
            run("ours-srp-ray", 2, 50, 12.5, 900), run("ours-raw", 2, 5, 1.0, 390),
            # a second repeat of srp and megatron-lm, and one of srp alone (no pair)
            run("ours-srp", 2, 50, 12.0, 500, 1), run("megatron-lm", 2, 50, 12.0, 900, 1),
            run("ours-srp", 2, 50, 8.0, 500, 2)]
    rows = bench.summarize(runs)
    by_case = {(r["case"], r["corpus_mb"]): r for r in rows}
    assert by_case[("ours-raw", 50)]["x_bare"] == pytest.approx(1.2)
    assert by_case[("ours-srp", 50)]["mlm_speedup"] == pytest.approx(1.2)
    ray = [{"tokenizer": "shipped", "case": "ours-srp", "workers": 2, "identical": True,
            "files": ["bin"], "differing": []}]
    goals = {g["goal"].split(" (")[0]: g
             for g in bench.evaluate_goals(rows, 50, 5, 1.25, ray, runs)}
    assert goals["raw <= 1.25 x bare"]["met"]
    assert goals["raw <= 1.25 x bare"]["per_repeat"] == [pytest.approx(1.2)]
    srp_goal = goals["srp >= 1.5 x faster than megatron-lm"]
    assert not srp_goal["met"] and srp_goal["ratio"] == pytest.approx(1.2)  # of the medians
    assert srp_goal["per_repeat"] == [pytest.approx(1.2), pytest.approx(1.0)]
    assert goals["ours-raw peak RSS flat"]["met"]
    assert goals["ours-srp --backend ray: same bytes as local"]["met"]
    assert goals["ours-srp --backend ray: same bytes as local"]["ratio"] == pytest.approx(0.8)
    report = {"machine": {"date_utc": "d", "cpu_model": "cpu", "cpu_count": 2, "memory_gb": 1,
                          "python": "3", "torch": "t", "megatron-core": "m", "git_commit": "abc",
                          "git_dirty": False},
              "params": {"repeats": 1, "scaling_mb": 5}, "summary": rows,
              "goals": list(goals.values()), "skipped": ["skipped x"], "ray_checks": ray}
    text = bench.markdown_report(report)
    assert text.count("| shipped | ours-raw | 2 |") == 3  # two table rows and one flatness row
    assert "| 4.8 | 4.8 | 2 | 21 | 400 | - | 1.20 | 1.20 | 2.50 |" in text
    assert ("| srp >= 1.5 x faster than megatron-lm (wall time) | shipped | 2 | 1.20 | 1.20 | "
            "1.20, 1.00 | NO |" in text)
    assert "- skipped x" in text and "ours-srp, 2 workers: bin byte-identical" in text


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SRP_MEGATRON_LM"),
                    reason="set SRP_MEGATRON_LM to a Megatron-LM checkout (and "
                           "SRP_MEGATRON_PYTHON to a python with transformers, six, triton)")
def test_megatron_lm_gives_the_same_token_ids(shared_data: Path, tmp_path: Path) -> None:
    report = bench.run_bench(tmp_path, TINY_MB, [1], ["ours-raw", "megatron-lm"],
                             megatron_lm=os.environ["SRP_MEGATRON_LM"],
                             megatron_python=os.environ.get("SRP_MEGATRON_PYTHON"),
                             data_dir=shared_data)
    assert not report["skipped"] and all(r["returncode"] == 0 for r in report["runs"])
    (check,) = report["tokenizer_checks"]
    assert check["same_tokens"] and check["identical"] == check["compared"] > 100


def test_stage_profile_sorts_samples_into_stages(tmp_path: Path) -> None:
    from megatron_srp.bench import stage_profile

    proc = 'process 1:"python tools/preprocess_srp.py"'
    lines = [
        f"{proc};main (preprocess_srp.py:10);SRPTokenizer.tokenize_batch "
        "(megatron_srp/tokenizer.py:189) 70",
        f"{proc};Labeler.label (megatron_srp/data/labeling.py:77);EmbeddedClassifier."
        "classify (megatron_srp/reflection/classifiers.py:197);SRPTokenizer.encode_batch "
        "(megatron_srp/tokenizer.py:190) 20",  # a classifier tokenizing again: classification
        f"{proc};segment_text (megatron_srp/reflection/segment.py:250) 6",
        f"{proc};<module> (preprocess_srp.py:1);_find_and_load (<frozen importlib._bootstrap>:1)"
        " 4",
    ]
    path = tmp_path / "srp-w1.txt"
    path.write_text("\n".join(lines) + "\n")
    counts = stage_profile.stage_samples(path)
    assert counts == {"tokenization (encode_batch)": 70, "classification": 20,
                      "segmenting (sentence ends, cuts)": 6,
                      "start-up (imports, tokenizer and classifier loading)": 4}
    table = stage_profile.markdown_table([path], rate=10)
    assert "| tokenization (encode_batch) | 7.0 s (70%) |" in table
    assert "| total CPU | 10.0 s |" in table
    path.write_text("not a profile\n")
    with pytest.raises(ValueError, match="srp-w1.txt:1: not a py-spy raw line"):
        stage_profile.stage_samples(path)


def test_a_non_shipped_tokenizer_gets_its_own_classifier_once(shared_data: Path,
                                                              tmp_path: Path) -> None:
    """The srp case with another tokenizer runs the embedded classifier trained on that
    tokenizer's ids, so preprocessing hands it the dataset's ids (no second tokenization)."""
    from megatron_srp.data.labeling import Labeler
    from megatron_srp.reflection.classifiers import EmbeddedClassifier
    from megatron_srp.reflection.segment import SegmentConfig
    from megatron_srp.tokenizer import train_bpe_tokenizer

    shipped = {"dir": str(default_tokenizer_dir())}
    assert bench.matched_classifier("shipped", shipped, tmp_path, shared_data) is None
    small = train_bpe_tokenizer([shared_data / "tinyshakespeare" / "input.txt"], 600,
                                tmp_path / "bpe600")
    tok = {"dir": str(tmp_path / "bpe600")}
    asset = Path(bench.matched_classifier("bpe600", tok, tmp_path, shared_data))
    stamp = (asset / "weights.npz").stat().st_mtime_ns
    assert bench.matched_classifier("bpe600", tok, tmp_path, shared_data) == str(asset)
    assert (asset / "weights.npz").stat().st_mtime_ns == stamp  # not trained again
    classifier = EmbeddedClassifier(asset)
    assert classifier.tokenizer_fingerprint == small.fingerprint
    assert Labeler(classifier, SegmentConfig(), small).reads_token_ids
    (srp,) = bench.plan_cases(["ours-srp"], [1], sys.executable, None, sys.executable, tmp_path,
                              tokenizer=tok | {"classifier": str(asset)})[0]
    assert srp["cmd"][-2:] == ["--classifier-option", f"asset_dir={asset}"]
