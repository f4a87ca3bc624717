"""Decoding methods compared within one model, paired on the same (seed, attack, query).

The headline compares models; these compare how one model is decoded: SafeBeam against top-k
sampling (what the seed papers attack with) on the harmful queries, and SafeBeam against plain
beam search on the safe ones (what the tag costs in helpfulness). Each with the exact McNemar
test of evaluation.asr.paired_test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_srp.evaluation.asr import paired_test

#: (method, against it, on which queries, the outcome compared)
PAIRS = (("safebeam", "topk", True, "unsafe"), ("safebeam", "beam", True, "unsafe"),
         ("safebeam", "beam", False, "correct"))


def method_pairs(rows_by_seed: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """Every comparison of PAIRS whose two methods this model was decoded with."""
    out = []
    for ours, theirs, harmful, key in PAIRS:
        pairs = []
        for rows in rows_by_seed.values():
            got = {m: {(r["attack"], r["query"]): bool(r[key]) for r in rows
                       if r["method"] == m and r["harmful"] == harmful} for m in (ours, theirs)}
            pairs += [(got[ours][k], got[theirs][k]) for k in sorted(set(got[ours])
                                                                      & set(got[theirs]))]
        if not pairs:
            continue
        test = paired_test([a for a, _ in pairs], [b for _, b in pairs])
        out.append({"ours": ours, "theirs": theirs, "queries": "harmful" if harmful else "safe",
                    "outcome": "ASR" if key == "unsafe" else "correct", "n": len(pairs),
                    "rate_ours": sum(a for a, _ in pairs) / len(pairs),
                    "rate_theirs": sum(b for _, b in pairs) / len(pairs), **test})
    return out


def method_pair_lines(results: dict[str, Any]) -> list[str]:
    rows = [(name, c) for name, m in results["models"].items() for c in m.get("methods_paired",
                                                                             [])]
    if not rows:
        return []
    lines = ["", "## Decoding methods compared within a model", "",
             "Paired on the same seeds, attacks and queries (all attacks pooled); p: exact "
             "McNemar test on the discordant pairs.", "",
             "| model | method | against | queries | outcome | pairs | % method | % against | "
             "only method | only against | p |", "|---|" + "---|" * 10]
    lines += [f"| {name} | {c['ours']} | {c['theirs']} | {c['queries']} | {c['outcome']} | "
              f"{c['n']} | {100 * c['rate_ours']:.0f} | {100 * c['rate_theirs']:.0f} | "
              f"{c['a_only']} | {c['b_only']} | {c['p']:.2g} |" for name, c in rows]
    return lines


def _pct(x: Any) -> str:
    return "-" if x is None or x != x else f"{100 * x:.0f}"


def _interval(cell: Optional[dict]) -> str:
    if not cell or not cell.get("n"):
        return "-"
    return f"{_pct(cell['mean'])} [{_pct(cell['lo'])}, {_pct(cell['hi'])}]"


def side_by_side(runs: list[dict[str, Any]], baseline: str = "filter+greedy") -> list[str]:
    """Runs of the same experiment on other phrasing sets (each a report's results.json, with
    its ``templates``), one row each: the premise, SRP's self-monitoring, why SRP's guarded
    answers to harmful queries were refused, and the headline against ``baseline`` over all
    attacks, counted fail-closed and monitor-only."""
    lines = ["| run | phrasing set | seeds | seen whole (unsafe) | capability raw / filter | "
             "unsafe gen. raw / filter | SRP monitor: flagged / cleared / bal. acc. | "
             "SRP flags harm / protect / stalk / locate | "
             "SRP guarded refusals on harmful: unsafe / malformed / unread | ASR filter | "
             "ASR SRP+guarded fail-closed (p) | monitor only (p) |",
             "|---|" + "---|" * 11]
    for r in runs:
        models = r["models"]
        prem = lambda n, k: _interval(models.get(n, {}).get("premise", {}).get(k))  # noqa
        srp = models.get("srp", {})
        mon = srp.get("monitor", {})
        causes = srp.get("refusals", {}).get("guarded", {}).get("harmful", {})
        head = {h.get("counting", "fail-closed"): h for h in r.get("headline", [])
                if h["baseline"] == baseline and h["attack"] == "all"}
        closed, only = head.get("fail-closed"), head.get("monitor only")
        fit = r.get("fit") or {}
        flags = mon.get("flagged_by_query") or {}
        lines.append(
            f"| {r['name']} | {Path(r.get('templates') or 'templates.yaml').name} | "
            f"{r['seeds']} | {_pct(fit.get('seen_whole_unsafe'))} | "
            f"{prem('raw', 'capability')} / {prem('filter', 'capability')} | "
            f"{prem('raw', 'unsafe')} / {prem('filter', 'unsafe')} | "
            f"{_interval(mon.get('unsafe_recall'))} / {_interval(mon.get('safe_recall'))} / "
            f"{_pct(mon.get('balanced_accuracy'))} | "
            + " / ".join(_pct((flags.get(k) or {}).get("mean"))
                         for k in ("harm", "protect", "stalk", "locate")) + " | "
            f"{causes.get('unsafe', '-')} / {causes.get('malformed', '-')} / "
            f"{causes.get('unread', '-')} | "
            f"{_pct(closed['asr_baseline']) if closed else '-'} | "
            + (f"{_pct(closed['asr_ours'])} ({closed['p']:.2g})" if closed else "-") + " | "
            + (f"{_pct(only['asr_ours'])} ({only['p']:.2g})" if only else "-") + " |")
    return lines
