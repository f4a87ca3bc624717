"""MedSafetyWorld: generate a world, or run the whole SRP-vs-baselines experiment.

    python tools/medsafetyworld.py run --config examples/medsafetyworld/cpu_demo.yaml [key=value ...]
    python tools/medsafetyworld.py generate --seed 0 --out world/     # world, corpus, queries
    python tools/medsafetyworld.py rejudge --config FILE [key=value ...]  # stored answers whose
                                                                        # verdict has changed

A rerun of `run` resumes: finished steps (world, data, each model's training and evaluation)
are reused (docs/medsafetyworld.md).
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole experiment")
    run.add_argument("--config", required=True)
    run.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[1,2,3]")
    run.add_argument("--no-progress", action="store_true")
    again = sub.add_parser("rejudge", help="list stored answers the current judge scores "
                                           "differently (after a change of the judge)")
    again.add_argument("--config", required=True)
    again.add_argument("overrides", nargs="*")
    gen = sub.add_parser("generate", help="a world, its corpus and queries")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="directory to write into")
    gen.add_argument("--patients", type=int, default=80)
    gen.add_argument("--conditions", type=int, default=10)
    gen.add_argument("--templates", default="", help="a template file (default: the shipped one)")
    args = parser.parse_args(argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from pathlib import Path

    from megatron_srp.config import ConfigError
    from megatron_srp.medsafetyworld.experiment import (MedSafetyConfig, WorldSize,
                                                        load_experiment_config, make_world,
                                                        run_experiment)
    from megatron_srp.medsafetyworld.report import markdown

    try:
        if args.command == "generate":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            cfg = MedSafetyConfig(out_dir=str(out), world_seed=args.seed,
                                  templates=args.templates, world=WorldSize(
                                      n_conditions=args.conditions, n_patients=args.patients))
            facts = make_world(cfg, out)
            print(f"{facts} -> {out}/world.json, corpus.jsonl, queries.jsonl")
            return 0
        cfg = load_experiment_config(args.config, args.overrides)
        if args.command == "rejudge":
            return _rejudge(Path(cfg.out_dir))
        results = run_experiment(cfg, progress=not args.no_progress)
        out = Path(cfg.out_dir)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results, out))
    print(f"report: {cfg.out_dir}/report.md")
    return 0


def _rejudge(out) -> int:
    from megatron_srp.medsafetyworld.eval import rejudge
    from megatron_srp.medsafetyworld.world import World

    changed = rejudge(World.load(out / "world.json"), out)
    for c in changed:
        print(f"{c['model']} {c['method']}/{c['attack']} {c['query']}: unsafe "
              f"{c['unsafe'][0]} -> {c['unsafe'][1]}, correct {c['correct'][0]} -> "
              f"{c['correct'][1]}: {c['answer']!r}")
    print(f"{len(changed)} stored answer(s) judged differently by the current judge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
