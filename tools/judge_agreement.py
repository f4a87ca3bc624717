"""Agreement of offline judges with human labels: accuracy, Cohen's kappa, confusion counts.

    python tools/judge_agreement.py                      # XSTest v2's 2,250 labelled answers
    python tools/judge_agreement.py --judges compliance refusal-keywords --json /tmp/agree.jsonl
    python tools/judge_agreement.py --hand-labels docs/results/real-model/hand_labels.jsonl \\
        --field complies_harmfully --sources jailbreakbench harmbench xstest_unsafe

XSTest: complies = final_label 1_full_compliance (full and partial refusals do not comply).
See megatron_srp/evaluation/judge_agreement.py and docs/evaluation.md.
"""
import argparse
import os
import sys
from pathlib import Path

from megatron_srp import cli

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SRP_SHARED_DATA", REPO.parent / "shared" / "data"))


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xstest", type=Path, default=DATA / "xstest" / "completions",
                        help="folder of xstest_v2_completions_*.csv (default: %(default)s)")
    parser.add_argument("--hand-labels", type=Path,
                        help="JSON lines (source, prompt, answer, labels) instead of XSTest")
    parser.add_argument("--field", default="complies_harmfully",
                        help="with --hand-labels: the boolean field, or 'label' for "
                             "label == complies (default: %(default)s)")
    parser.add_argument("--sources", nargs="+", help="with --hand-labels: only these sources")
    parser.add_argument("--judges", nargs="+", default=["compliance", "refusal-keywords"],
                        help="offline judges by name (default: %(default)s)")
    cli.add_common_args(parser, example="judges",
                        json_help="append the figures as one JSON line to FILE")
    args = cli.parse_args(parser, argv)
    from megatron_srp.evaluation import judge_agreement as ja
    from megatron_srp.evaluation.judges import build_judge

    if args.hand_labels is not None:
        rows = ja.load_hand_labels(args.hand_labels, args.field, args.sources)
        source = f"{args.hand_labels} ({args.field}"
        source += f"; {', '.join(args.sources)})" if args.sources else ")"
    else:
        files = sorted(args.xstest.glob("xstest_v2_completions_*.csv"))
        if not files:
            raise FileNotFoundError(f"no xstest_v2_completions_*.csv in {args.xstest}")
        rows = ja.load_xstest(files)
        source = f"{args.xstest} (complies = 1_full_compliance)"
    try:
        results = [ja.agreement(build_judge(name), rows) for name in args.judges]
    except ValueError as exc:  # an unknown judge name
        raise cli.UsageError(str(exc)) from exc
    print(f"# {len(rows)} labelled answers from {source}; {sum(r.complies for r in rows)} "
          f"comply")
    print(ja.table(results))
    for res in results:
        print(f"{res['judge']} reasons: " + ", ".join(f"{k} {v}" for k, v in
                                                    res["reasons"].items()))
    if args.json:
        cli.append_json(args.json, {"source": source, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
