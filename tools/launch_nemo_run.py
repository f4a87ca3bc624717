"""Launch pretraining through NeMo-Run (pip install nemo_run), on this machine or on Slurm.

    python tools/launch_nemo_run.py local --nproc-per-node 8 --config FILE [key=value ...]
    python tools/launch_nemo_run.py slurm --account ACCT --partition PART --nodes 8 \\
        --container-image IMAGE --job-dir /shared/srp-jobs --config FILE [key=value ...]
    python tools/launch_nemo_run.py slurm --account ACCT --nodes 2 --gpus-per-node 0 \\
        --ranks-per-node 2 --no-container --venv /shared/venv --code-dir /shared/megatron-srp \\
        --job-dir /shared/srp-jobs --detach --config FILE [key=value ...]

A Slurm job that is stopped gracefully (preemption, its time limit, scancel --signal=TERM)
saves a checkpoint and requeues itself, then resumes (--no-requeue: it ends instead).

--dryrun prints the torchrun command (local) or the sbatch script (slurm) without running it.
See docs/deployment.md.
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.config import ConfigError
from megatron_srp.deploy.nemo_run import LocalTarget, SlurmTarget, launch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True)
    local = sub.add_parser("local", help="torchrun on this machine")
    local.add_argument("--nproc-per-node", type=int, default=1)
    slurm = sub.add_parser("slurm", help="an sbatch job, one torchrun per node")
    slurm.add_argument("--account", required=True)
    slurm.add_argument("--partition")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU nodes")
    slurm.add_argument("--ranks-per-node", type=int,
                       help="torchrun's ranks per node (default: --gpus-per-node)")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--container-image", help="pyxis/enroot image (omit: --no-container)")
    slurm.add_argument("--no-container", action="store_true",
                       help="run in the nodes' own environment (torchrun on PATH)")
    slurm.add_argument("--venv", help="with --no-container: this virtual environment's torchrun")
    slurm.add_argument("--container-mount", action="append", default=[], metavar="SRC:DST")
    slurm.add_argument("--job-dir", required=True, help="NeMo-Run's job files, on the cluster")
    slurm.add_argument("--code-dir", help="a checkout on the cluster to run (default: ship this "
                       "checkout's committed HEAD)")
    slurm.add_argument("--ssh-host", help="submit over SSH (default: sbatch here)")
    slurm.add_argument("--ssh-user")
    slurm.add_argument("--no-requeue", action="store_true",
                       help="after a graceful stop, end the job (exit 75) instead of requeueing")
    slurm.add_argument("--max-requeues", type=int, default=20)
    slurm.add_argument("--detach", action="store_true", help="return once the job is queued")
    for p in (local, slurm):
        p.add_argument("--name", default="srp-pretrain", help="NeMo-Run experiment name")
        p.add_argument("--dryrun", action="store_true", help="print what would run, run nothing")
        cli.add_common_args(p, options=False, config_help="YAML file (see examples/, "
                            "examples/scale/)",
                            overrides_help="set a config key, e.g. train.train_iters=200")
    return parser


@cli.tool_main
def main(argv=None) -> int:
    parser = _parser()
    args = cli.parse_args(parser, argv)
    # The job decides on its progress bar itself (none without a terminal); --no-progress here
    # switches it off in the job too.
    overrides = [*args.overrides, *(["logging.progress_bar=false"] if args.no_progress else [])]
    if args.target == "local":
        target = LocalTarget(args.nproc_per_node)
    else:
        if bool(args.container_image) == args.no_container:
            parser.error("give exactly one of --container-image and --no-container")
        try:
            target = SlurmTarget(
                account=args.account, partition=args.partition, nodes=args.nodes,
                gpus_per_node=args.gpus_per_node, ranks_per_node=args.ranks_per_node,
                time=args.time, job_dir=args.job_dir, container_image=args.container_image,
                container_mounts=tuple(args.container_mount), venv=args.venv,
                code_dir=args.code_dir, ssh_host=args.ssh_host, ssh_user=args.ssh_user,
                requeue=not args.no_requeue, max_requeues=args.max_requeues)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        done = launch(target, args.config, overrides, name=args.name, dryrun=args.dryrun,
                      detach=getattr(args, "detach", False), quiet=args.dryrun)
    except (ConfigError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dryrun:
        print(done.rendered)
        return 0
    print(f"{done.handle}: {done.state}")
    return 1 if done.state in ("FAILED", "CANCELLED", "UNKNOWN") else 0


if __name__ == "__main__":
    sys.exit(main())
