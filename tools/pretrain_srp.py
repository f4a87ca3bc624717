"""Pretrain a Megatron-Core GPT model.

    torchrun --nproc_per_node=N tools/pretrain_srp.py --config FILE [key=value ...]

With checkpoint.pretrained=DIR (a run or an imported model, docs/import.md) the run starts
from DIR's weights and model shape with a fresh optimizer and LR schedule (continued
pretraining); once it has saved, a restart resumes its own checkpoints.

Without a terminal on stderr, or with --no-progress, there is no progress bar
(logging.progress_bar=false); the console log lines stay.
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.training.pretrained import load_pretrain_config
from megatron_srp.training.stopping import EXIT_STOPPED
from megatron_srp.training.trainer import pretrain


@cli.tool_main  # a ConfigError exits 2 with one line, said once (rank 0)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, options=False, config_help="YAML file (see examples/)",
                        overrides_help="set a config key, e.g. train.train_iters=200")
    args = cli.parse_args(parser, argv)
    cfg = load_pretrain_config(args.config, args.overrides)
    if not cli.progress_wanted(args):
        cfg.logging.progress_bar = False
    result = pretrain(cfg)
    # 75: stopped early on a signal or the time budget, after saving; rerun to resume.
    return EXIT_STOPPED if result.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
