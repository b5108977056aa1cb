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

import asyncio
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline import artifacts, storage, storage_access
from pipeline.common import REPO_ROOT, StageError, atomic_output, project_root, resolve, say
from pipeline.config import Params
from pipeline.data import data_hashes, location_hashes
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


SUBMISSION_OUTPUTS_ENV = "VAE_SUBMISSION_OUTPUTS"  # where a job submitted through storage leaves its outputs


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


def job_address(params: Params) -> str:
    """Where jobs are submitted: ``cluster.job_address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``.

    Raises:
        SubmitError: none is set.
    """
    address = (params.cluster.job_address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or os.environ.get("RAY_ADDRESS"))
    if not address:
        raise SubmitError(
            "cluster.submit is true but no job address: set cluster.job_address "
            "(the dashboard URL, e.g. http://127.0.0.1:8265) or RAY_ADDRESS"
        )
    return address


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
# Layout under ``train.storage_path`` (``<storage>``):
# - ``data/<16 hex>/<dataset>/``: the workspace's preprocessed arrays, published as the preprocess stage
#   publishes them, under the hash of their manifest's array hashes (a job never reads a stale copy);
# - ``submissions/<stage>-<12 hex>.yaml``: the job's params - the stage's, with ``data.processed_dir`` on the
#   published copy - named by their content (the hash also tags the job, so the same job never runs twice);
# - ``submissions/<job id>/outputs/``: the stage's declared outputs, uploaded by the job when it succeeded.
# Jobs go through Ray's job SDK (``JobSubmissionClient``: the API behind ``ray job submit``, with the
# cluster's token when ``RAY_AUTH_MODE=token``).
ACTIVE = frozenset({"PENDING", "RUNNING"})
# Left out of the job's working copy (Ray's .gitignore handling aside): the job takes its inputs from the
# bucket, never from these, and a virtual environment or DVC cache would only make the upload slow or too big.
WORKSPACE_ONLY = ["/.venv", "/.git", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/reports", "/runs",
                  "/mlruns", "/mlartifacts", "/mlflow.db", "/tmp", "/.cache"]
FINISHED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def stage_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


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
    """Write the job's params to ``<storage>/submissions/<stage>-<hash>.yaml``; returns (that URI, the
    hash). With ``train.use_best_params``, the sweep result the workspace holds is first put where the job
    looks for it (:func:`share_sweep_result`)."""
    published = published_data(params)
    if published.train.use_best_params and module != "pipeline.tune":
        share_sweep_result(params, published)
    text = yaml.safe_dump(published.model_dump(mode="json"), sort_keys=True)
    key = hashlib.sha256(f"{module}\n{text}".encode()).hexdigest()[:12]
    name = f"{stage_name(module)}-{key}.yaml"
    location = storage.join(artifacts.storage_location(params), "submissions", name)
    storage.write_bytes(location, text.encode(), params.cluster.s3_endpoint_url)
    return location, key


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


def _how_to(job_id: str, address: str) -> str:
    return (f"follow it with `ray job logs -f {job_id} --address {address}`, see its state with `ray job "
            f"status {job_id} --address {address}`, stop it with `ray job stop {job_id} --address {address}`")


def refuse_if_running(client: Any, module: str, key: str, address: str) -> None:
    """Raises SubmitError when a job of the same stage and params is pending or running."""
    for job in client.list_jobs():
        metadata = job.metadata or {}
        if metadata.get("vae_submission") == key and str(job.status) in ACTIVE:
            raise SubmitError(
                f"the same {stage_name(module)} job is already {str(job.status).lower()} on {address}: "
                f"{job.submission_id}. Not submitting it twice: {_how_to(job.submission_id, address)}; run "
                "the stage again once it has ended"
            )


def follow(client: Any, job_id: str, address: str, poll_s: float = 1.0) -> Any:
    """Print the job's log as it comes until the job ends; returns its final JobInfo.

    Raises:
        SubmitError: the connection to the cluster broke, or this process was interrupted (the job goes on;
            the message says how to follow or stop it).
    """
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    kept = ("The workspace and dvc.lock are as they were; once it has succeeded, run the stage again (a "
            "finished train or tune job resumes at its end).")
    try:
        asyncio.run(tail())
        deadline = time.monotonic() + 60
        while (info := client.get_job_info(job_id)).status not in FINISHED and time.monotonic() < deadline:
            time.sleep(poll_s)
        if str(info.status) not in FINISHED:
            raise ConnectionError(f"its log ended but it is still {info.status}")
        return info
    except KeyboardInterrupt:
        raise SubmitError(f"interrupted; job {job_id} goes on on the cluster: {_how_to(job_id, address)}. "
                          + kept) from None
    except (ConnectionError, OSError, RuntimeError) as error:
        raise SubmitError(f"lost the connection to {address} while job {job_id} runs ({error}); the job goes "
                          f"on there: {_how_to(job_id, address)}. " + kept) from None


