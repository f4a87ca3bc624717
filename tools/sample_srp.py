"""Sample continuations of prompts from a trained checkpoint (one process, no torchrun).

    python tools/sample_srp.py --checkpoint runs/tiny-cpu-demo --prompt "ROMEO:" [--prompt ...]

--checkpoint is a run directory (its latest complete checkpoint is used) or one iter_N directory.
"""
import argparse
import sys
import warnings


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
    args = parser.parse_args(argv)

    # Imported after argument parsing: Megatron-Core takes seconds to import.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from megatron_srp.inference.sample import (GenerationConfig, generate, load_for_inference,
                                               shutdown)
    from megatron_srp.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               stop_at_eod=args.stop_at_eod)
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
        print(f"# {path} ({cfg.name}, {cfg.model.preset}), {gen.max_new_tokens} new tokens, {mode}")
        for i, (prompt, text) in enumerate(zip(prompts, generate(model, tokenizer, prompts, gen))):
            # The header names the prompt exactly; the body reads as one text, prompt first.
            print(f"\n--- sample {i + 1}: prompt {prompt!r} ---\n{prompt}{text}")
        sys.stdout.flush()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
