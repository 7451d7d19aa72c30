"""`windtunnel cluster ...`: start and stop the real clusters of this machine.

    windtunnel cluster slurm-up [--cpus N]   install (apt-get) and start a single-node Slurm
    windtunnel cluster slurm-down            stop it
    windtunnel cluster slurm-status          daemons + sinfo; exit 0 when the node takes jobs
    windtunnel cluster ray-up [--port P] [--num-cpus N] [--num-gpus N] [--temp-dir D]
    windtunnel cluster ray-down [--port P] [--all]

The work is done by windtunnel/clusters (slurm.sh, slurm.conf.template, and the Ray helpers).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ACTIONS = ("slurm-up", "slurm-down", "slurm-status", "ray-up", "ray-down")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "slurm-up     install slurmctld/slurmd/munge (apt-get, as root) and start a single-node Slurm\n"
        "             (partition `debug`); idempotent. Config: /etc/slurm/slurm.conf from\n"
        "             windtunnel/clusters/slurm.conf.template. Logs: /var/log/slurm/.\n"
        "slurm-down   stop slurmd, slurmctld and munged\n"
        "slurm-status print the daemons and `sinfo`; exit 0 when the node takes jobs\n"
        "ray-up       `ray start --head` on 127.0.0.1:PORT; prints the address for executor.address\n"
        "             and writes it to /tmp/windtunnel-ray-address; idempotent\n"
        "ray-down     stop the Ray cluster on PORT (only that one; --all runs `ray stop`)"
    )
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION", help=" | ".join(ACTIONS))
    parser.add_argument("--cpus", type=int, default=None,
                        help="slurm-up: CPUs the node advertises (default: the machine's)")
    parser.add_argument("--port", type=int, default=None,
                        help="ray-up/ray-down: the head's GCS port (default 6379; ray-down: the one in the address file)")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray-up: CPUs of the head node (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="ray-up: GPUs of the head node (default: detected)")
    parser.add_argument("--temp-dir", default=None,
                        help="ray-up: Ray's temp dir (default /tmp/ray, where address=auto looks)")
    parser.add_argument("--address-file", default=None,
                        help="ray-up/ray-down: where the address is written (default /tmp/windtunnel-ray-address)")
    parser.add_argument("--all", action="store_true",
                        help="ray-down: run `ray stop`, stopping every Ray process of this machine")


def _error(action: str, msg: str) -> int:
    print(f"windtunnel cluster {action}: error: {msg}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from windtunnel import clusters
    from windtunnel.errors import ConfigError

    for name in ("cpus", "port", "num_cpus", "num_gpus"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (name in ("cpus", "port") and v == 0)):
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive integer (got {v})")
    address_file = Path(args.address_file) if args.address_file else clusters.RAY_ADDRESS_FILE
    try:
        if args.action == "slurm-up":
            info = clusters.slurm_up(cpus=args.cpus)
            print(f"slurm: partition {info.partition}, node {info.node}, {info.cpus} CPUs; "
                  f"use executor=slurm executor.partition={info.partition}")
        elif args.action == "slurm-down":
            clusters.slurm_down()
        elif args.action == "slurm-status":
            return subprocess.run(["bash", str(clusters.SLURM_SH), "status"]).returncode
        elif args.action == "ray-up":
            address = clusters.ray_up(port=args.port or clusters.RAY_DEFAULT_PORT, num_cpus=args.num_cpus,
                                      num_gpus=args.num_gpus, temp_dir=args.temp_dir,
                                      address_file=address_file)
            print(address)
            print(f"ray-up: use executor=ray executor.address={address} (written to {address_file})",
                  file=sys.stderr)
        elif args.action == "ray-down":
            if args.all:
                from windtunnel.clusters import _ray_bin
                rc = subprocess.run([_ray_bin(), "stop"]).returncode
                address_file.unlink(missing_ok=True)
                return rc
            port = args.port
            if port is None and address_file.exists():
                port = int(address_file.read_text().strip().rsplit(":", 1)[1])
            clusters.ray_down(port=port or clusters.RAY_DEFAULT_PORT, address_file=address_file)
    except clusters.ClusterError as e:
        return _error(args.action, str(e))
    return 0
