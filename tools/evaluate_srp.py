"""Evaluate checkpoints: reflection accuracy (own reflections, few-shot, probe) and linear
probes, written as JSON, a Markdown report and plots. Reruns resume from finished units.

    python tools/evaluate_srp.py --config examples/eval/reflection.yaml
    python tools/evaluate_srp.py --config FILE out_dir=runs/eval2 data.max_segments=200

See docs/evaluation.md for the config keys and the outputs.
"""
import argparse
import sys
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="evaluation YAML")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. data.max_segments=200")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_srp.config import ConfigError
    from megatron_srp.evaluation.reflection_accuracy import LabelError
    from megatron_srp.evaluation.suite import load_eval_config, run_evaluation
    from megatron_srp.inference.sample import shutdown
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        cfg = load_eval_config(args.config, args.overrides)
        data = run_evaluation(cfg, progress=not args.no_progress)
    except (ConfigError, LabelError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"wrote {cfg.out_dir}/results.json, report.md"
          + "".join(f", {f}" for f in data["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
