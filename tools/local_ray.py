"""A throwaway Ray cluster on this machine: a head and a worker node in two network namespaces
(megatron_srp/deploy/local_ray.py), kept up until Ctrl-C or SIGTERM. Needs root.

    python tools/local_ray.py --nodes 2 --root /tmp/raycluster &
    $(jq -r '.driver | @sh' /tmp/raycluster/cluster.json) python tools/preprocess_srp.py \\
        --backend ray --ray-address "$(jq -r .address /tmp/raycluster/cluster.json)" ...

cluster.json holds the head's address and the command prefix that runs a driver on the head.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_srp import cli


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True,
                        help="directory for the cluster's files; cluster.json is written there")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=2,
                        help="1: a head alone; 2: a head and a worker (default: 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1,
                        help="Ray CPUs each node offers (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="GPUs each node declares to Ray, present or not (default: 0)")
    cli.add_common_args(parser, example="nodes")
    args = cli.parse_args(parser, argv)
    from megatron_srp.deploy.local_ray import LocalRay, hold

    root = Path(args.root)
    hold(LocalRay(root, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                  gpus_per_node=args.gpus_per_node, python=sys.executable),
         root / "cluster.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
