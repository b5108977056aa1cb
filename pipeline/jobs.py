"""Helpers around ``ray job submit`` for the submitting side.

    ray job submit --working-dir . --runtime-env-json "$(python -m pipeline.jobs runtime-env)" \\
        -- python -m pipeline.train --params cluster.yaml
    python -m pipeline.jobs fetch --params cluster.yaml     # the run's models/vae/ and reports/ back here

``runtime-env``: a job runs in Ray's unpacked copy of the working tree, without ``.git``; this passes the
commit of the submitting checkout and whether its tracked files differed from it (``VAE_GIT_COMMIT``,
``VAE_GIT_DIRTY``), which the MLflow run records as ``git_commit`` / ``git_dirty`` /
``mlflow.source.git.commit``.

``fetch``: a submitted stage writes its outputs into that temporary copy and into storage, by the identity of
what made them: the sweep's (``<train.storage_path>/tune/<sweep>/outputs/``) and the run's
(``<train.storage_path>/<run name>/outputs/``, see :mod:`pipeline.artifacts`); this copies those of the given
params into the workspace (or ``--to``), after any stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import artifacts
from pipeline.cli import run_stage
from pipeline.params_file import load_params
from pipeline.tracking import lineage_env


def runtime_env(extra: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """The ``--runtime-env-json`` of a submission: ``{"env_vars": {VAE_GIT_COMMIT, VAE_GIT_DIRTY, ...}}``."""
    return {"env_vars": {**lineage_env(), **(extra or {})}}


def _fetch(params_path: Path | None, to: Path | None) -> None:
    sources, files = artifacts.fetch_stage_outputs(load_params(params_path), to)
    print(f"[jobs] copied {len(files)} file(s) from {' and '.join(sources)} into {to or 'the workspace'}:")
    for name in files:
        print(f"  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.jobs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("runtime-env", help="JSON for `ray job submit --runtime-env-json` (lineage)")
    env.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more env_vars")
    fetch = sub.add_parser("fetch", help="copy a run's outputs from its storage into the workspace")
    fetch.add_argument("--params", default=None, help="the params file (path or s3:// URI) the job ran with")
    fetch.add_argument("--to", type=Path, default=None, help="a folder instead of the workspace")
    args = parser.parse_args(argv)
    if args.command == "runtime-env":
        pairs = [item.split("=", 1) for item in args.env]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            parser.error(f"--env takes KEY=VALUE, got {args.env}")
        print(json.dumps(runtime_env(dict(pairs))))
        return 0
    return run_stage("fetch", lambda: _fetch(args.params, args.to))


if __name__ == "__main__":
    sys.exit(main())
