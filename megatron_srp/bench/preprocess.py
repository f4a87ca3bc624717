"""Preprocessing benchmark: our ``tools/preprocess_srp.py`` (raw, srp; local processes or
Ray) against Megatron-LM's ``tools/preprocess_data.py`` and bare ``encode_batch`` tokenization
(:mod:`bare_tokenize`) on the same JSONL corpus, tokenizer and worker count.

Parts: :func:`build_corpus` (a deterministic corpus of a target size from the shared data),
:func:`measure` (one subprocess: wall time, CPU time, peak RSS summed over its process tree),
:func:`resolve_tokenizers` (the shipped tokenizer, or a larger BPE trained on the shared data)
and :func:`run_bench` (cases, repeats, the token-id and Ray checks); the report and goals are in
:mod:`preprocess_report`. docs/bench_preprocess_method.md describes the method.
"""

from __future__ import annotations

import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

from megatron_srp.bench.corpus import MB, REPO_ROOT, build_corpus
from megatron_srp.bench.preprocess_report import (  # noqa: F401 (re-exported)
    _stdout,
    evaluate_goals,
    machine_info,
    markdown_report,
    summarize,
)
from megatron_srp.units import write_atomic

CASES = ("bare", "ours-raw", "ours-srp", "ours-raw-ray", "ours-srp-ray", "megatron-lm")
DEFAULT_CASES = CASES
SCALING_CASES = ("ours-raw", "ours-srp")
# A byte-level BPE of SmolLM2's vocabulary size, trained on the shared data when first needed.
BPE_49K = "bpe-49152"
BPE_49K_FILES = ("tinyshakespeare/input.txt", "wikitext2/valid.txt", "wikitext2/test.txt",
                 "gsm8k/train_sample2000.jsonl", "gsm8k/test.jsonl",
                 "toxigen/toxigen_statements.jsonl", "alpaca/seed_tasks.jsonl",
                 "alpaca/alpaca_instructions_noinput_sample2000.json")
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



# ---------------------------------------------------------------- tokenizers -----------------

def resolve_tokenizers(names: Sequence[str], work: Path, data_dir: Optional[str | Path] = None
                       ) -> dict[str, dict[str, Any]]:
    """``{name: {"dir", "vocab_size", "fingerprint", "source"}}`` for ``shipped`` (the packaged
    tokenizer), ``bpe-49152`` (trained into ``<work>/tokenizers/`` on the shared data when
    absent; the same files always give the same tokenizer) or a directory with tokenizer.json."""
    from megatron_srp.bench.corpus import default_data_dir
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir, train_bpe_tokenizer

    out = {}
    for name in names:
        if name == "shipped":
            path, source = default_tokenizer_dir(), "the shipped tokenizer"
        elif name == BPE_49K:
            path = work / "tokenizers" / BPE_49K
            data = Path(data_dir) if data_dir else default_data_dir()
            source = ("trained by the benchmark: python tools/train_tokenizer.py --vocab-size "
                      f"49152 --min-frequency 1 --data-dir DATA --out-dir DIR --files "
                      f"{' '.join(BPE_49K_FILES)}")
            if not (path / "tokenizer.json").is_file():
                log(f"training the {BPE_49K} tokenizer into {path} ...")
                train_bpe_tokenizer([data / f for f in BPE_49K_FILES], 49152, path,
                                    min_frequency=1)
        else:
            path, source = Path(name), f"directory {name}"
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"tokenizer {name!r}: no {path / 'tokenizer.json'} "
                                        f"(give 'shipped', '{BPE_49K}' or a tokenizer directory)")
        tok = SRPTokenizer.from_dir(path)
        out[name] = {"dir": str(Path(path).resolve()), "vocab_size": tok.vocab_size,
                     "fingerprint": tok.fingerprint, "source": source,
                     "special_tokens": list(tok.special_tokens)}
    return out


def matched_classifier(name: str, tokenizer: dict[str, Any], work: Path,
                       data_dir: Optional[str | Path] = None) -> Optional[str]:
    """The embedded classifier's asset directory for datasets built with ``tokenizer``: None
    (the shipped asset) for the shipped tokenizer, else one trained on the same labelled data
    with that tokenizer's ids into ``<work>/classifiers/<name>`` (once), as a user with that
    tokenizer would (``tools/train_classifier.py --tokenizer DIR``). A classifier that shares
    the dataset's tokenizer reads the ids preprocessing already has; the shipped one would
    tokenize every segment again."""
    from megatron_srp.bench.corpus import default_data_dir
    from megatron_srp.reflection.classifiers import CONFIG_FILE
    from megatron_srp.reflection.features import TokenNgramFeaturizer
    from megatron_srp.reflection.train_classifier import train_and_write
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    if Path(tokenizer["dir"]).resolve() == default_tokenizer_dir().resolve():
        return None
    out = work / "classifiers" / Path(name).name
    if not (out / CONFIG_FILE).is_file():
        log(f"training the embedded classifier for tokenizer {name} into {out} ...")
        featurizer = TokenNgramFeaturizer(SRPTokenizer.from_dir(tokenizer["dir"]))
        train_and_write(Path(data_dir) if data_dir else default_data_dir(), out,
                        featurizer=featurizer)
    return str(out.resolve())


