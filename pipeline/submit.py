"""``cluster.submit: true``: a DVC stage hands its work to a running Ray cluster with ``ray job submit`` and
still produces its outputs in the workspace.

How the files travel: ``cluster.shared_dir`` is a folder every node and this machine see (an NFS mount, or on
the local multi-node cluster of infra/local-cluster.sh its shared folder). The stage copies its inputs from
the workspace into ``<shared_dir>/workspace`` (only files that changed), submits

    ray job submit --address <cluster.job_address> --working-dir <repo> -- python -m pipeline.<stage> --params
    <shared copy>

with ``VAE_PROJECT_ROOT=<shared_dir>/workspace`` so the job reads and writes there (relative paths such as
``runs/`` for checkpoints then live on shared storage, as Ray Train needs on a multi-node cluster), and on
success copies the outputs back. The job's exit status is the stage's.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.common import REPO_ROOT, StageError, atomic_output, project_root, resolve
from pipeline.config import Params
from pipeline.tracking import lineage_env

# What each stage reads and writes, relative to the project root (the processed data are added per dataset).
STAGE_FILES: dict[str, tuple[list[str], list[str]]] = {
    "pipeline.train": (
        ["reports/tune/best_params.yaml"],
        ["models/vae", "reports/train_metrics.json", "reports/train_curves.csv"],
    ),
    "pipeline.tune": ([], ["reports/tune"]),
    "pipeline.evaluate": (["models/vae"], ["reports/metrics.json", "reports/eval"]),
}


class SubmitError(StageError):
    """The job could not be submitted, or it failed on the cluster."""


def sync(source: Path, destination: Path) -> int:
    """Copy a file or folder tree, skipping files whose size and content already match; returns files copied.
    Each file is written to a temporary name and renamed, so a reader never sees a half-copied file."""
    if not source.exists():
        return 0
    if source.is_file():
        if destination.is_file() and filecmp.cmp(source, destination, shallow=True):
            return 0
        with atomic_output(destination) as tmp:
            shutil.copy2(source, tmp)
        return 1
    return sum(sync(child, destination / child.name) for child in source.iterdir())


def submit_stage(module: str, params: Params, params_path: Path | None) -> int:
    """Run ``python -m <module>`` as a Ray job on ``cluster.job_address`` and bring its outputs back.

    Raises:
        SubmitError: no shared_dir / job address, or a failed job.
    """
    cluster = params.cluster
    if cluster.shared_dir is None:
        raise SubmitError(
            "cluster.submit is true but cluster.shared_dir is not set: give a folder that every "
            "node and this machine see (e.g. the shared folder printed by infra/local-cluster.sh up)"
        )
    job_address = (
        cluster.job_address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    )
    if not job_address:
        raise SubmitError(
            "cluster.submit is true but no job address: set cluster.job_address "
            "(the dashboard URL, e.g. http://127.0.0.1:8265) or RAY_ADDRESS"
        )
    remote_root = resolve(cluster.shared_dir) / "workspace"
    inputs, outputs = STAGE_FILES[module]
    local_root = project_root()
    processed = Path(params.data.processed_dir)
    if not processed.is_absolute():  # relative data travel with the job; absolute ones must already be shared
        inputs = [*inputs, str(processed / params.data.dataset)]
    copied = sum(sync(local_root / item, remote_root / item) for item in inputs)
    # The job reads the params from the shared folder, so any params file works, not only the repo's.
    remote_params = remote_root / f"params.{module.rsplit('.', 1)[-1]}.yaml"
    sync(Path(params_path or REPO_ROOT / "params.yaml").resolve(), remote_params)
    print(f"[submit] {copied} input file(s) synced to {remote_root}", flush=True)

    env_vars = {"VAE_PROJECT_ROOT": str(remote_root), "VAE_SUBMITTED": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0",
                **lineage_env()}  # the job's copy of the tree has no .git
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli if ray_cli.exists() else "ray"),
        "job",
        "submit",
        "--address",
        job_address,
        "--working-dir",
        str(REPO_ROOT),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        "python",
        "-m",
        module,
        "--params",
        str(remote_params),
    ]
    print(f"[submit] {' '.join(command[:6])} ... -- python -m {module}", flush=True)
    returncode = subprocess.run(command, check=False).returncode
    if returncode != 0:
        raise SubmitError(
            f"the Ray job `python -m {module}` failed on {job_address} (exit {returncode}); "
            f"see `ray job logs` there. Re-running the stage resumes from the last checkpoint."
        )
    copied = sum(sync(remote_root / item, local_root / item) for item in outputs)
    print(f"[submit] job succeeded; {copied} output file(s) copied into {local_root}", flush=True)
    return 0


def run_or_submit(
    module: str, params: Params, params_path: Path | None, run: Callable[[Params], None]
) -> int:
    """A stage's work: ``run(params)`` here, or - with ``cluster.submit``, on the DVC side - ``python -m
    <module>`` as a Ray job (:func:`submit_stage`). Returns the exit status."""
    if should_submit(params):
        return submit_stage(module, params, params_path)
    run(params)
    return 0


def should_submit(params: Params) -> bool:
    """True for the DVC-side invocation of a stage with ``cluster.submit``, false inside the submitted job."""
    return params.cluster.submit and not os.environ.get("VAE_SUBMITTED")
