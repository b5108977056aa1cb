"""``cluster.submit: true``: a DVC stage hands its work to a running Ray cluster as a Ray job and still
produces its outputs in the workspace, so DVC hashes, caches, locks and pushes them as if made here.

Two ways for the files to travel:

- **Through object storage** (the team deployment: ``train.storage_path`` on ``s3://...``, no
  ``cluster.shared_dir``). The stage publishes the workspace's preprocessed arrays under
  ``<storage>/data/<their hash>/`` (skipped when already there, so a job never reads a stale copy), writes the
  job's params (the same, with ``data.processed_dir`` pointing there) to ``<storage>/submissions/``, submits
  ``python -m pipeline.<stage> --params <that file>`` with the repository as the job's ``working_dir`` and
  the submitting commit in its environment, follows its log, and once it succeeded copies the outputs the job
  left in ``<storage>/submissions/<job id>/outputs/`` into the workspace (all downloaded before any is
  replaced). What one stage hands the next travels by identity, never through the job's working copy: the
  sweep's best values from the sweep's storage folder, the model from the run's (:mod:`pipeline.artifacts`).
  A stage whose same job is still running refuses to submit it again; a failed, stopped or lost job leaves the
  workspace as it was and says what to do (its id, how to follow or stop it).
- **Through a shared folder** (``cluster.shared_dir``: an NFS mount, or the local multi-node cluster's shared
  folder). The stage copies its inputs into ``<shared_dir>/workspace`` (only files that changed), submits with
  ``VAE_PROJECT_ROOT=<shared_dir>/workspace`` so the job reads and writes there, and on success copies the
  outputs back.

The job's exit status is the stage's.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline import artifacts, storage, storage_access
from pipeline.common import REPO_ROOT, atomic_output, project_root, resolve, say
from pipeline.config import Params
from pipeline.data import data_hashes, location_hashes
from pipeline.job_submission import (
    STAGE_FILES,
    SubmitError,
    job_address,
    run_here,
    should_submit,
    submit_job,
    write_job_params,
)
from pipeline.tracking import lineage_env


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
    """Run ``python -m <module>`` as a Ray job and bring its outputs back into the workspace: through object
    storage when ``train.storage_path`` is a URI and there is no ``cluster.shared_dir``
    (:func:`submit_through_storage`), else through the shared folder.

    Raises:
        SubmitError: neither a shared folder nor object storage, no job address, or a failed job.
    """
    if params.cluster.shared_dir is None:
        if not storage_access.is_uri(params.train.storage_path):
            raise SubmitError(
                "cluster.submit is true but the jobs have no way to get their inputs or return their "
                "outputs: set train.storage_path to a bucket (s3://bucket/prefix; on the team deployment "
                "$VAE_BUCKET/runs) or cluster.shared_dir to a folder that every node and this machine see"
            )
        return submit_through_storage(module, params, job_address(params))
    return submit_through_shared_folder(module, params, params_path, job_address(params))


def submit_through_shared_folder(
    module: str, params: Params, params_path: Path | None, address: str
) -> int:
    """``cluster.shared_dir``: inputs copied there, the job runs with its project root there, outputs copied
    back.

    Raises:
        SubmitError: a failed job.
    """
    cluster = params.cluster
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
        address,
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
            f"the Ray job `python -m {module}` failed on {address} (exit {returncode}); "
            f"see `ray job logs` there. Re-running the stage resumes from the last checkpoint."
        )
    copied = sum(sync(remote_root / item, local_root / item) for item in outputs)
    print(f"[submit] job succeeded; {copied} output file(s) copied into {local_root}", flush=True)
    return 0


# ------------------------------------------------------------------------------------ through object storage
# The layout under ``train.storage_path`` and the job machinery: pipeline.job_submission. Here: what only the
# model stages do before their job is submitted (their data published by hash, the sweep's result shared).


def published_data(params: Params) -> Params:
    """``params`` with ``data.processed_dir`` on a copy of the workspace's preprocessed dataset in
    ``<storage>/data/<hash>/``, published first unless that copy already holds the same arrays. Params whose
    data are already on a store are returned unchanged.

    Raises:
        SubmitError: the workspace has no preprocessed dataset (no manifest.json).
    """
    location = params.data.processed_location()
    if storage_access.is_uri(location):
        return params
    folder = Path(location)
    hashes = data_hashes(folder)
    if not hashes:
        raise SubmitError(
            f"no preprocessed data in {folder} (no manifest.json with array hashes): run the preprocess "
            "stage first (`dvc repro preprocess`)"
        )
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    root = storage.join(artifacts.storage_location(params), "data", digest)
    target = storage.join(root, params.data.dataset)
    endpoint = params.cluster.s3_endpoint_url
    if location_hashes(target, endpoint) != hashes:
        storage.publish_dataset(folder, target, endpoint)
        say(f"[submit] published {folder} to {target}")
    return params.model_copy(update={"data": params.data.model_copy(update={"processed_dir": root})})


def job_params(module: str, params: Params) -> tuple[str, str]:
    """Write the job's params (the workspace's data published, :func:`published_data`) to
    ``<storage>/submissions/<stage>-<hash>.yaml``; returns (that URI, the hash). With
    ``train.use_best_params``, the sweep result the workspace holds is first put where the job looks for it
    (:func:`share_sweep_result`)."""
    published = published_data(params)
    if published.train.use_best_params and module != "pipeline.tune":
        share_sweep_result(params, published)
    return write_job_params(module, published)


def share_sweep_result(params: Params, job_params: Params) -> None:
    """Copy the workspace's reports/tune/ into the storage folder of the sweep the job's params name, unless
    that folder has a result already. A job reads the sweep's best values by the sweep's identity; when the
    sweep ran elsewhere (here, or with another ``train.storage_path``, which is not part of its identity) the
    workspace's copy is the result - if it names that sweep.

    Raises:
        SubmitError: the workspace's result is another sweep's (stale: run the tune stage).
    """
    endpoint = job_params.cluster.s3_endpoint_url
    stored = storage.join(artifacts.sweep_location(job_params), artifacts.OUTPUTS)
    try:
        storage.read_bytes(storage.join(stored, artifacts.BEST_PARAMS_PATH.as_posix()), endpoint)
        return
    except FileNotFoundError:
        pass
    local = project_root() / artifacts.BEST_PARAMS_PATH
    if not local.is_file():
        return  # the job says that no sweep result exists, and what to run
    made_by = (yaml.safe_load(local.read_text()) or {}).get("sweep")
    wanted = {stored.rstrip("/").split("/")[-2], artifacts.sweep_location(params).rstrip("/").split("/")[-1]}
    if made_by not in wanted:
        raise SubmitError(
            f"{local} holds the result of sweep {made_by}, not of the sweep these params run "
            f"({' or '.join(sorted(wanted))}): run the tune stage first (`dvc repro tune`)"
        )
    present = [path for path in (artifacts.BEST_PARAMS_PATH, artifacts.TRIALS_PATH)
               if (project_root() / path).is_file()]
    storage.upload_tree(project_root(), present, stored, endpoint)
    say(f"[submit] the result of sweep {made_by} copied from {local.parent} to {stored}")










def submit_through_storage(module: str, params: Params, address: str) -> int:
    """Submit ``python -m <module>`` with its inputs and outputs in ``train.storage_path``; returns 0 once the
    job succeeded and its outputs are in the workspace (:func:`pipeline.job_submission.submit_job`).

    Raises:
        SubmitError: the same job is running, the job failed or was stopped, or the connection was lost (each
            message says what to do).
    """
    params_uri, key = job_params(module, params)
    return submit_job(module, params, params_uri, key, address)


def run_or_submit(
    module: str, params: Params, params_path: Path | None, run: Callable[[Params], None]
) -> int:
    """A model stage's work: ``run(params)`` here (:func:`pipeline.job_submission.run_here`), or - with
    ``cluster.submit``, on the DVC side - ``python -m <module>`` as a Ray job (:func:`submit_stage`). Returns
    the exit status."""
    if should_submit(params):
        return submit_stage(module, params, params_path)
    return run_here(module, params, run)
