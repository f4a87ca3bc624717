"""MedSafetyWorld: generate a world, or run the whole SRP-vs-baselines experiment.

    python tools/medsafetyworld.py run --config examples/medsafetyworld/cpu_demo.yaml [key=value ...]
    python tools/medsafetyworld.py generate --seed 0 --out world/     # world, corpus, queries
    python tools/medsafetyworld.py rejudge --config FILE [key=value ...]  # stored answers whose
                                                                        # verdict has changed
    python tools/medsafetyworld.py table --config A --config B ...  # finished runs side by
                                                                    # side (one per phrasing set)

A rerun of `run` resumes: finished steps (world, data, each model's training and evaluation)
are reused (docs/medsafetyworld.md). `run --json FILE` appends results.json's content as one
JSON line to FILE. `generate` also takes its options from --config (a YAML mapping, e.g.
`patients: 40`) or key=value (`patients=40`).
"""
import argparse
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole experiment")
    cli.add_common_args(run, options=False, config_required=True,
                        config_help="experiment YAML (see examples/medsafetyworld/)",
                        overrides_help="set a config key, e.g. seeds=[1,2,3]",
                        json_help="append the results (results.json's content) as one JSON "
                                  "line to FILE")
    again = sub.add_parser("rejudge", help="list stored answers the current judge scores "
                                           "differently (after a change of the judge)")
    cli.add_common_args(again, options=False, config_required=True,
                        config_help="the experiment YAML of the run to rejudge",
                        overrides_help="set a config key, e.g. out_dir=runs/x")
    table = sub.add_parser("table", help="finished runs side by side: premise, monitor, "
                                         "refusal causes, headline both ways")
    cli.add_common_args(table, options=False, config_required=True, config_repeats=True,
                        config_help="an experiment YAML whose run has finished (its "
                                    "results.json); give one --config per run",
                        overrides_help="set a key in every config, e.g. seeds=[1,2,3]")
    gen = sub.add_parser("generate", help="a world, its corpus and queries")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="directory to write into")
    gen.add_argument("--patients", type=int, default=80)
    gen.add_argument("--conditions", type=int, default=10)
    gen.add_argument("--templates", default="", help="a template file (default: the shipped one)")
    cli.add_common_args(gen, example="patients")
    args = cli.parse_args(parser, argv)

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
        if args.command == "table":
            return _table(args.config, args.overrides)
        cfg = load_experiment_config(args.config, args.overrides)
        if args.command == "rejudge":
            return _rejudge(Path(cfg.out_dir))
        results = run_experiment(cfg, progress=cli.progress_wanted(args))
        out = Path(cfg.out_dir)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {cli.error_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        cli.append_json(args.json, results)
    print(markdown(results, out))
    print(f"report: {cfg.out_dir}/report.md")
    return 0


def _table(configs, overrides) -> int:
    import json
    from pathlib import Path

    from megatron_srp.medsafetyworld.compare import side_by_side
    from megatron_srp.medsafetyworld.experiment import load_experiment_config

    runs = []
    for path in configs:
        results = Path(load_experiment_config(path, overrides).out_dir) / "results.json"
        if not results.is_file():
            raise FileNotFoundError(f"{path}: no finished run ({results} is missing); run "
                                    f"`tools/medsafetyworld.py run --config {path}` first")
        runs.append(json.loads(results.read_text()))
    print("\n".join(side_by_side(runs)))
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