# ---------------------------------------------------------------- cases ----------------------

def _megatron_env(megatron_lm: Optional[str], megatron_python: str
                  ) -> tuple[Optional[Path], Optional[dict], Optional[str]]:
    """(script, environment, None) for a usable Megatron-LM checkout, else (.., .., why not)."""
    if not megatron_lm:
        return None, None, SKIP_NO_MEGATRON
    script = Path(megatron_lm).resolve() / "tools" / "preprocess_data.py"
    if not script.is_file():
        return None, None, f"skipped megatron-lm: {script} does not exist"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    code = ("import importlib.util as u; print(' '.join(m for m in ('torch', 'numpy', "
            "'transformers', 'six', 'triton') if u.find_spec(m) is None) or 'ok')")
    missing = _stdout([megatron_python, "-c", code], env=env)
    if missing != "ok":
        return None, None, (f"skipped megatron-lm: {megatron_python} cannot import "
                            f"{missing or '(python failed)'} (Megatron-LM's tool needs them)")
    return script, env, None


def plan_cases(cases: Sequence[str], workers: Sequence[int], python: str,
               megatron_lm: Optional[str], megatron_python: str, hf_dir: Path,
               ours_args: Sequence[str] = (), ours_tool: Optional[str] = None,
               tokenizer: Optional[dict[str, Any]] = None, tokenizer_name: str = "shipped"
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """Case templates (``{input}``/``{out}`` filled per run) and the messages of skipped ones.

    Ours and bare run with ``RAYON_NUM_THREADS`` = workers, so N workers means N cores for the
    tokenizer too. Ray cases need at least 2 workers (Ray is for scaling out)."""
    tool = str(Path(ours_tool or REPO_ROOT / "tools" / "preprocess_srp.py").resolve())
    tok_args = ["--tokenizer", tokenizer["dir"]] if tokenizer else []
    planned, skipped = [], []
    script = env = None
    if "megatron-lm" in cases:
        script, env, why = _megatron_env(megatron_lm, megatron_python)
        if why:
            skipped.append(why)
    if any(c.endswith("-ray") for c in cases) and min(workers) < 2:
        skipped.append("skipped ray cases at 1 worker (Ray cases run at 2 or more workers)")
    for name in cases:
        if name == "megatron-lm" and script is None:
            continue
        for n in workers:
            threads = {**os.environ, "RAYON_NUM_THREADS": str(n)}
            entry = {"case": name, "workers": n, "tokenizer": tokenizer_name}
            if name == "megatron-lm":
                cmd = [megatron_python, str(script), "--input", "{input}", "--output-prefix",
                       "{out}/mlm", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       str(hf_dir), "--workers", str(n), "--append-eod", "--json-keys", "text"]
                planned.append(entry | {"cmd": cmd, "env": env,
                                        "prefix": "{out}/mlm_text_document"})
            elif name == "bare":
                cmd = [python, "-m", "megatron_srp.bench.bare_tokenize", "--input", "{input}",
                       "--tokenizer", tokenizer["dir"] if tokenizer else str(hf_dir),
                       "--threads", str(n), "--counts", "{out}/bare.json"]
                planned.append(entry | {"cmd": cmd, "env": threads, "prefix": None,
                                        "counts": "{out}/bare.json"})
            else:
                if name.endswith("-ray") and n < 2:
                    continue
                variant = name.split("-")[1]
                cmd = [python, tool, "--input", "{input}", "--workers", str(n), "--overwrite",
                       "--output-dir", "{out}", "--variants", variant, *tok_args]
                cmd += ["--classifier", "embedded"] if variant == "srp" else []
                if variant == "srp" and tokenizer and tokenizer.get("classifier"):
                    cmd += ["--classifier-option", f"asset_dir={tokenizer['classifier']}"]
                cmd += ["--backend", "ray"] if name.endswith("-ray") else []
                planned.append(entry | {"cmd": cmd + list(ours_args), "env": threads,
                                        "prefix": "{out}/" + variant})
    return planned, skipped


def run_case(case: dict[str, Any], corpus: dict[str, Any], out: Path, pss_every: int = 10,
             timeout: Optional[float] = None) -> dict[str, Any]:
    """One measured run of ``case`` on ``corpus`` (``{"path", "mb", "bytes", "documents"}``),
    writing into a fresh ``out``; documents and tokens are read from the output .idx (bare
    tokenization: from its counts file)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fill = lambda s: s.format(input=corpus["path"], out=out)  # noqa: E731
    run = measure([fill(c) for c in case["cmd"]], out.parent / f"{out.name}.log", case["env"],
                  out if case["case"] == "megatron-lm" else REPO_ROOT, pss_every=pss_every,
                  timeout=timeout)
    run.update(case=case["case"], workers=case["workers"], corpus_mb=corpus["mb"],
               tokenizer=case.get("tokenizer", "shipped"), corpus_bytes=corpus["bytes"],
               input_documents=corpus["documents"],
               prefix=fill(case["prefix"]) if case.get("prefix") else None)
    if run["returncode"] == 0:
        if case.get("counts"):
            counts = json.loads(Path(fill(case["counts"])).read_text())
            run["documents"], run["tokens"] = counts["documents"], counts["tokens"]
        else:
            run["documents"], run["tokens"] = dataset_counts(run["prefix"])
        s = run["seconds"]
        run.update(docs_per_s=corpus["documents"] / s, tokens_per_s=run["tokens"] / s,
                   mb_per_s=corpus["bytes"] / MB / s)
    else:
        tail = Path(run["log"]).read_text(errors="replace")[-2000:]
        run["error"] = f"exit code {run['returncode']}; log tail:\n{tail}"
    return run


def compare_backends(local_prefix: str | Path, ray_prefix: str | Path) -> dict[str, Any]:
    """Byte equality of the .bin, .idx and label sidecar two runs wrote."""
    files, differing = [], []
    for ext in (".bin", ".idx", ".labels.jsonl"):
        a, b = Path(f"{local_prefix}{ext}"), Path(f"{ray_prefix}{ext}")
        if not a.exists() and not b.exists():
            continue
        files.append(ext.lstrip("."))
        if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
            differing.append(ext.lstrip("."))
    return {"files": files, "differing": differing, "identical": bool(files) and not differing}


# ---------------------------------------------------------------- the whole run --------------

def run_bench(work_dir: str | Path, corpus_mb: float = 50, workers: Sequence[int] = (1, 2),
              cases: Sequence[str] = DEFAULT_CASES, repeats: int = 1,
              scaling_mb: Optional[float] = None, megatron_lm: Optional[str] = None,
              megatron_python: Optional[str] = None, python: Optional[str] = None,
              data_dir: Optional[str | Path] = None, ours_args: Sequence[str] = (),
              pss_every: int = 10, flat_tolerance: float = 1.25,
              timeout: Optional[float] = None, report_path: Optional[str | Path] = None,
              ours_tool: Optional[str] = None, tokenizers: Sequence[str] = ("shipped",),
              scaling_cases: Sequence[str] = SCALING_CASES,
              scaling_workers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Build the corpora, run every case ``repeats`` times per tokenizer (cases interleaved
    within a repeat), check token ids against Megatron-LM and Ray's bytes against local, and
    write ``report.json`` and ``report.md``. The memory-scaling corpora (``scaling_mb`` and
    10 x that, when not the main corpus) are run once, for the first tokenizer,
    ``scaling_cases`` and ``scaling_workers`` (default: the largest worker count)."""
    work, python = Path(work_dir), python or sys.executable
    work.mkdir(parents=True, exist_ok=True)
    for label, given in (("cases", cases), ("scaling cases", scaling_cases)):
        if set(given) - set(CASES):
            raise ValueError(f"unknown {label} {sorted(set(given) - set(CASES))}; expected some"
                             f" of {', '.join(CASES)}")
    machine = machine_info(megatron_lm)  # before the runs: the commit measured, the load then
    toks = resolve_tokenizers(tokenizers, work, data_dir)
    if any(c.startswith("ours-srp") for c in cases):
        for name, tok in toks.items():
            tok["classifier"] = matched_classifier(name, tok, work, data_dir)
    planned, skipped = [], []
    for name, tok in toks.items():
        hf_dir = write_hf_tokenizer(tok["dir"], work / "hf_tokenizers" / name)
        more, why = plan_cases(cases, workers, python, megatron_lm, megatron_python or python,
                               hf_dir, ours_args, ours_tool, tok, name)
        planned += more
        skipped += [s for s in why if s not in skipped]
    for message in skipped:
        log(message)
    scaling_workers = list(scaling_workers or [max(workers)])
    scale_sizes = [mb for mb in dict.fromkeys([scaling_mb, 10 * scaling_mb] if scaling_mb
                                              else []) if mb != corpus_mb]
    first = next(iter(toks))
    scale_plan = [c for c in planned if c["tokenizer"] == first and c["case"] in scaling_cases
                  and c["workers"] in scaling_workers]
    corpora = {}
    for mb in [corpus_mb] + scale_sizes:
        path = work / f"corpus-{mb:g}MB.jsonl"
        log(f"corpus {path} ({mb:g} MB) ...")
        record = build_corpus(path, mb, data_dir)
        with open(path, "rb") as f:  # into the page cache, so no case pays the first read
            while f.read(MB):
                pass
        corpora[mb] = {"path": str(path), "mb": mb, "bytes": record["bytes"],
                       "documents": record["documents"], "record": record}
    plan = [(rep, case, corpus_mb) for rep in range(repeats) for case in planned]
    plan += [(0, case, mb) for mb in scale_sizes for case in scale_plan]
    runs: list[dict[str, Any]] = []
    for i, (rep, case, mb) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {case['tokenizer']} {case['case']} workers={case['workers']} "
            f"corpus={mb:g} MB repeat {rep + 1} (load {os.getloadavg()[0]:.2f}) ...")
        out = work / "runs" / f"{case['tokenizer']}-{case['case']}-w{case['workers']}-{mb:g}MB"
        run = run_case(case, corpora[mb], out, pss_every, timeout) | {"repeat": rep}
        runs.append(run)
        log(f"    FAILED: {run['error']}" if run["returncode"] else
            f"    {run['seconds']:.1f} s, CPU {run['cpu_seconds']:.1f} s, {run['docs_per_s']:.0f}"
            f" docs/s, {run['tokens_per_s']:.0f} tokens/s, peak RSS "
            f"{run['peak_rss_bytes'] / MB:.0f} MB")
    # Each case's last main-corpus repeat left its output on disk: compare them.
    last = {(r["tokenizer"], r["case"], r["workers"]): r["prefix"] for r in runs
            if r["returncode"] == 0 and r["corpus_mb"] == corpus_mb and r["repeat"] == repeats - 1}
    checks, ray_checks = [], []
    for name, tok in toks.items():
        common = sorted(n for t, c, n in last if t == name and c == "ours-raw"
                        and (name, "megatron-lm", n) in last)
        if common:
            check = compare_datasets(last[(name, "ours-raw", common[0])],
                                     last[(name, "megatron-lm", common[0])],
                                     corpora[corpus_mb]["path"], tok["special_tokens"])
            checks.append({"tokenizer": name, "workers": common[0], **check})
            log(f"token-id check ({name}): {check}")
        for (t, c, n), prefix in sorted(last.items()):
            if t == name and c.endswith("-ray") and (t, c[:-4], n) in last:
                check = compare_backends(last[(t, c[:-4], n)], prefix)
                ray_checks.append({"tokenizer": t, "case": c[:-4], "workers": n, **check})
                log(f"ray check ({t}, {c[:-4]}, {n} workers): {check}")
    summary = summarize(runs)
    report: dict[str, Any] = {
        "params": {"corpus_mb": corpus_mb, "workers": list(workers), "cases": list(cases),
                   "repeats": repeats, "scaling_mb": scaling_mb, "scaling_repeats": 1,
                   "scaling_cases": list(scaling_cases), "scaling_workers": scaling_workers,
                   "tokenizers": list(toks), "ours_args": list(ours_args),
                   "ours_tool": ours_tool or "tools/preprocess_srp.py", "poll_seconds": 0.05,
                   "pss_every_polls": pss_every, "flat_tolerance": flat_tolerance},
        "machine": machine | {"load_average_at_end": os.getloadavg()},
        "tokenizers": toks,
        "corpora": {f"{mb:g}": c["record"] | {"path": c["path"]} for mb, c in corpora.items()},
        "skipped": skipped, "runs": runs, "summary": summary,
        "goals": evaluate_goals(summary, corpus_mb, scaling_mb, flat_tolerance, ray_checks,
                                runs),
        "tokenizer_checks": checks, "ray_checks": ray_checks,
    }
    report_path = Path(report_path or work / "report.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report_path, json.dumps(report, indent=2, default=str) + "\n")
    write_atomic(report_path.with_suffix(".md"), markdown_report(report))
    return report
