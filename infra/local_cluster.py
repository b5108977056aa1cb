"""A real multi-node Ray cluster on this one machine, plus an MLflow tracking server, for tests and demos;
with ``--team`` the team deployment: an S3 endpoint, PostgreSQL behind MLflow with basic-auth, node-local
data caches and no shared folder; with ``--hosts`` (root) each worker node and the MLflow server on a host of
its own: a network namespace with its own address. The code is the package :mod:`infra.cluster` (its
``__init__`` maps the modules); this file is the command line's entry point.

    python infra/local_cluster.py up [--team] [--hosts] [--workers N --head-cpus C ... --state-dir DIR]
    python infra/local_cluster.py status [--json]
    python infra/local_cluster.py env          # the shell exports; `eval "$(infra/local-cluster.sh env)"`
    python infra/local_cluster.py restart-node worker-K | mlflow stop|start|restart | logs NAME [-n N]
    python infra/local_cluster.py partition NAME | heal NAME     # --hosts: cut / reconnect a host's link
    python infra/local_cluster.py down [--keep-logs] [--wipe]

What it starts, how token authentication is set and how `down` finds exactly its own processes:
infra/README.md, section 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run by path: the repository root makes `infra.cluster` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from infra.cluster.cli import main

    sys.exit(main())
