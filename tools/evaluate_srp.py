"""Evaluate checkpoints: reflection accuracy (own reflections, few-shot, probe) and linear
probes, written as JSON, a Markdown report and plots. Reruns resume from finished units.

    python tools/evaluate_srp.py --config examples/eval/reflection.yaml
    python tools/evaluate_srp.py --config FILE out_dir=runs/eval2 data.max_segments=200

See docs/evaluation.md for the config keys and the outputs. --json FILE appends results.json's
content as one JSON line to FILE.
"""
import argparse
import sys
import warnings

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, options=False, config_required=True,
                        config_help="evaluation YAML",
                        overrides_help="set a config key, e.g. data.max_segments=200",
                        json_help="append the results (results.json's content) as one JSON "
                                  "line to FILE")
    args = cli.parse_args(parser, argv)
    warnings.filterwarnings("ignore")
    from megatron_srp.config import ConfigError
    from megatron_srp.evaluation.reflection_accuracy import LabelError
    from megatron_srp.evaluation.suite import load_eval_config, run_evaluation
    from megatron_srp.inference.sample import shutdown
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        cfg = load_eval_config(args.config, args.overrides)
        data = run_evaluation(cfg, progress=cli.progress_wanted(args))
    except (ConfigError, LabelError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {cli.error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if args.json:
        cli.append_json(args.json, data)
    print(f"wrote {cfg.out_dir}/results.json, report.md"
          + "".join(f", {f}" for f in data["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
