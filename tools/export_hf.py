"""Export a checkpoint (any TP/PP layout) as a Hugging Face Llama directory.

    python tools/export_hf.py --checkpoint runs/tiny-cpu-demo --out exports/tiny [--dtype bfloat16]

The output loads with transformers' LlamaForCausalLM / AutoTokenizer (so lm-eval, vLLM and
HarmBench can read it). --checkpoint is a run directory (its latest complete checkpoint) or
one iter_N directory.
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
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weight dtype (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cli.add_common_args(parser, example="dtype")
    args = cli.parse_args(parser, argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.inference.hf_export import EXPORT_FILE, export_hf
    from megatron_srp.inference.sample import shutdown
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        out = export_hf(args.checkpoint, args.out, args.dtype, args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    info = (out / EXPORT_FILE).read_text()
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}\n{info}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
