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
import json
import sys

from megatron_srp.config import ConfigError, load_config
from megatron_srp.training.memory import GIB, format_table, plan_memory, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (optional; the defaults are the tiny preset)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="world size: number of GPUs of the job (default 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--vocab-size", type=int, help="default: the preset's vocabulary")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.preset=llama-7b")
    args = parser.parse_args(argv)
    capacity = int(args.gpu_memory_gib * GIB)
    try:
        cfg = load_config(args.config, args.overrides)
        estimate = plan_memory(cfg, args.gpus, args.vocab_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(estimate, cfg, args.gpus, capacity))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(report(estimate, cfg, args.gpus, capacity)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
