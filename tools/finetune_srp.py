"""Finetune a pretrained checkpoint on chat data, the loss on the answers only.

    torchrun --nproc_per_node=N tools/finetune_srp.py --config examples/finetune/instruct.yaml \
        finetune.pretrained=runs/tiny-cpu-demo finetune.data=[chat.jsonl] \
        checkpoint.save=runs/tiny-instruct

The model shape and sequence length come from the pretrained run; the recipe sets the rest
(docs/finetuning.md). A killed run resumes from its checkpoint.save directory. Without a
terminal on stderr, or with --no-progress, there is no progress bar.
"""
import argparse
import os
import sys

from megatron_srp import cli
from megatron_srp.data.chat import ChatDataError
from megatron_srp.training.finetune import finetune, load_finetune_config
from megatron_srp.training.stopping import EXIT_STOPPED


@cli.tool_main  # a ConfigError exits 2 with one line, said once (rank 0)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, options=False, config_help="YAML recipe (see examples/finetune/)",
                        overrides_help="set a config key, e.g. finetune.pretrained=RUN "
                                       "finetune.data=[a.jsonl]")
    args = cli.parse_args(parser, argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
        if not cli.progress_wanted(args):
            cfg.logging.progress_bar = False
        result = finetune(cfg)
    except ChatDataError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same error; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return EXIT_STOPPED if result.stopped else 0  # 75: stopped early after saving


if __name__ == "__main__":
    sys.exit(main())
