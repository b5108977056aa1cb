"""The command line of the local cluster (``infra/local-cluster.sh``, ``python infra/local_cluster.py``).

Exit statuses: 0 done (``status``: healthy), 1 ``status`` degraded, 2 a bad request or a failure (the
reason on stderr), 3 no cluster in the state folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infra.cluster import hosts as hostnet
from infra.cluster import processes
from infra.cluster.layout import ClusterError, ClusterSettings, parse_bytes
from infra.cluster.operator import LocalCluster
from infra.cluster.status import format_status

DESCRIPTION = (
    "A real multi-node Ray cluster on this one machine, plus an MLflow tracking server, for tests and "
    "demos; with --team the team deployment, with --hosts each node on a host of its own."
)


def _add_up(sub: Any) -> None:
    up = sub.add_parser("up", help="start head + workers + MLflow server")
    up.add_argument(
        "--workers", type=int, default=None, help="worker nodes besides the head (VAE_CLUSTER_WORKERS, 2)"
    )
    up.add_argument(
        "--head-cpus", type=float, default=None, help="logical CPUs of the head (1; 0 keeps tasks off it)"
    )
    up.add_argument("--worker-cpus", type=float, default=None, help="logical CPUs per worker (1)")
    up.add_argument("--worker-gpus", type=float, default=None, help="logical GPUs per worker (0)")
    up.add_argument("--head-memory", default=None, help="Ray memory resource of the head (2G)")
    up.add_argument("--worker-memory", default=None, help="Ray memory resource per worker (4G)")
    up.add_argument("--object-store-memory", default=None, help="object store per node (512M)")
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="gcs=base, dashboard=base+1, client=base+2, mlflow=base+3, agents=base+10+k (26300)",
    )
    up.add_argument(
        "--ray-temp-root", type=Path, default=None, help="Ray temp dirs (/tmp/vaeray-<base port>)"
    )
    up.add_argument("--no-mlflow", action="store_true", help="do not start the MLflow server")
    up.add_argument(
        "--hosts",
        action="store_true",
        help="root: each worker node and the MLflow server in its own network namespace with its "
        "own address on a private bridge, each node its own HOME/TMPDIR/cache (VAE_CLUSTER_HOSTS=1)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS for the MLflow server, with a CA made for this cluster that clients verify "
        "(env.sh sets MLFLOW_TRACKING_SERVER_CERT_PATH) (VAE_CLUSTER_TLS=1)",
    )
    up.add_argument(
        "--mlflow-jobs",
        action="store_true",
        help="start MLflow's GenAI job runner too (off: training does not use it)",
    )
    up.add_argument(
        "--team",
        action="store_true",
        help="the team deployment: an S3 endpoint for data, checkpoints and artifacts, PostgreSQL "
        "behind MLflow with basic-auth, node-local data caches and no shared folder (VAE_CLUSTER_TEAM=1)",
    )
    up.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Ray nodes, e.g. RAY_health_check_period_ms=1000 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (up, status, env, restart-node, mlflow, partition, heal, logs, down)."""
    parser = argparse.ArgumentParser(prog="local-cluster", description=DESCRIPTION)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where state, logs, MLflow data and shared storage live "
        "(VAE_CLUSTER_STATE_DIR; default <repo>/tmp/local-cluster, git-ignored)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    status = sub.add_parser(
        "status", help="nodes, addresses, MLflow health (exit 0 healthy, 1 degraded, 3 not up)"
    )
    status.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print the shell exports for this cluster")
    restart = sub.add_parser("restart-node", help="clean a node's leftovers and start it again")
    restart.add_argument("name", help="worker-K")
    mlflow = sub.add_parser("mlflow", help="stop, start or restart the MLflow server")
    mlflow.add_argument("action", choices=["stop", "start", "restart"])
    for verb, what in (
        ("partition", "cut a host's network link (--hosts)"),
        ("heal", "reconnect a host (then `restart-node` if Ray declared it dead)"),
    ):
        sub.add_parser(verb, help=what).add_argument("name", help="worker-K or mlflow")
    logs = sub.add_parser("logs", help="the last lines of a node's or service's logs")
    logs.add_argument("name", help="head, worker-K, mlflow, s3 or postgres")
    logs.add_argument("-n", "--lines", type=int, default=40)
    down = sub.add_parser("down", help="stop exactly what `up` started")
    down.add_argument("--keep-logs", action="store_true", help="keep Ray's temp dirs (logs)")
    down.add_argument(
        "--wipe", action="store_true", help="also delete the kept data (bucket, PostgreSQL, caches, MLflow)"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    """The settings the flags ask for (the rest from the environment's VAE_CLUSTER_* or the defaults).

    Raises:
        ValueError: a malformed size or --ray-env value.
    """
    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    mapping = {
        "workers": "num_workers",
        "head_cpus": "head_cpus",
        "worker_cpus": "worker_cpus",
        "worker_gpus": "worker_gpus",
        "base_port": "base_port",
        "ray_temp_root": "ray_temp_root",
    }
    for arg, field in mapping.items():
        if getattr(args, arg, None) is not None:
            overrides[field] = getattr(args, arg)
    for arg in ("head_memory", "worker_memory", "object_store_memory"):
        if getattr(args, arg, None) is not None:
            overrides[arg] = parse_bytes(getattr(args, arg))
    if getattr(args, "no_mlflow", False):
        overrides["mlflow"] = False
    for flag in ("team", "hosts", "mlflow_jobs", "tls"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if getattr(args, "ray_env", None):
        pairs = [item.split("=", 1) for item in args.ray_env]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise ValueError(f"--ray-env takes KEY=VALUE, got {args.ray_env}")
        overrides["ray_env"] = dict(pairs)
    return ClusterSettings(**overrides)


def _run(cluster: LocalCluster, args: argparse.Namespace) -> int:
    if args.command in ("partition", "heal"):
        getattr(cluster, args.command)(args.name)
        print(f"{args.name}: link {'cut' if args.command == 'partition' else 'up again'}")
    elif args.command == "restart-node":
        stopped = cluster.restart_node(args.name)
        print(f"{args.name}: stopped {len(stopped)} leftover process(es), started again, alive")
    elif args.command == "mlflow":
        {"stop": cluster.stop_mlflow, "start": cluster.start_mlflow, "restart": cluster.restart_mlflow}[
            args.action
        ]()
        where = "stopped" if args.action == "stop" else f"answers on {cluster.mlflow_url}"
        print(f"MLflow {args.action}: {where}")
    elif args.command == "logs":
        for path in cluster.log_files(args.name):
            print(f"==> {path} <==\n{processes.tail(path, args.lines)}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        cluster = LocalCluster(settings_from_args(args), verbose=True)
        if args.command == "up":
            print(format_status(cluster.up()))
            return 0
        if args.command == "down":
            print(cluster.down(keep_logs=args.keep_logs, wipe=args.wipe)["note"])
            return 0
        if (
            args.command in ("restart-node", "mlflow", "logs", "partition", "heal", "env")
            and not cluster.state
        ):
            if args.command == "env":
                print(f"# no local cluster in {cluster.state_dir}", file=sys.stderr)
            else:
                print(
                    f"local-cluster: no cluster in {cluster.state_dir}; start one with `up`", file=sys.stderr
                )
            return 3
        if args.command == "env":
            sys.stdout.write(cluster.env_script())
            return 0
        if args.command != "status":
            return _run(cluster, args)
        status = cluster.status()
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 3 if not cluster.state else (0 if status["healthy"] else 1)
    except (ClusterError, hostnet.NetworkError, ValueError) as exc:
        print(f"local-cluster: {exc}", file=sys.stderr)
        return 2
