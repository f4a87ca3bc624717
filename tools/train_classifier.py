"""Train the shipped ``embedded`` safety classifier; the defaults reproduce the shipped asset.

    python tools/train_classifier.py                       # rewrites megatron_srp/assets/classifier
    python tools/train_classifier.py --out-dir /tmp/clf --report /tmp/clf_report.json
    python tools/train_classifier.py --tokenizer DIR --out-dir /tmp/clf   # for datasets built
                                                                          # with tokenizer DIR

The classifier's features are token ids, so it reads segments fastest when it shares the
dataset's tokenizer (preprocessing then hands it the ids it already has).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_srp import cli
from megatron_srp.reflection.classifiers import ASSET_DIR
from megatron_srp.reflection.features import TokenNgramFeaturizer
from megatron_srp.reflection.train_classifier import DEFAULT_SEED, train_and_write

REPO = Path(__file__).resolve().parent.parent


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="labelled data (shared/data layout) (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=ASSET_DIR,
                        help="where config.json, weights.npz and tokenizer/ go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="data sampling and split seed (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory the features use (default: the shipped one)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the full held-out report as JSON here")
    cli.add_common_args(parser, example="seed",
                        json_help="append the report (--report's content) as one JSON line "
                                  "to FILE")
    args = cli.parse_args(parser, argv)

    options = {}
    if args.tokenizer is not None:
        from megatron_srp.tokenizer import SRPTokenizer
        options["featurizer"] = TokenNgramFeaturizer(SRPTokenizer.from_dir(args.tokenizer))
    report = train_and_write(args.data_dir, args.out_dir, seed=args.seed, **options)
    m = report["held_out_metrics"]
    print(f"train {report['train']['n']} / held-out {report['held_out']['n']} examples, "
          f"trained in {report['train_seconds']} s")
    print(f"held-out accuracy {m['accuracy']}, balanced accuracy {m['balanced_accuracy']}, "
          f"unsafe F1 {m['per_class']['unsafe']['f1']}, "
          f"category accuracy on flagged {m['category_accuracy_on_flagged']}")
    for code, prf in m["per_category"].items():
        print(f"  {code:>5}: P {prf['precision']:.3f} R {prf['recall']:.3f} "
              f"F1 {prf['f1']:.3f} (n={prf['support']})")
    if args.report:
        from megatron_srp.units import write_atomic
        write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    if args.json:
        cli.append_json(args.json, report)
    print(f"saved to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
