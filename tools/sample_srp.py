"""Continue prompts from a trained checkpoint (one process, no torchrun), by sampling, beam
search, SafeBeam or reflection-guarded decoding.

    python tools/sample_srp.py --checkpoint runs/tiny-cpu-demo --prompt "ROMEO:" [--prompt ...]
    python tools/sample_srp.py --checkpoint RUN --prompt "..." --method safebeam --num-beams 10
    python tools/sample_srp.py --checkpoint RUN --prompt "..." --method guarded --segment-tokens 256

--checkpoint is a run directory (its latest complete checkpoint is used) or one iter_N directory.
"""
import argparse
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (checkpoint.save) or one iter_N checkpoint in it")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeatable (all prompts run as one batch). "
                             "Default: one empty prompt, i.e. the start of a document")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens to generate per prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10,
                        help="sample among the k most likely tokens; 0 = all (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass; 1.0 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false",
                        help="keep generating past the end-of-document token")
    parser.add_argument("--method", choices=("sample", "beam", "safebeam", "guarded"),
                        default="sample",
                        help="sample: greedy/top-k/top-p (the options above); beam; safebeam; "
                             "guarded: sampling with reflection checks (default: %(default)s)")
    parser.add_argument("--num-beams", type=int, default=10,
                        help="beam and safebeam (default: %(default)s)")
    parser.add_argument("--top-n", type=int, default=2,
                        help="safebeam: candidates per beam (default: %(default)s)")
    parser.add_argument("--safebeam-rule", choices=("threshold", "fraction"),
                        default="threshold",
                        help="safebeam: drop candidates whose look-ahead tag probability is at "
                             "least --tag-threshold, or a fixed --drop-fraction of them "
                             "(default: %(default)s)")
    parser.add_argument("--tag-threshold", type=float, default=0.1,
                        help="safebeam, threshold rule (default: %(default)s)")
    parser.add_argument("--drop-fraction", type=float, default=0.5,
                        help="safebeam, fraction rule: share of candidates pruned by look-ahead "
                             "(default: %(default)s)")
    parser.add_argument("--boundary", choices=("budget", "sentence"), default="budget",
                        help="guarded: reflect every --segment-tokens tokens or at sentence "
                             "ends (default: %(default)s)")
    parser.add_argument("--segment-tokens", type=int, default=256,
                        help="guarded: tokens between reflections, as the data's segmentation "
                             "budget (default: %(default)s)")
    parser.add_argument("--guard-fail-open", action="store_true",
                        help="guarded: let an answer through when its reflection is malformed "
                             "or missing (default: refuse it)")
    cli.add_common_args(parser, example="max_new_tokens")
    args = cli.parse_args(parser, argv)

    # Imported after argument parsing: Megatron-Core takes seconds to import.
    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig
    from megatron_srp.inference.generation import decode
    from megatron_srp.inference.guarded import GuardConfig
    from megatron_srp.inference.sample import GenerationConfig, load_for_inference, shutdown
    from megatron_srp.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               stop_at_eod=args.stop_at_eod)
        beam = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                    stop_at_eod=args.stop_at_eod)
        method = {"sample": lambda: gen, "beam": lambda: BeamConfig(**beam),
                  "safebeam": lambda: SafeBeamConfig(**beam, top_n=args.top_n,
                                                     rule=args.safebeam_rule,
                                                     tag_threshold=args.tag_threshold,
                                                     drop_fraction=args.drop_fraction),
                  "guarded": lambda: GuardConfig(sampling=gen, boundary=args.boundary,
                                                 segment_tokens=args.segment_tokens,
                                                 fail_open=args.guard_fail_open)}
        config = method[args.method]()
    except ValueError as exc:
        parser.error(str(exc))
    prompts = args.prompt if args.prompt else [""]
    try:
        path = resolve_checkpoint(args.checkpoint)
        model, tokenizer, cfg = load_for_inference(path)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        mode = ("greedy" if gen.temperature == 0 else
                f"temperature {gen.temperature}, top_k {gen.top_k}, top_p {gen.top_p}, "
                f"seed {gen.seed}")
        if args.method in ("beam", "safebeam"):
            mode = f"{args.method}, {args.num_beams} beams"
        elif args.method == "guarded":
            mode = (f"guarded ({args.boundary}, fails "
                    f"{'open' if args.guard_fail_open else 'closed'}), {mode}")
        print(f"# {path} ({cfg.name}, {cfg.model.preset}), {gen.max_new_tokens} new tokens, {mode}")
        results = decode(model, tokenizer, prompts, config)
        for i, (prompt, result) in enumerate(zip(prompts, results)):
            # The header names the prompt exactly; the body reads as one text, prompt first.
            extra = "" if args.method == "sample" and result.finish != "tag" else \
                f" [{_describe(result)}]"
            # A short-circuited answer replaces the continuation: it goes on a line of its own.
            body = f"{prompt}\n{result.text}" if result.short_circuited else prompt + result.text
            print(f"\n--- sample {i + 1}: prompt {prompt!r}{extra} ---\n{body}")
        sys.stdout.flush()
    finally:
        shutdown()
    return 0


def _describe(result) -> str:
    """How an answer ended, for the sample's header."""
    parts = [f"finish: {result.finish}"]
    if result.short_circuited:
        parts.append("short-circuited")
    if result.category:
        parts.append(f"category {result.category}")
    if result.reflections:
        verdicts = ["?" if r["safe"] is None else ("Safe" if r["safe"] else "Unsafe")
                    for r in result.reflections]
        parts.append(f"reflections: {', '.join(verdicts)}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
