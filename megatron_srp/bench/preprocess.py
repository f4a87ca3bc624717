"""Preprocessing benchmark: our ``tools/preprocess_srp.py`` (raw, srp) against Megatron-LM's
``tools/preprocess_data.py`` on the same JSONL corpus, tokenizer and worker count.

Three parts: :func:`build_corpus` (a deterministic corpus of a target size from the shared data),
:func:`measure` (one subprocess: wall time, CPU time, peak RSS summed over its process tree) and
:func:`run_bench` / :func:`markdown_report` (cases, repeats, medians, the tokenizer check, goals).
docs/bench_preprocess_method.md describes the method.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

from megatron_srp.bench.corpus import MB, REPO_ROOT, build_corpus
from megatron_srp.units import write_atomic

CASES = ("ours-raw", "ours-srp", "megatron-lm")
SKIP_NO_MEGATRON = "skipped megatron-lm: no Megatron-LM checkout given (--megatron-lm PATH)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring ------------------

def _tree_memory(proc: psutil.Process, pss: bool) -> tuple[int, int, int]:
    """(RSS, PSS or 0, processes) summed over ``proc`` and its descendants; vanished ones: 0."""
    rss = pss_sum = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    for p in procs:
        try:
            info = p.memory_full_info() if pss else p.memory_info()
            rss, pss_sum = rss + info.rss, pss_sum + getattr(info, "pss", 0)
        except psutil.Error:
            pass
    return rss, pss_sum, len(procs)


def measure(cmd: Sequence[str], log_path: str | Path, env: Optional[dict] = None,
            cwd: Optional[str | Path] = None, poll: float = 0.05, pss_every: int = 10,
            timeout: Optional[float] = None) -> dict[str, Any]:
    """Run ``cmd`` (output to ``log_path``): wall and CPU seconds of its process tree, and the
    peak over polls of the tree's summed RSS; PSS too at every ``pss_every``-th poll (0: never),
    since PSS reads smaps and costs more."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "wb") as log_file:
        start = time.perf_counter()
        child = subprocess.Popen(list(cmd), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                 cwd=cwd, start_new_session=True)
        proc = psutil.Process(child.pid)
        peak_rss = peak_pss = polls = max_procs = 0
        while child.poll() is None:
            rss, pss, procs = _tree_memory(proc, pss_every > 0 and polls % pss_every == 0)
            peak_rss, peak_pss, polls = max(peak_rss, rss), max(peak_pss, pss), polls + 1
            max_procs = max(max_procs, procs)
            if timeout is not None and time.perf_counter() - start > timeout:
                os.killpg(child.pid, 9)
            try:
                child.wait(timeout=poll)  # returns the moment the process exits
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cmd": list(cmd), "returncode": child.returncode, "seconds": seconds,
            "cpu_seconds": cpu, "peak_rss_bytes": peak_rss, "peak_pss_bytes": peak_pss or None,
            "max_processes": max_procs, "polls": polls, "log": str(log_path)}


