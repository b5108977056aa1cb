"""Certificates for an MLflow server outside the local cluster (``infra/ray-up/aws-team.yaml``'s head):

    python -m infra.mlflow_tls new-ca > ca.json            # once: the team CA, kept in a secret store
    ... | python -m infra.mlflow_tls issue --address IP --out DIR   # at start: CA JSON on stdin

``issue`` writes ``ca.pem`` (what clients verify with), ``mlflow.pem`` and ``mlflow-key.pem`` (0600) for the
server's ``--ssl-certfile``/``--ssl-keyfile``; the CA's key is read from stdin and used in memory only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra.cluster.tls import issue_from_ca, new_ca_json


def main(argv: list[str] | None = None) -> int:
    """The command line (argparse); returns the exit status (2 with the reason for a bad CA or address)."""
    parser = argparse.ArgumentParser(prog="python -m infra.mlflow_tls", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("new-ca", help="print a new CA as JSON {cert, key}")
    made.add_argument("--name", default="vae team CA", help="the CA's common name")
    issue = commands.add_parser("issue", help="CA JSON on stdin -> ca.pem, mlflow.pem, mlflow-key.pem")
    issue.add_argument("--address", action="append", required=True, help="an IP address of the server")
    issue.add_argument("--out", type=Path, required=True, help="the folder for the three files")
    args = parser.parse_args(argv)
    if args.command == "new-ca":
        print(new_ca_json(args.name))
        return 0
    try:
        paths = issue_from_ca(sys.stdin.read(), args.address, args.out)
    except ValueError as error:
        parser.error(str(error))
    print(" ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
