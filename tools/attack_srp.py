"""The attack suite over model stages: finetune what is missing, measure every stage (ASR per
benchmark and decoding method, over-refusal, GCG), write report.md, results.json and plots.

    python tools/attack_srp.py --config examples/attack/stages_tiny.yaml [key=value ...]

Reruns reuse finished finetunes and units (docs/attacks.md).
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML suite (see examples/attack/)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. samples=1 out_dir=runs/x")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.config import ConfigError
    from megatron_srp.evaluation.stages import load_suite_config, run_suite
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        cfg = load_suite_config(args.config, args.overrides)
        run_suite(cfg, progress=not args.no_progress)
    except (ConfigError, CheckpointError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {cfg.out_dir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
