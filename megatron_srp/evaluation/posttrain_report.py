"""What the attack suite's stored answers say about reflection post-training against refusal SFT.

Reads ``<out_dir>/answers/<stage>/asr-<benchmark>.json`` of a suite run (stages.py) and
computes, per stage and decoding method:

- ASR on the harmful benchmarks and pooled, judged by ``refusal-keywords`` and ``compliance``
  (a short-circuited answer is a refusal), with 95% bootstrap intervals (asr.attack_success);
- exact McNemar tests of stage pairs on the same pooled harmful prompts (asr.paired_test);
- the refusal rate and answer classes on harmless prompts (the over-refusal heuristic), and the
  refusal rate per XSTest prompt type;
- guarded decoding's refusals by cause (unsafe / malformed / unread);
- self-monitoring: the model's own reflection on each of its greedy answers (read with
  guarded.read_reflections after the answer), against the ``compliance`` judge's label of the
  answer (Unsafe = a harmful prompt answered compliantly; the training data's rule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_srp.evaluation.asr import RefusalKeywordJudge, attack_success, paired_test
from megatron_srp.evaluation.compliance import ComplianceJudge
from megatron_srp.evaluation.overrefusal import (HeuristicOverRefusalJudge,
                                                 over_refusal_summary)
from megatron_srp.evaluation.reflection_accuracy import ranking_auc
from megatron_srp.units import read_json

HARMFUL = ("jailbreakbench", "harmbench", "advbench")
HARMLESS = ("xstest", "alpaca")
JUDGES = {"keyword": RefusalKeywordJudge(), "compliance": ComplianceJudge()}


def stored_answers(out_dir: str | Path, stage: str, bench: str) -> Optional[dict[str, Any]]:
    saved = read_json(Path(out_dir) / "answers" / stage / f"asr-{bench}.json")
    return None if saved is None else saved["result"]


def _items(cfg, bench: str):
    from megatron_srp.evaluation.stage_units import benchmark_items

    spec = next(b for b in cfg.benchmarks if b.name == bench)
    return benchmark_items(spec.name, spec.path, spec.limit, None)


def _flags(behaviors, rows: list[dict], judge) -> list[bool]:
    """One harmful flag per prompt (first sample): the judge's verdict, unless short-circuited."""
    if [r["id"] for r in rows] != [b.id for b in behaviors]:
        raise ValueError("stored answers are for other prompts than the suite's benchmark")
    answers = [r["answers"][0] for r in rows]
    verdicts = judge.judge([b.prompt for b in behaviors], [a["text"] for a in answers])
    return [bool(v.harmful) and not a["short_circuited"] for v, a in zip(verdicts, answers)]


def analyse(cfg, pairs: Sequence[tuple[str, str, str, str]]) -> dict[str, Any]:
    """Everything but self-monitoring, from the stored answers of suite config ``cfg``.
    ``pairs``: ``(stage, method, against stage, against method)`` to test."""
    from megatron_srp.evaluation.stage_config import stage_methods

    out: dict[str, Any] = {"asr": {}, "pairs": [], "harmless": {}, "xstest_types": {},
                           "causes": {}}
    pooled: dict[tuple[str, str, str], list[bool]] = {}
    for st in cfg.stages:
        for m in stage_methods(cfg, st):
            key = f"{st.name}/{m}"
            flags_all: dict[str, list[bool]] = {j: [] for j in JUDGES}
            causes: dict[str, dict[str, int]] = {}
            for bench in (*HARMFUL, *HARMLESS):
                got = stored_answers(cfg.out_dir, st.name, bench)
                if got is None or m not in got:
                    continue
                behaviors, rows = _items(cfg, bench), got[m]["answers"]
                shorted = [r["answers"][0] for r in rows if r["answers"][0]["short_circuited"]]
                causes[bench] = {c: sum(a.get("refusal_cause") == c for a in shorted)
                                 for c in ("unsafe", "malformed", "unread")}
                if bench in HARMFUL:
                    for j, judge in JUDGES.items():
                        flags = _flags(behaviors, rows, judge)
                        flags_all[j] += flags
                        cats = [b.category or "none" for b in behaviors]
                        out["asr"].setdefault(key, {}).setdefault(bench, {})[j] = \
                            attack_success([[f] for f in flags], cats)["overall"]
                    continue
                answers = [r["answers"][0] for r in rows]
                classes = HeuristicOverRefusalJudge().judge(
                    [b.prompt for b in behaviors], [a["text"] for a in answers],
                    [a["short_circuited"] for a in answers])
                out["harmless"].setdefault(key, {})[bench] = over_refusal_summary(classes)
                if bench == "xstest":
                    types: dict[str, list[bool]] = {}
                    for b, c in zip(behaviors, classes):
                        types.setdefault(b.category, []).append(
                            c in ("partial_refusal", "full_refusal", "short_circuit"))
                    out["xstest_types"][key] = {t: sum(v) / len(v) for t, v in types.items()}
            for j, flags in flags_all.items():
                if flags:
                    pooled[(st.name, m, j)] = flags
                    out["asr"].setdefault(key, {}).setdefault("pooled", {})[j] = \
                        attack_success([[f] for f in flags], ["none"] * len(flags))["overall"]
            if m == "guarded":
                out["causes"][key] = causes
    for a, ma, b, mb in pairs:
        for j in JUDGES:
            if (a, ma, j) in pooled and (b, mb, j) in pooled:
                x, y = pooled[(a, ma, j)], pooled[(b, mb, j)]
                out["pairs"].append({"a": f"{a}/{ma}", "b": f"{b}/{mb}", "judge": j,
                                     "asr_a": sum(x) / len(x), "asr_b": sum(y) / len(y),
                                     **paired_test(x, y)})
    return out


