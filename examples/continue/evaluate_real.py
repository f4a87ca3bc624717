"""Before/after figures of continued pretraining with SRP on real text, for one checkpoint
(docs/results/real-model-continued.md):

* the mean loss on the reflection tokens of held-out ``srp`` text, and on its other tokens;
* the mean loss on the same held-out text without reflections (the ``raw`` variant);
* reflection accuracy: the model writes its own reflection after each held-out segment
  (what ``by_reflection``, the method ``reflection`` of tools/evaluate_srp.py, computes, with
  the labels the model wrote counted; a seeded sample of segments labelled by the
  preprocessing classifier, ``load_segments`` as in tools/evaluate_srp.py).

    python examples/continue/evaluate_real.py --checkpoint runs/smollm2-135m-instruct \
        --name import --heldout data/real-srp/heldout --out runs/eval/real-continued

writes ``<out>/<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--heldout", default="data/real-srp/heldout",
                   help="directory with the raw and srp variants of the held-out documents")
    p.add_argument("--out", default="runs/eval/real-continued")
    p.add_argument("--window", type=int, default=512, help="context of the loss windows")
    p.add_argument("--max-segments", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None,
                   help="score only the first documents of each variant (default: all)")
    args = p.parse_args(argv)

    import torch

    from megatron_srp.evaluation.reflection_accuracy import _result, load_segments
    from megatron_srp.evaluation.token_loss import dataset_token_losses
    from megatron_srp.inference.guarded import read_reflections
    from megatron_srp.inference.sample import load_for_inference
    from megatron_srp.reflection.scores import Verdict

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok, _ = load_for_inference(args.checkpoint)
    result: dict = {"checkpoint": args.checkpoint, "name": args.name, "window": args.window}
    for variant in ("srp", "raw"):
        t = time.perf_counter()
        losses = dataset_token_losses(model, tok, f"{args.heldout}/{variant}", window=args.window,
                                      max_documents=args.max_documents)
        result[f"loss_{variant}"] = {**losses.as_dict(), "seconds": round(time.perf_counter() - t, 1)}
        print(variant, json.dumps(result[f"loss_{variant}"]), flush=True)
    t = time.perf_counter()
    segments = load_segments(f"{args.heldout}/raw", max_segments=args.max_segments, seed=args.seed)
    # by_reflection's computation, keeping what each reflection said
    truth, predicted, p_unsafe, written, malformed = [], [], [], Counter(), 0
    for i in range(0, len(segments), 16):
        batch = segments[i:i + 16]
        for s, r in zip(batch, read_reflections(model, tok, [s.tokens for s in batch])):
            truth.append(Verdict(s.safe, s.category))
            predicted.append(Verdict(r.safe is not False, r.category if r.safe is False else None))
            p_unsafe.append(r.p_unsafe)
            malformed += r.safe is None
            written["malformed" if r.safe is None else r.label] += 1
    report = _result("reflection", truth, predicted, p_unsafe, {"malformed": malformed})
    result["reflection"] = {**report, "written": dict(written.most_common()),
                            "seconds": round(time.perf_counter() - t, 1)}
    print("reflection", {k: report[k] for k in ("n", "accuracy", "balanced_accuracy",
                                                 "confusion", "malformed", "auc")},
          dict(written), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
