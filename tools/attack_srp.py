"""The attack suite over model stages: finetune what is missing, measure every stage (ASR per
benchmark and decoding method, over-refusal, GCG), write report.md, results.json and plots.

    python tools/attack_srp.py --config examples/attack/stages_tiny.yaml [key=value ...]

Reruns reuse finished finetunes and units (docs/attacks.md). --json FILE appends results.json's
content as one JSON line to FILE.
"""
import argparse
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, options=False, config_required=True,
                        config_help="YAML suite (see examples/attack/)",
                        overrides_help="set a config key, e.g. samples=1 out_dir=runs/x",
                        json_help="append the results (results.json's content) as one JSON "
                                  "line to FILE")
    args = cli.parse_args(parser, argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.config import ConfigError
    from megatron_srp.evaluation.stages import load_suite_config, run_suite
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        cfg = load_suite_config(args.config, args.overrides)
        results = run_suite(cfg, progress=cli.progress_wanted(args))
    except (ConfigError, CheckpointError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {cli.error_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        cli.append_json(args.json, results)
    print(f"report: {cfg.out_dir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