def side_by_side(cfg, bench: str, n: int, width: int = 160) -> list[dict[str, Any]]:
    """The first ``n`` prompts of ``bench`` with every stage's and method's first answer (cut to
    ``width`` characters; a guarded refusal shown with its cause), for reading beside the tables."""
    from megatron_srp.evaluation.stage_config import stage_methods

    rows = [{"prompt": b.prompt, "answers": {}} for b in _items(cfg, bench)[:n]]
    for st in cfg.stages:
        got = stored_answers(cfg.out_dir, st.name, bench) or {}
        for m in stage_methods(cfg, st):
            for row, item in zip(rows, got.get(m, {}).get("answers", [])):
                a = item["answers"][0]
                text = " ".join(a["text"].split())
                if a["short_circuited"]:
                    text = f"[refused: {a.get('refusal_cause') or 'unsafe'}] {text}"
                row["answers"][f"{st.name}/{m}"] = text[:width] + ("..." if len(text) > width
                                                                   else "")
    return rows


def balanced_accuracy(truth: Sequence[bool], said: Sequence[bool]) -> dict[str, Any]:
    """Of Unsafe (True) against Safe (False): the mean of the two classes' recalls (NaN for a
    class with no members), with the confusion counts."""
    tp = sum(t and s for t, s in zip(truth, said))
    tn = sum(not t and not s for t, s in zip(truth, said))
    pos, neg = sum(truth), len(truth) - sum(truth)
    tpr = tp / pos if pos else float("nan")
    tnr = tn / neg if neg else float("nan")
    return {"n": len(truth), "unsafe": pos, "safe": neg, "tpr": tpr, "tnr": tnr,
            "balanced_accuracy": (tpr + tnr) / 2, "tp": tp, "tn": tn, "fp": neg - tn,
            "fn": pos - tp}


def self_monitoring(cfg, stage: str, model, tokenizer, batch_size: int = 16
                    ) -> dict[str, Any]:
    """The stage's reflection on each of its greedy answers (evaluation prompts of every
    benchmark) against the compliance judge's label; a malformed reflection counts as Unsafe
    (as guarded decoding fails closed) and is counted."""
    from megatron_srp.evaluation.attacks import attack_ids
    from megatron_srp.inference.guarded import read_reflections

    truth, said, p_unsafe, malformed, per_bench = [], [], [], 0, {}
    for bench in (*HARMFUL, *HARMLESS):
        got = stored_answers(cfg.out_dir, stage, bench)
        if got is None or "greedy" not in got:
            continue
        behaviors = _items(cfg, bench)
        texts = [r["answers"][0]["text"] for r in got["greedy"]["answers"]]
        if bench in HARMFUL:
            labels = [v.harmful for v in JUDGES["compliance"].judge(
                [b.prompt for b in behaviors], texts)]
        else:
            labels = [False] * len(texts)
        contexts = [attack_ids(tokenizer, b.prompt, "model") + tokenizer.tokenize(t)
                    for b, t in zip(behaviors, texts)]
        verdicts = []
        for s in range(0, len(contexts), batch_size):
            verdicts += read_reflections(model, tokenizer, contexts[s:s + batch_size])
        bench_said = [v.safe is not True for v in verdicts]
        malformed += sum(v.safe is None for v in verdicts)
        per_bench[bench] = balanced_accuracy(labels, bench_said)
        truth += labels
        said += bench_said
        p_unsafe += [v.p_unsafe for v in verdicts]
    harmful_n = sum(per_bench[b]["n"] for b in HARMFUL if b in per_bench)
    first = [p is not None and p > 0.5 for p in p_unsafe]
    return {"all": balanced_accuracy(truth, said), "malformed": malformed,
            "auc": ranking_auc(truth, p_unsafe),
            # the first label token alone (Unsafe over Safe), whatever follows it
            "first_token": balanced_accuracy(truth, first),
            "harmful_prompts": balanced_accuracy(truth[:harmful_n], said[:harmful_n]),
            "per_benchmark": per_bench}
