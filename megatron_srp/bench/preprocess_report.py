"""The preprocessing benchmark's report: medians per case, ratios to bare tokenization and to
Megatron-LM, the goals, and the Markdown printed at the end of a run (one table per run)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

from megatron_srp.bench.corpus import MB, REPO_ROOT

RAW_VS_BARE = 1.25  # raw's wall time at most this multiple of bare tokenization's
SRP_VS_MEGATRON = 1.5  # srp at least this many times faster than Megatron-LM's tool


def _stdout(cmd: Sequence[str], **kwargs: Any) -> str:
    run = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    return run.stdout.strip() if run.returncode == 0 else ""


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (tokenizer, case, workers, corpus): medians over the repeats that succeeded,
    then the ratios to ``bare`` and ``megatron-lm`` of the same tokenizer, workers and corpus."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r.get("tokenizer", "shipped"), r["case"], r["workers"], r["corpus_mb"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (tokenizer, case, workers, mb), rs in groups.items():
        ok = [r for r in rs if r["returncode"] == 0]
        row: dict[str, Any] = {"tokenizer": tokenizer, "case": case, "workers": workers,
                               "corpus_mb": mb, "repeats": len(rs), "failed": len(rs) - len(ok)}
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
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_bare``/``cpu_x_bare``: wall/CPU seconds over bare tokenization's; ``mlm_speedup``:
    Megatron-LM's wall seconds over this row's (same tokenizer, workers and corpus)."""
    timed = {(r["tokenizer"], r["case"], r["workers"], r["corpus_mb"]): r
             for r in rows if "seconds" in r}
    for r in timed.values():
        key = (r["tokenizer"], r["workers"], r["corpus_mb"])
        bare, mlm = timed.get((key[0], "bare", *key[1:])), timed.get(
            (key[0], "megatron-lm", *key[1:]))
        r["x_bare"] = r["seconds"] / bare["seconds"] if bare else None
        r["cpu_x_bare"] = r["cpu_seconds"] / bare["cpu_seconds"] if bare else None
        r["mlm_speedup"] = mlm["seconds"] / r["seconds"] if mlm else None


def per_repeat(runs: Sequence[dict[str, Any]], tokenizer: str, workers: int, corpus_mb: float,
               numerator: str, denominator: str) -> list[float]:
    """Wall-time ratio ``numerator / denominator`` case within each repeat (the cases of one
    repeat run back to back, so each ratio compares runs close in time)."""
    seconds = {(r["case"], r.get("repeat")): r["seconds"] for r in runs
               if r["returncode"] == 0 and r.get("tokenizer", "shipped") == tokenizer
               and r["workers"] == workers and r["corpus_mb"] == corpus_mb}
    repeats = sorted({rep for _, rep in seconds if rep is not None})
    return [seconds[(numerator, rep)] / seconds[(denominator, rep)] for rep in repeats
            if (numerator, rep) in seconds and (denominator, rep) in seconds]


