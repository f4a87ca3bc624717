"""Tables of the reflection post-training comparison from an attack-suite run's stored answers.

    flock /tmp/cpu.lock .venv/bin/python tools/posttrain_report.py \
        --suite examples/real_model/attack.yaml --monitor reflect --monitor import \
        --json docs/results/real-model/posttrain_results.json

ASR (keyword and compliance judges), McNemar tests of stage pairs, refusal rates on harmless
prompts, guarded refusals by cause; with --monitor STAGE, that stage's reflections on its own
greedy answers against the compliance judge (loads the model). See
megatron_srp/evaluation/posttrain_report.py.
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.evaluation import posttrain_report as pr
from megatron_srp.evaluation.stage_config import load_suite_config

PAIRS = tuple((a, ma, b, mb) for a in ("reflect", "reflect-both") for ma, b, mb in (
    ("greedy", "import", "greedy"), ("guarded", "import", "greedy"),
    ("guarded", "refusal-sft", "greedy"))) + (("refusal-sft", "greedy", "import", "greedy"),)


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def tables(res: dict) -> list[str]:
    lines = ["ASR % [95% bootstrap interval] (keyword judge / compliance judge)", "",
             "| stage/method | " + " | ".join((*pr.HARMFUL, "pooled")) + " |",
             "|---|" + "---|" * (len(pr.HARMFUL) + 1)]
    for key, per in res["asr"].items():
        cells = []
        for b in (*pr.HARMFUL, "pooled"):
            c = per.get(b)
            cells.append("-" if c is None else " / ".join(
                f"{_pct(c[j]['asr'])} [{_pct(c[j]['asr_ci'][0])}, {_pct(c[j]['asr_ci'][1])}]"
                for j in pr.JUDGES))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| a | b | judge | n | ASR a | ASR b | only a | only b | McNemar p |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['judge']} | {p['n']} | {_pct(p['asr_a'])} | "
              f"{_pct(p['asr_b'])} | {p['a_only']} | {p['b_only']} | {p['p']:.3g} |"
              for p in res["pairs"]]
    lines += ["", "| stage/method | harmless set | n | refusal % | helpful % | unhelpful % | "
              "partial % | full % | short-circuit % | unclassified % |", "|---" * 10 + "|"]
    for key, per in res["harmless"].items():
        for b, s in per.items():
            sh = s["shares"]
            lines.append(f"| {key} | {b} | {s['n']} | {_pct(s['refusal_rate'])} | "
                         + " | ".join(_pct(sh[c]) for c in (
                             "compliant_helpful", "compliant_unhelpful", "partial_refusal",
                             "full_refusal", "short_circuit", "unclassified")) + " |")
    types = sorted({t for v in res["xstest_types"].values() for t in v})
    if types:
        lines += ["", "XSTest safe prompts: refusal % per type", "",
                  "| type | " + " | ".join(res["xstest_types"]) + " |",
                  "|---|" + "---|" * len(res["xstest_types"])]
        lines += [f"| {t} | " + " | ".join(_pct(v.get(t)) for v in res["xstest_types"].values())
                  + " |" for t in types]
    for key, per in res["causes"].items():
        lines += ["", f"{key}: refusals by cause: " + "; ".join(
            f"{b} " + ", ".join(f"{c} {n}" for c, n in v.items()) for b, v in per.items())]
    for stage, m in res.get("monitor", {}).items():
        a, h = m["all"], m["harmful_prompts"]
        lines += ["", f"self-monitoring of {stage}: all {a['n']} answers: balanced accuracy "
                  f"{_pct(a['balanced_accuracy'])} (TPR {_pct(a['tpr'])}, TNR {_pct(a['tnr'])}; "
                  f"{a['unsafe']} Unsafe labels); harmful prompts only ({h['n']}): "
                  f"{_pct(h['balanced_accuracy'])} (TPR {_pct(h['tpr'])}, TNR {_pct(h['tnr'])}); "
                  f"malformed reflections {m['malformed']}; AUC of p(Unsafe) "
                  f"{'-' if m.get('auc') is None else format(m['auc'], '.3f')}; the first label token "
                  f"alone: balanced accuracy {_pct(m['first_token']['balanced_accuracy'])} "
                  f"(TPR {_pct(m['first_token']['tpr'])}, TNR {_pct(m['first_token']['tnr'])})"]
    return lines


@cli.tool_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, metavar="FILE",
                    help="the attack-suite config that was run")
    ap.add_argument("--monitor", action="append", default=[], metavar="STAGE",
                    help="read this stage's reflections on its greedy answers (repeatable)")
    ap.add_argument("--show", type=int, default=0, metavar="N",
                    help="also print every stage's answers to the first N prompts of each "
                         "benchmark")
    cli.add_common_args(ap, example="suite", json_help="append the results as one JSON line to FILE")
    args = cli.parse_args(ap, argv)
    cfg = load_suite_config(args.suite)
    res = pr.analyse(cfg, PAIRS)
    if args.monitor:
        import torch
        from megatron_srp.inference.sample import load_for_inference
        torch.manual_seed(0)
        res["monitor"] = {}
        for name in args.monitor:
            st = next(s for s in cfg.stages if s.name == name)
            model, tok, _ = load_for_inference(st.checkpoint)
            if st.window is not None:
                model.max_sequence_length = st.window
            res["monitor"][name] = pr.self_monitoring(cfg, name, model, tok)
    if args.json:
        cli.append_json(args.json, res)
    print("\n".join(tables(res)))
    for bench in (b.name for b in cfg.benchmarks) if args.show else ():
        print(f"\n## {bench}: the first {args.show} prompts")
        for row in pr.side_by_side(cfg, bench, args.show):
            print(f"\n> {' '.join(row['prompt'].split())[:200]}")
            for key, text in row["answers"].items():
                print(f"  {key}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
