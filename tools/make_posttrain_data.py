"""Reflection post-training data from an imported chat model's own answers (docs/results/real-model.md).

    flock /tmp/cpu.lock .venv/bin/python tools/make_posttrain_data.py \
        --model runs/smollm2-135m-instruct --out data/posttrain --harmful 240 --benign 240

Writes to --out: ``split.json`` (the evaluation prompts per set, the training prompts' ids,
what the deduplication removed), the evaluation files the attack suite loads by path
(``advbench_heldout.csv``, ``harmbench_val.csv``, ``xstest_safe.csv``, ``alpaca_heldout.json``),
``answers.jsonl`` (the model's greedy answers, cached: a rerun generates only what is missing),
``reflect.jsonl`` (own answers + reflections) and ``refusal.jsonl`` (the same prompts, harmful
ones answered with a fixed refusal). See megatron_srp/data/safety_posttrain.py.
"""
import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from megatron_srp import cli
from megatron_srp.data import safety_posttrain as sp
from megatron_srp.evaluation.benchmarks import SHARED


@cli.tool_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run directory of the imported chat model")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--shared-data", default=str(SHARED))
    ap.add_argument("--harmful", type=int, default=240, help="harmful-source training prompts")
    ap.add_argument("--benign", type=int, default=240, help="benign training prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=160,
                    help="the finetune's train.seq_length: longer exchanges are left out of "
                         "both sets")
    ap.add_argument("--split-only", action="store_true",
                    help="write the split and the evaluation files, answer nothing")
    cli.add_common_args(ap, example="harmful")
    args = cli.parse_args(ap, argv)

    out = Path(args.out)
    split = sp.evaluation_split(args.shared_data, args.seed)
    train, dropped = sp.training_prompts(args.shared_data, split, args.harmful, args.benign,
                                         args.seed)
    files = sp.write_benchmark_files(split, out, args.seed)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("split_only", "config", "overrides", "no_progress")}
    (out / "split.json").write_text(json.dumps(sp.manifest(split, train, dropped, files,
                                                           settings), indent=1),
                                    encoding="utf-8")
    print(f"evaluation: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    print(f"training: {Counter(p.source for p in train)}; removed {dropped}")
    if args.split_only:
        return 0

    import torch
    from megatron_srp.evaluation.posttrain_labels import label_answers, model_answerer
    from megatron_srp.inference.sample import load_for_inference

    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_for_inference(args.model)
    t0 = time.time()
    answers = sp.own_answers(train, out / "answers.jsonl",
                             model_answerer(model, tokenizer, args.max_new_tokens),
                             args.batch_size)
    print(f"answers ready in {time.time() - t0:.0f} s")
    labels = label_answers(train, answers)
    reflect, refusal = sp.build_sets(train, answers, labels)
    reflect, refusal, long = sp.fit_length(reflect, refusal, tokenizer, args.seq_length)
    print(f"{long} prompts left out: longer than {args.seq_length} tokens in either set")
    order = random.Random(args.seed).sample(range(len(reflect)), len(reflect))
    reflect, refusal = [reflect[i] for i in order], [refusal[i] for i in order]
    # one seeded order for both: finetune.max_records=N takes the same mixed N prompts
    sp.write_jsonl(out / "reflect.jsonl", reflect)
    sp.write_jsonl(out / "refusal.jsonl", refusal)
    counts = Counter(("harmful" if r["harmful_source"] else "benign",
                      "Safe" if r["reflections"][0]["safe"]
                      else f"Unsafe: {r['reflections'][0]['category']}") for r in reflect)
    print(f"{len(reflect)} records -> reflect.jsonl, refusal.jsonl "
          f"({len(train) - len(reflect) - long} empty answers left out)")
    for key, n in sorted(counts.items()):
        print(f"  {key[0]} {key[1]}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
