"""Finetune a pretrained checkpoint on chat data, the loss on the answers only.

    torchrun --nproc_per_node=N tools/finetune_srp.py --config examples/finetune/instruct.yaml \
        finetune.pretrained=runs/tiny-cpu-demo finetune.data=[chat.jsonl] \
        checkpoint.save=runs/tiny-instruct

The model shape and sequence length come from the pretrained run; the recipe sets the rest
(docs/finetuning.md). A killed run resumes from its checkpoint.save directory.
"""
import argparse
import os
import sys

from megatron_srp.config import ConfigError
from megatron_srp.data.chat import ChatDataError
from megatron_srp.training.finetune import finetune, load_finetune_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see examples/finetune/)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. finetune.pretrained=RUN finetune.data=[a.jsonl]")
    args = parser.parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
        finetune(cfg)
    except (ConfigError, ChatDataError) as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same error; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
