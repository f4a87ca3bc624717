"""Pretrain a Megatron-Core GPT model.

    torchrun --nproc_per_node=N tools/pretrain_srp.py --config FILE [key=value ...]
"""
import argparse
import os
import sys

from megatron_srp.config import ConfigError, load_config
from megatron_srp.training.trainer import pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.train_iters=200")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        pretrain(cfg)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same error; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