def evaluate_goals(rows: Sequence[dict[str, Any]], main_mb: float, scaling_mb: Optional[float],
                   flat_tolerance: float, ray_checks: Sequence[dict[str, Any]] = (),
                   runs: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per tokenizer and worker count at ``main_mb``: raw <= 1.25 x bare (wall), srp >= 1.5 x
    faster than Megatron-LM (wall), each with its ratio per repeat when ``runs`` are given; per
    measured case: peak RSS at 10 x ``scaling_mb`` within ``flat_tolerance`` x that at 1 x; per
    Ray check: same bytes as local (and its speed)."""
    get = {(r["tokenizer"], r["case"], r["workers"], r["corpus_mb"]): r
           for r in rows if "seconds" in r}
    goals = []
    for tok in dict.fromkeys(r["tokenizer"] for r in rows):
        for n in sorted({r["workers"] for r in rows if r["tokenizer"] == tok}):
            raw, srp, bare, mlm = (get.get((tok, c, n, main_mb)) for c in (
                "ours-raw", "ours-srp", "bare", "megatron-lm"))
            if raw and bare:
                ratio = raw["seconds"] / bare["seconds"]
                goals.append({"goal": f"raw <= {RAW_VS_BARE:g} x bare (wall time)",
                              "tokenizer": tok, "workers": n, "ratio": ratio,
                              "met": ratio <= RAW_VS_BARE,
                              "cpu_ratio": raw["cpu_seconds"] / bare["cpu_seconds"],
                              "per_repeat": per_repeat(runs, tok, n, main_mb, "ours-raw",
                                                       "bare")})
            if srp and mlm:
                ratio = mlm["seconds"] / srp["seconds"]
                goals.append({"goal": f"srp >= {SRP_VS_MEGATRON:g} x faster than megatron-lm "
                              "(wall time)", "tokenizer": tok, "workers": n, "ratio": ratio,
                              "met": ratio >= SRP_VS_MEGATRON,
                              "cpu_ratio": mlm["cpu_seconds"] / srp["cpu_seconds"],
                              "per_repeat": per_repeat(runs, tok, n, main_mb, "megatron-lm",
                                                       "ours-srp")})
            for case in sorted({r["case"] for r in rows}):
                small = get.get((tok, case, n, scaling_mb))
                big = get.get((tok, case, n, 10 * scaling_mb)) if scaling_mb else None
                if small and big:
                    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
                    goals.append({
                        "goal": f"{case} peak RSS flat (x10 corpus: <= {flat_tolerance:g})",
                        "tokenizer": tok, "workers": n, "ratio": ratio,
                        "met": ratio <= flat_tolerance, "case": case,
                        "small_mb": small["peak_rss_mb"], "big_mb": big["peak_rss_mb"],
                        "processes": (small["max_processes"], big["max_processes"])})
    for check in ray_checks:
        local = get.get((check["tokenizer"], check["case"], check["workers"], main_mb))
        ray = get.get((check["tokenizer"], f"{check['case']}-ray", check["workers"], main_mb))
        goals.append({"goal": f"{check['case']} --backend ray: same bytes as local "
                      "(ratio: ray docs/s / local docs/s)", "tokenizer": check["tokenizer"],
                      "workers": check["workers"], "met": check["identical"],
                      "ratio": ray["docs_per_s"] / local["docs_per_s"] if local and ray
                      else float("nan")})
    return goals


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
        **{pkg: version(pkg) for pkg in ("torch", "megatron-core", "tokenizers", "transformers",
                                         "ray")},
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


def _load(machine: dict[str, Any], when: str) -> str:
    return " / ".join(f"{x:.2f}" for x in machine.get(f"load_average_at_{when}") or ()) or "-"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["params"]
    mlm = m.get("megatron_lm") or {}
    lines = [f"# Preprocessing benchmark ({m['date_utc']})", "",
             f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory_gb']} GB; Python {m['python']}"
             f", torch {m['torch']}, megatron-core {m['megatron-core']}, tokenizers "
             f"{m.get('tokenizers')}; commit {m['git_commit']}"
             f"{' with uncommitted changes' if m['git_dirty'] else ''}"
             + (f"; Megatron-LM {mlm.get('describe')} ({mlm.get('commit')})" if mlm else "")
             + f"; load average (1/5/15 min) at start {_load(m, 'start')}, at end "
             f"{_load(m, 'end')}.", "",
             "| tokenizer | case | workers | corpus MB | docs | tokens | seconds | CPU s | docs/s "
             "| tokens/s | peak RSS MB | peak PSS MB | time / bare | CPU / bare "
             "| Megatron-LM time / time |", "|---" * 15 + "|"]
    for r in report["summary"]:
        head = f"| {r.get('tokenizer', 'shipped')} | {r['case']} | {r['workers']} | "
        if "seconds" not in r:
            lines.append(head + f"{r['corpus_mb']:g} | failed ({r['failed']} of {r['repeats']}"
                         " runs) |" + " |" * 10)
            continue
        pss = f"{r['peak_pss_mb']:.0f}" if r["peak_pss_mb"] else "-"
        lines.append(head + f"{r['corpus_mb']:g} | {r['documents']} | {r['tokens']} | "
                     f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['docs_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {pss} | "
                     f"{_ratio(r.get('x_bare'))} | {_ratio(r.get('cpu_x_bare'))} | "
                     f"{_ratio(r.get('mlm_speedup'))} |")
    lines += ["", f"Medians of {p['repeats']} run(s) ({p.get('scaling_repeats', 1)} for the "
              "memory-scaling corpus). Seconds are wall time of the whole command (start-up "
              "included); CPU s is user + system time of its process tree. docs/s counts input "
              "documents; tokens/s counts output tokens. Peak RSS/PSS: summed over the process "
              "tree. time / bare and CPU / bare: over bare `encode_batch` tokenization of the "
              "same corpus with the same tokenizer on as many threads as workers."]
    tokenizers = report.get("tokenizers") or {}
    if tokenizers:
        lines += [""] + [f"Tokenizer `{name}`: vocabulary {t['vocab_size']}, fingerprint "
                         f"{t['fingerprint']}, {t['source']}." for name, t in tokenizers.items()]
    if report["goals"]:
        lines += ["", "## Goals", "", "| goal | tokenizer | workers | ratio | CPU ratio | "
                  "per repeat | met |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g.get('tokenizer', 'shipped')} | {g['workers']} | "
                  f"{g['ratio']:.2f} | {_ratio(g.get('cpu_ratio'))} | "
                  f"{', '.join(f'{x:.2f}' for x in g.get('per_repeat') or []) or '-'} | "
                  f"{'yes' if g['met'] else 'NO'} |" for g in report["goals"]]
        lines += ["", "Ratio: of the medians. Per repeat: the same ratio within each repeat "
                  "(a repeat runs every case back to back); a wide spread says the machine "
                  "was noisy."]
    flat = [g for g in report["goals"] if "small_mb" in g]
    if flat:
        s = p["scaling_mb"]
        lines += ["", "## Memory flatness", "", f"| tokenizer | case | workers | peak RSS MB at "
                  f"{s:g} MB | at {10 * s:g} MB | ratio | processes |", "|---" * 7 + "|"]
        lines += [f"| {g.get('tokenizer', 'shipped')} | {g['case']} | {g['workers']} | "
                  f"{g['small_mb']:.0f} | {g['big_mb']:.0f} | {g['ratio']:.2f} | "
                  f"{g['processes'][0]} / {g['processes'][1]} |" for g in flat]
        if any(a != b for g in flat for a, b in [g["processes"]]):
            lines += ["", "A row whose process counts differ compares different process trees "
                      "(e.g. fewer shards than workers in the small corpus), not corpus size."]
    for eq in report.get("tokenizer_checks") or []:
        lines += ["", f"Same token ids, tokenizer `{eq.get('tokenizer', 'shipped')}`: ours-raw "
                  f"vs megatron-lm ({eq['workers']} worker(s)): documents {eq['documents_ours']} "
                  f"vs {eq['documents_megatron']}; of {eq['compared']} compared, "
                  f"{eq['identical']} identical, {eq['differing_explained_by_special_tokens']} "
                  "differ where the text holds a literal special-token string (ours strips it), "
                  f"{eq['differing_unexplained']} differ otherwise -> "
                  f"{'same' if eq['same_tokens'] else 'DIFFERENT'} token ids."]
    for check in report.get("ray_checks") or []:
        lines += ["", f"Ray vs local, tokenizer `{check['tokenizer']}`, {check['case']}, "
                  f"{check['workers']} workers: {', '.join(check['files'])} "
                  f"{'byte-identical' if check['identical'] else 'DIFFERENT: ' + str(check['differing'])}."]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"