def dataset_counts(prefix: str | Path) -> tuple[int, int]:
    """(documents, tokens) of a Megatron indexed dataset, read from its .idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return len(ds), int(ds.sequence_lengths.sum())


def write_hf_tokenizer(tokenizer_dir: str | Path, out: str | Path) -> Path:
    """An AutoTokenizer-loadable copy of our tokenizer.json (eos = our end-of-document)."""
    from megatron_srp.taxonomy import EOD, PAD

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD, "pad_token": PAD,
              "model_max_length": 10 ** 12, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def compare_datasets(ours: str | Path, theirs: str | Path, corpus: str | Path,
                     special_tokens: Sequence[str]) -> dict[str, Any]:
    """Document-by-document token equality of two datasets made from the same corpus.

    A difference is *explained* when the corpus document holds a literal special-token string
    (our tool strips those; Megatron-LM encodes them as the special ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    a, b = IndexedDataset(str(ours)), IndexedDataset(str(theirs))
    result: dict[str, Any] = {"documents_ours": len(a), "documents_megatron": len(b)}
    differing = [i for i in range(min(len(a), len(b)))
                 if a.sequence_lengths[i] != b.sequence_lengths[i] or (a[i] != b[i]).any()]
    explained, wanted = [], set(differing)
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted and any(t in json.loads(line)["text"] for t in special_tokens):
                explained.append(i)
    unexplained = sorted(wanted - set(explained))
    result.update(compared=min(len(a), len(b)), identical=min(len(a), len(b)) - len(differing),
                  differing_explained_by_special_tokens=len(explained),
                  differing_unexplained=len(unexplained), first_unexplained=unexplained[:5],
                  same_tokens=len(a) == len(b) and not unexplained)
    return result


# ---------------------------------------------------------------- cases ----------------------

def _stdout(cmd: Sequence[str], **kwargs: Any) -> str:
    run = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    return run.stdout.strip() if run.returncode == 0 else ""


def plan_cases(cases: Sequence[str], workers: Sequence[int], python: str,
               megatron_lm: Optional[str], megatron_python: str, hf_dir: Path,
               ours_args: Sequence[str] = (), ours_tool: Optional[str] = None
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """Case templates (``{input}``/``{out}`` filled per run) and the messages of skipped ones.

    Our CLI is detected from its --help: the multi-variant form (``--output-dir``,
    ``--variants``, ``--classifier``) runs raw and srp; the older ``--output-prefix`` form
    runs raw only."""
    tool = str(Path(ours_tool or REPO_ROOT / "tools" / "preprocess_srp.py").resolve())
    help_text = _stdout([python, tool, "--help"], cwd=REPO_ROOT)
    new_cli = all(o in help_text for o in ("--output-dir", "--variants", "--classifier"))
    planned, skipped = [], []
    for name in cases:
        if name == "ours-srp" and not new_cli:
            skipped.append(f"skipped ours-srp: {tool} has no --output-dir/--variants/"
                           "--classifier (the multi-variant CLI)")
            continue
        if name == "megatron-lm":
            script = Path(megatron_lm or ".").resolve() / "tools" / "preprocess_data.py"
            env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
            code = ("import importlib.util as u; print(' '.join(m for m in ('torch', 'numpy', "
                    "'transformers', 'six', 'triton') if u.find_spec(m) is None) or 'ok')")
            missing = None if not script.is_file() else _stdout([megatron_python, "-c", code],
                                                                 env=env)
            if not megatron_lm or missing != "ok":
                skipped.append(SKIP_NO_MEGATRON if not megatron_lm else
                               f"skipped megatron-lm: {script} does not exist" if missing is None
                               else f"skipped megatron-lm: {megatron_python} cannot import "
                               f"{missing or '(python failed)'} (Megatron-LM's tool needs them)")
                continue
        for n in workers:
            if name == "megatron-lm":
                cmd = [megatron_python, str(script), "--input", "{input}", "--output-prefix",
                       "{out}/mlm", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       str(hf_dir), "--workers", str(n), "--append-eod", "--json-keys", "text"]
                planned.append({"case": name, "workers": n, "cmd": cmd, "env": env,
                                "prefix": "{out}/mlm_text_document"})
                continue
            variant = name.split("-", 1)[1]
            cmd = [python, tool, "--input", "{input}", "--workers", str(n), "--overwrite"]
            cmd += (["--output-dir", "{out}", "--variants", variant] if new_cli
                    else ["--output-prefix", "{out}/raw"])
            cmd += ["--classifier", "embedded"] if variant == "srp" else []
            planned.append({"case": name, "workers": n, "cmd": cmd + list(ours_args),
                            "env": dict(os.environ), "prefix": "{out}/" + variant})
    return planned, skipped


def run_case(case: dict[str, Any], corpus: dict[str, Any], out: Path, pss_every: int = 10,
             timeout: Optional[float] = None) -> dict[str, Any]:
    """One measured run of ``case`` on ``corpus`` (``{"path", "mb", "bytes", "documents"}``),
    writing into a fresh ``out``; documents and tokens are read from the output .idx."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fill = lambda s: s.format(input=corpus["path"], out=out)  # noqa: E731
    run = measure([fill(c) for c in case["cmd"]], out.parent / f"{out.name}.log", case["env"],
                  REPO_ROOT if case["case"].startswith("ours") else out, pss_every=pss_every,
                  timeout=timeout)
    run.update(case=case["case"], workers=case["workers"], corpus_mb=corpus["mb"],
               corpus_bytes=corpus["bytes"], input_documents=corpus["documents"],
               prefix=fill(case["prefix"]))
    if run["returncode"] == 0:
        run["documents"], run["tokens"] = dataset_counts(run["prefix"])
        s = run["seconds"]
        run.update(docs_per_s=corpus["documents"] / s, tokens_per_s=run["tokens"] / s,
                   mb_per_s=corpus["bytes"] / MB / s)
    else:
        tail = Path(run["log"]).read_text(errors="replace")[-2000:]
        run["error"] = f"exit code {run['returncode']}; log tail:\n{tail}"
    return run


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, workers, corpus): medians over the repeats that succeeded."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["case"], r["workers"], r["corpus_mb"]), []).append(r)
    rows = []
    for (case, workers, mb), rs in groups.items():
        ok = [r for r in rs if r["returncode"] == 0]
        row: dict[str, Any] = {"case": case, "workers": workers, "corpus_mb": mb,
                               "repeats": len(rs), "failed": len(rs) - len(ok)}
        if ok:
            med = lambda k: statistics.median(r[k] for r in ok)  # noqa: E731
            row.update({k: ok[-1][k] for k in ("documents", "tokens", "input_documents")})
            row.update({k: med(k) for k in ("seconds", "docs_per_s", "tokens_per_s", "mb_per_s",
                                            "cpu_seconds")})
            row["peak_rss_mb"] = med("peak_rss_bytes") / MB
            row["max_processes"] = max(r["max_processes"] for r in ok)
            row["peak_pss_mb"] = (med("peak_pss_bytes") / MB
                                  if all(r["peak_pss_bytes"] for r in ok) else None)
        rows.append(row)
    return rows


def evaluate_goals(rows: Sequence[dict[str, Any]], main_mb: float, scaling_mb: Optional[float],
                   flat_tolerance: float) -> list[dict[str, Any]]:
    """The issue's goals per worker count: raw >= Megatron-LM and srp >= raw / 2 in docs/s at
    ``main_mb``; peak RSS at 10 x ``scaling_mb`` within ``flat_tolerance`` x that at 1 x."""
    get = {(r["case"], r["workers"], r["corpus_mb"]): r for r in rows if "seconds" in r}
    goals = []
    for n in sorted({r["workers"] for r in rows}):
        raw, srp, mlm = (get.get((c, n, main_mb)) for c in ("ours-raw", "ours-srp", "megatron-lm"))
        for ok, goal, top, bottom, need in (
                (raw and mlm, "raw >= megatron-lm (docs/s)", raw, mlm, 1.0),
                (raw and srp, "srp >= 0.5 x raw (docs/s)", srp, raw, 0.5)):
            if ok:
                ratio = top["docs_per_s"] / bottom["docs_per_s"]
                goals.append({"goal": goal, "workers": n, "ratio": ratio, "met": ratio >= need})
        for case in CASES:
            small = get.get((case, n, scaling_mb))
            big = get.get((case, n, 10 * scaling_mb)) if scaling_mb else None
            if small and big:
                ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
                goals.append({"goal": f"{case} peak RSS flat (x10 corpus: <= {flat_tolerance:g})",
                              "workers": n, "ratio": ratio, "met": ratio <= flat_tolerance,
                              "case": case, "small_mb": small["peak_rss_mb"],
                              "big_mb": big["peak_rss_mb"], "processes": (
                                  small["max_processes"], big["max_processes"])})
    return goals


# ---------------------------------------------------------------- report ---------------------

def machine_info(megatron_lm: Optional[str]) -> dict[str, Any]:
    def version(pkg: str) -> Optional[str]:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    git = ["git", "-C", str(REPO_ROOT)]
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
        "platform": platform.platform(),
        **{pkg: version(pkg) for pkg in ("torch", "megatron-core", "tokenizers", "transformers")},
        "git_commit": _stdout(git + ["rev-parse", "HEAD"]) or None,
        "git_dirty": bool(_stdout(git + ["status", "--porcelain", "--untracked-files=no"])),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    if megatron_lm:
        mgit = ["git", "-C", str(megatron_lm)]
        info["megatron_lm"] = {"path": str(Path(megatron_lm).resolve()),
                               "commit": _stdout(mgit + ["rev-parse", "HEAD"]) or None,
                               "describe": _stdout(mgit + ["describe", "--tags"]) or None}
    return info


def markdown_report(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["params"]
    mlm = m.get("megatron_lm") or {}
    lines = [f"# Preprocessing benchmark ({m['date_utc']})", "",
             f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory_gb']} GB; Python {m['python']}"
             f", torch {m['torch']}, megatron-core {m['megatron-core']}; commit {m['git_commit']}"
             f"{' with uncommitted changes' if m['git_dirty'] else ''}"
             + (f"; Megatron-LM {mlm.get('describe')} ({mlm.get('commit')})" if mlm else "")
             + ".", "",
             "| case | workers | corpus MB | docs | tokens | seconds | docs/s | tokens/s | MB/s "
             "| peak RSS MB | peak PSS MB | CPU s |", "|---" * 12 + "|"]
    for r in report["summary"]:
        if "seconds" not in r:
            lines.append(f"| {r['case']} | {r['workers']} | {r['corpus_mb']:g} | failed "
                         f"({r['failed']} of {r['repeats']} runs) |" + " |" * 8)
            continue
        pss = f"{r['peak_pss_mb']:.0f}" if r["peak_pss_mb"] else "-"
        lines.append(f"| {r['case']} | {r['workers']} | {r['corpus_mb']:g} | {r['documents']} | "
                     f"{r['tokens']} | {r['seconds']:.1f} | {r['docs_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['mb_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{pss} | {r['cpu_seconds']:.1f} |")
    lines += ["", f"Medians of {p['repeats']} run(s). Seconds are wall time of the whole command"
              " (start-up included). docs/s and MB/s count input documents and bytes; tokens/s "
              "counts output tokens (from the .idx). Peak RSS/PSS: summed over the process tree."]
    flat = [g for g in report["goals"] if "small_mb" in g]
    if report["goals"]:
        lines += ["", "## Goals", "", "| goal | workers | ratio | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['workers']} | {g['ratio']:.2f} | "
                  f"{'yes' if g['met'] else 'NO'} |" for g in report["goals"]]
    if flat:
        s = p["scaling_mb"]
        lines += ["", "## Memory flatness", "", f"| case | workers | peak RSS MB at {s:g} MB | "
                  f"at {10 * s:g} MB | ratio | processes |", "|---" * 6 + "|"]
        lines += [f"| {g['case']} | {g['workers']} | {g['small_mb']:.0f} | {g['big_mb']:.0f} | "
                  f"{g['ratio']:.2f} | {g['processes'][0]} / {g['processes'][1]} |"
                  for g in flat]
        if any(a != b for g in flat for a, b in [g["processes"]]):
            lines += ["", "A row whose process counts differ compares different process trees "
                      "(e.g. fewer shards than workers in the small corpus), not corpus size."]
    eq = report.get("tokenizer_check")
    if eq:
        lines += ["", "## Same tokenizer", "", f"ours-raw vs megatron-lm ({eq['workers']} "
                  f"worker(s)): documents {eq['documents_ours']} vs {eq['documents_megatron']}; "
                  f"of {eq['compared']} compared, {eq['identical']} identical, "
                  f"{eq['differing_explained_by_special_tokens']} differ where the text holds a "
                  f"literal special-token string (ours strips it), {eq['differing_unexplained']}"
                  f" differ otherwise -> {'same' if eq['same_tokens'] else 'DIFFERENT'} token ids."]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the whole run --------------

def run_bench(work_dir: str | Path, corpus_mb: float = 50, workers: Sequence[int] = (1, 2),
              cases: Sequence[str] = CASES, repeats: int = 1, scaling_mb: Optional[float] = None,
              megatron_lm: Optional[str] = None, megatron_python: Optional[str] = None,
              python: Optional[str] = None, data_dir: Optional[str | Path] = None,
              ours_args: Sequence[str] = (), pss_every: int = 10, flat_tolerance: float = 1.25,
              timeout: Optional[float] = None, report_path: Optional[str | Path] = None,
              ours_tool: Optional[str] = None) -> dict[str, Any]:
    """Build the corpora, run every case ``repeats`` times (cases interleaved within a repeat),
    check the tokenizers agree, and write ``report.json`` and ``report.md``."""
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    work, python = Path(work_dir), python or sys.executable
    work.mkdir(parents=True, exist_ok=True)
    if set(cases) - set(CASES):
        raise ValueError(f"unknown cases {sorted(set(cases) - set(CASES))}; expected some of "
                         f"{', '.join(CASES)}")
    hf_dir = write_hf_tokenizer(default_tokenizer_dir(), work / "hf_tokenizer")
    planned, skipped = plan_cases(cases, workers, python, megatron_lm,
                                  megatron_python or python, hf_dir, ours_args, ours_tool)
    for message in skipped:
        log(message)
    sizes = list(dict.fromkeys([corpus_mb] + ([scaling_mb, 10 * scaling_mb] if scaling_mb else [])))
    corpora = {}
    for mb in sizes:
        path = work / f"corpus-{mb:g}MB.jsonl"
        log(f"corpus {path} ({mb:g} MB) ...")
        record = build_corpus(path, mb, data_dir)
        with open(path, "rb") as f:  # into the page cache, so no case pays the first read
            while f.read(MB):
                pass
        corpora[mb] = {"path": str(path), "mb": mb, "bytes": record["bytes"],
                       "documents": record["documents"], "record": record}
    plan = [(case, mb) for mb in sizes for case in planned]
    runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        for case, mb in plan:
            log(f"[{len(runs) + 1}/{len(plan) * repeats}] {case['case']} workers="
                f"{case['workers']} corpus={mb:g} MB repeat {rep + 1}/{repeats} ...")
            out = work / "runs" / f"{case['case']}-w{case['workers']}-{mb:g}MB"
            run = run_case(case, corpora[mb], out, pss_every, timeout) | {"repeat": rep}
            runs.append(run)
            log(f"    FAILED: {run['error']}" if run["returncode"] else
                f"    {run['seconds']:.1f} s, {run['docs_per_s']:.0f} docs/s, "
                f"{run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_bytes'] / MB:.0f} "
                f"MB, CPU {run['cpu_seconds']:.1f} s")
    summary = summarize(runs)
    report: dict[str, Any] = {
        "params": {"corpus_mb": corpus_mb, "workers": list(workers), "cases": list(cases),
                   "repeats": repeats, "scaling_mb": scaling_mb, "ours_args": list(ours_args),
                   "ours_tool": ours_tool or "tools/preprocess_srp.py", "poll_seconds": 0.05,
                   "pss_every_polls": pss_every, "flat_tolerance": flat_tolerance},
        "machine": machine_info(megatron_lm),
        "corpora": {f"{mb:g}": c["record"] | {"path": c["path"]} for mb, c in corpora.items()},
        "skipped": skipped, "runs": runs, "summary": summary,
        "goals": evaluate_goals(summary, corpus_mb, scaling_mb, flat_tolerance),
        "tokenizer_check": None,
    }
    # Each case's last repeat left its output on disk: compare the two tools' token ids.
    last = {(r["case"], r["workers"]): r["prefix"] for r in runs if r["returncode"] == 0
            and r["corpus_mb"] == corpus_mb and r["repeat"] == repeats - 1}
    common = sorted(n for c, n in last if c == "ours-raw" and ("megatron-lm", n) in last)
    if common:
        specials = SRPTokenizer.from_dir(default_tokenizer_dir()).special_tokens
        check = compare_datasets(last[("ours-raw", common[0])], last[("megatron-lm", common[0])],
                                 corpora[corpus_mb]["path"], specials)
        report["tokenizer_check"] = {"workers": common[0], **check}
        log(f"tokenizer check: {check}")
    report_path = Path(report_path or work / "report.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report_path, json.dumps(report, indent=2, default=str) + "\n")
    write_atomic(report_path.with_suffix(".md"), markdown_report(report))
    return report
