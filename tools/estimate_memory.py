"""Estimate per-GPU memory of a training run, and whether it fits, before launching it.

    python tools/estimate_memory.py --config FILE --gpus N [key=value ...]
    python tools/estimate_memory.py --gpus 512 model.preset=llama-70b train.seq_length=8192 \\
        parallel.tensor_model_parallel_size=8 parallel.pipeline_model_parallel_size=8 \\
        parallel.sequence_parallel=true model.recompute=full

Weights, gradients, optimizer state and activations of the largest pipeline stage, in GiB
(formulas: megatron_srp/training/memory.py, docs/training.md "Memory planning"). Precision
``auto`` is planned as bf16. With --json, appends the result as one JSON line to a file.
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.training.memory import GIB, format_table, plan_memory, report
from megatron_srp.training.pretrained import load_pretrain_config


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1,
                        help="world size: number of GPUs of the job (default 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--vocab-size", type=int, help="default: the preset's vocabulary")
    cli.add_common_args(parser, options=False,
                        config_help="YAML file (optional; the defaults are the tiny preset)",
                        overrides_help="set a config key, e.g. model.preset=llama-7b",
                        json_help="append the result as one JSON line to this file")
    args = cli.parse_args(parser, argv)
    capacity = int(args.gpu_memory_gib * GIB)
    # With checkpoint.pretrained (continued pretraining), the model is that checkpoint's.
    cfg = load_pretrain_config(args.config, args.overrides)  # ConfigError: exit 2
    estimate = plan_memory(cfg, args.gpus, args.vocab_size)
    print(format_table(estimate, cfg, args.gpus, capacity))
    if args.json:
        cli.append_json(args.json, report(estimate, cfg, args.gpus, capacity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