def bring_back(module: str, outputs: str, endpoint: str | None) -> list[str]:
    """Copy the job's declared outputs from ``outputs`` into the workspace: all are downloaded into a staging
    folder first, then each replaces its old version by rename, so a failed download changes nothing.

    Raises:
        SubmitError: a declared output is not there.
    """
    root = project_root()
    declared = STAGE_FILES[module][1]
    staging = Path(tempfile.mkdtemp(prefix=".submit-", dir=root))
    try:
        files = storage.download_tree(outputs, staging / "new", endpoint)
        missing = [item for item in declared if not (staging / "new" / item).exists()]
        if missing:
            raise SubmitError(f"the job succeeded but left no {', '.join(missing)} in {outputs}")
        for number, item in enumerate(declared):
            target, old = root / item, staging / f"old-{number}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.rename(old)
            (staging / "new" / item).rename(target)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def submit_through_storage(module: str, params: Params, address: str) -> int:
    """Submit ``python -m <module>`` with its inputs and outputs in ``train.storage_path``; returns 0 once the
    job succeeded and its outputs are in the workspace.

    Raises:
        SubmitError: the same job is running, the job failed or was stopped, or the connection was lost (each
            message says what to do).
    """
    from ray.job_submission import JobSubmissionClient

    endpoint = params.cluster.s3_endpoint_url
    params_uri, key = job_params(module, params)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(f"no Ray cluster answers at {address} ({error}): start it, or set "
                          "cluster.job_address / RAY_ADDRESS to its dashboard URL") from None
    refuse_if_running(client, module, key, address)
    job_id = f"vae-{stage_name(module)}-{key}-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = storage.join(artifacts.storage_location(params), "submissions", job_id, "outputs")
    env_vars = {"VAE_SUBMITTED": "1", SUBMISSION_OUTPUTS_ENV: outputs, "RAY_CHDIR_TO_TRIAL_DIR": "0",
                **lineage_env()}  # Ray's copy of the tree has no .git
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    client.submit_job(
        entrypoint=f"python -m {module} --params {params_uri}",
        submission_id=job_id,
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": WORKSPACE_ONLY, "env_vars": env_vars},
        metadata={"vae_stage": stage_name(module), "vae_submission": key},
    )
    say(f"[submit] job {job_id} on {address}: python -m {module} --params {params_uri}")
    info = follow(client, job_id, address)
    if str(info.status) != "SUCCEEDED":
        raise SubmitError(
            f"job {job_id} {str(info.status).lower()} on {address}: {info.message}. Its log: `ray job "
            f"logs {job_id} --address {address}`. The workspace and dvc.lock are as they were (`dvc "
            "checkout` puts back outputs DVC removed before the stage ran); fix the cause and run the stage "
            "again - a train or tune job resumes from its last checkpoint"
        )
    files = bring_back(module, outputs, endpoint)
    say(f"[submit] job {job_id} succeeded; {len(files)} output file(s) copied from {outputs} into "
        f"{project_root()}")
    return 0


def run_or_submit(
    module: str, params: Params, params_path: Path | None, run: Callable[[Params], None]
) -> int:
    """A stage's work: ``run(params)`` here, or - with ``cluster.submit``, on the DVC side - ``python -m
    <module>`` as a Ray job (:func:`submit_stage`). Inside a job submitted through object storage
    (``VAE_SUBMISSION_OUTPUTS`` set), the stage's declared outputs are then uploaded there for the submitting
    stage to copy back. Returns the exit status."""
    if should_submit(params):
        return submit_stage(module, params, params_path)
    run(params)
    outputs = os.environ.get(SUBMISSION_OUTPUTS_ENV)
    if outputs and os.environ.get("VAE_SUBMITTED"):
        declared = [Path(p) for p in STAGE_FILES[module][1]]
        sent = storage.upload_tree(project_root(), declared, outputs, params.cluster.s3_endpoint_url)
        print(f"[submit] {len(sent)} output file(s) uploaded to {outputs}", flush=True)
    return 0


def should_submit(params: Params) -> bool:
    """True for the DVC-side invocation of a stage with ``cluster.submit``, false inside the submitted job."""
    return params.cluster.submit and not os.environ.get("VAE_SUBMITTED")
