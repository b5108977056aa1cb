"""Ray jobs through object storage, the part every submitted stage shares: where a job's inputs and outputs
travel (``train.storage_path`` on a store, no shared folder), submitting ``python -m <stage>`` with Ray's job
SDK, following it, refusing to submit the same job twice, copying its outputs back into the workspace all or
nothing, and - inside the job - fetching its inputs and uploading its outputs. The data stages (download,
preprocess) submit through this module alone, so they depend on no model code; the model stages' extra steps
(their data published by hash, the sweep's result shared) live in :mod:`pipeline.submit`.

Layout under ``train.storage_path`` (``<storage>``):

- ``data/raw/<16 hex>/files/``: the raw files a submitted preprocess reads, under the hash of their sha256s,
  ``complete.json`` (the list, written last) beside them;
- ``data/<16 hex>/<dataset>/``: the workspace's preprocessed arrays (:func:`pipeline.submit.published_data`);
- ``submissions/<stage>-<12 hex>.yaml``: the job's params, named by their content (the hash also tags the job,
  so the same job never runs twice at once);
- ``submissions/<job id>/outputs/``: the stage's declared outputs, uploaded by the job when it succeeded.

Jobs go through ``JobSubmissionClient`` (the API behind ``ray job submit``, with the cluster's token when
``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage, storage_access
from pipeline.common import REPO_ROOT, StageError, project_root, say
from pipeline.config import Params
from pipeline.tracking import lineage_env

# What each model stage reads and writes, relative to the project root (the data stages': stage_files).
STAGE_FILES: dict[str, tuple[list[str], list[str]]] = {
    "pipeline.train": (
        ["reports/tune/best_params.yaml"],
        ["models/vae", "reports/train_metrics.json", "reports/train_curves.csv"],
    ),
    "pipeline.tune": ([], ["reports/tune"]),
    "pipeline.evaluate": (["models/vae"], ["reports/metrics.json", "reports/eval"]),
}
# The data stages submit only through object storage (through a shared folder they run here: the folder would
# only carry the same files twice). Their files follow the params (the dataset's raw and processed folders).
DATA_STAGES = ("pipeline.download", "pipeline.preprocess")
SUBMISSION_OUTPUTS_ENV = "VAE_SUBMISSION_OUTPUTS"  # where a job submitted through storage leaves its outputs
# {folder relative to the project root: {"location": URI, "files": {name: sha256}}}: the inputs a job fetches
# from storage (verified) before it runs - the raw files a submitted preprocess reads.
SUBMISSION_INPUTS_ENV = "VAE_SUBMISSION_INPUTS"
ACTIVE = frozenset({"PENDING", "RUNNING"})
FINISHED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Left out of the job's working copy (Ray's .gitignore handling aside): the job takes its inputs from the
# bucket, never from these, and a virtual environment or DVC cache would only make the upload slow or too big.
WORKSPACE_ONLY = ["/.venv", "/.git", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/reports", "/runs",
                  "/mlruns", "/mlartifacts", "/mlflow.db", "/tmp", "/.cache"]


def stage_files(module: str, params: Params) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a stage, relative to the project root: :data:`STAGE_FILES`, and for the data
    stages the dataset's raw folder (download's output, preprocess's input) and processed folder
    (preprocess's output)."""
    data = params.data
    raw, processed = (Path(folder, data.dataset).as_posix() for folder in (data.raw_dir, data.processed_dir))
    if module == "pipeline.download":
        return [], [raw]
    if module == "pipeline.preprocess":
        return [raw], [processed]
    return STAGE_FILES[module]


def raw_files(folder: Path) -> list[Path]:
    """The files a raw dataset folder hands on (download's output, preprocess's input): its top-level files,
    not its subfolders (CelebA's extracted JPEGs, which DVC ignores and preprocess does not read)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


class SubmitError(StageError):
    """The job could not be submitted, or it failed on the cluster."""


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


def stage_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def published_inputs(module: str, params: Params) -> dict[str, dict[str, Any]]:
    """Publish what a data stage's job reads from the workspace (preprocess: the raw files) under
    ``<storage>/data/raw/<hash of their sha256s>/`` unless a complete copy is there (its ``complete.json``,
    written last, lists them); returns the job's :data:`SUBMISSION_INPUTS_ENV` value.

    Raises:
        SubmitError: the workspace lacks the input (run the stage before it).
    """
    if module != "pipeline.preprocess":
        return {}
    (raw,) = stage_files(module, params)[0]
    files = raw_files(project_root() / raw)
    if not files:
        raise SubmitError(f"no raw files in {project_root() / raw}: run the download stage first "
                          "(`dvc repro download`)")
    hashes = {path.name: storage.sha256_file(path) for path in files}
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    root = storage.join(storage.storage_location(params.train.storage_path), "data", "raw", digest)
    endpoint = params.cluster.s3_endpoint_url
    try:
        complete = json.loads(storage.read_bytes(storage.join(root, "complete.json"), endpoint))
    except FileNotFoundError:
        complete = None
    if complete != hashes:
        for path in files:
            storage.upload_file(path, storage.join(root, "files", path.name), endpoint)
        storage.write_bytes(storage.join(root, "complete.json"), json.dumps(hashes, sort_keys=True).encode(),
                            endpoint)
        say(f"[submit] published {len(files)} raw file(s) of {project_root() / raw} to {root}")
    return {raw: {"location": storage.join(root, "files"), "files": hashes}}


def fetch_inputs(inputs: dict[str, dict[str, Any]], endpoint: str | None) -> None:
    """In a submitted job: download each input folder of :func:`published_inputs` into the job's project root,
    every file checked against its sha256 (a damaged copy is refused, not used)."""
    for folder, entry in inputs.items():
        target = project_root() / folder
        for name, sha256 in sorted(entry["files"].items()):
            source = storage.join(entry["location"], name)
            storage.download_file(source, target / name, endpoint, sha256=sha256)
        print(f"[submit] {len(entry['files'])} input file(s) fetched from {entry['location']} into {target}",
              flush=True)


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


def bring_back(declared: list[str], outputs: str, endpoint: str | None) -> list[str]:
    """Copy the job's ``declared`` outputs (paths relative to the project root) from ``outputs`` into the
    workspace: all are downloaded into a staging folder first, then each replaces its old version by rename,
    so a failed download changes nothing.

    Raises:
        SubmitError: a declared output is not there.
    """
    root = project_root()
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


def through_storage(params: Params) -> bool:
    """Whether submitted jobs exchange files through object storage (no shared folder, storage on a store) and
    the data stay in the workspace (a ``data.processed_dir`` on a store is published by preprocess itself)."""
    return (params.cluster.shared_dir is None and storage_access.is_uri(params.train.storage_path)
            and not storage_access.is_uri(params.data.processed_location()))


def should_submit(params: Params) -> bool:
    """True for the DVC-side invocation of a stage with ``cluster.submit``, false inside the submitted job."""
    return params.cluster.submit and not os.environ.get("VAE_SUBMITTED")


def write_job_params(module: str, params: Params) -> tuple[str, str]:
    """Write the job's params to ``<storage>/submissions/<stage>-<hash>.yaml``; returns (that URI, the
    hash)."""
    text = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=True)
    key = hashlib.sha256(f"{module}\n{text}".encode()).hexdigest()[:12]
    root = storage.storage_location(params.train.storage_path)
    location = storage.join(root, "submissions", f"{stage_name(module)}-{key}.yaml")
    storage.write_bytes(location, text.encode(), params.cluster.s3_endpoint_url)
    return location, key


def submit_job(module: str, params: Params, params_uri: str, key: str, address: str,
               inputs: dict[str, dict[str, Any]] | None = None) -> int:
    """Submit ``python -m <module> --params <params_uri>`` (the repository as its working directory, the
    submitting commit and ``inputs`` in its environment), follow it to its end, and copy its declared outputs
    into the workspace; returns 0 once they are there.

    Raises:
        SubmitError: no cluster answers, the same job is running, the job failed or was stopped, or the
            connection was lost (each message says what to do).
    """
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(f"no Ray cluster answers at {address} ({error}): start it, or set "
                          "cluster.job_address / RAY_ADDRESS to its dashboard URL") from None
    refuse_if_running(client, module, key, address)
    job_id = f"vae-{stage_name(module)}-{key}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.storage_location(params.train.storage_path)
    outputs = storage.join(root, "submissions", job_id, "outputs")
    env_vars = {"VAE_SUBMITTED": "1", SUBMISSION_OUTPUTS_ENV: outputs, "RAY_CHDIR_TO_TRIAL_DIR": "0",
                **lineage_env()}  # Ray's copy of the tree has no .git
    if inputs:
        env_vars[SUBMISSION_INPUTS_ENV] = json.dumps(inputs, sort_keys=True)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    client.submit_job(
        entrypoint=f"python -m {module} --params {params_uri}",
        submission_id=job_id,
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": WORKSPACE_ONLY, "env_vars": env_vars},
        metadata={"vae_stage": stage_name(module), "vae_submission": key},
        # A data stage does its work in the job's driver: one CPU places it on a node with CPUs to spare (a
        # worker host; the team head has none). Tune and train drivers only coordinate, on the head.
        entrypoint_num_cpus=1 if module in DATA_STAGES else None,
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
    files = bring_back(stage_files(module, params)[1], outputs, params.cluster.s3_endpoint_url)
    say(f"[submit] job {job_id} succeeded; {len(files)} output file(s) copied from {outputs} into "
        f"{project_root()}")
    return 0


def run_here(module: str, params: Params, run: Callable[[Params], None]) -> int:
    """``run(params)`` in this process. Inside a job submitted through object storage
    (``VAE_SUBMISSION_OUTPUTS`` set), the stage's inputs are first fetched from there (:func:`fetch_inputs`)
    and its declared outputs afterwards uploaded there for the submitting stage to copy back."""
    endpoint = params.cluster.s3_endpoint_url
    submitted = bool(os.environ.get("VAE_SUBMITTED"))
    if submitted and os.environ.get(SUBMISSION_INPUTS_ENV):
        fetch_inputs(json.loads(os.environ[SUBMISSION_INPUTS_ENV]), endpoint)
    run(params)
    outputs = os.environ.get(SUBMISSION_OUTPUTS_ENV)
    if outputs and submitted:
        declared = [Path(p) for p in stage_files(module, params)[1]]
        if module == "pipeline.download":  # the raw files, not what was extracted from them
            declared = [path.relative_to(project_root()) for path in raw_files(project_root() / declared[0])]
        sent = storage.upload_tree(project_root(), declared, outputs, endpoint)
        print(f"[submit] {len(sent)} output file(s) uploaded to {outputs}", flush=True)
    return 0


def run_data_stage(module: str, params: Params, params_path: Any, run: Callable[[Params], None]) -> int:
    """A data stage's work (``pipeline.cli.Submitter``): with ``cluster.submit`` through object storage, on
    the DVC side, ``python -m <module>`` as a Ray job on a worker host (preprocess's raw files published
    first, :func:`published_inputs`), its outputs then copied into the workspace; else :func:`run_here`.
    Returns the exit status."""
    if should_submit(params) and through_storage(params):
        inputs = published_inputs(module, params)
        params_uri, key = write_job_params(module, params)
        return submit_job(module, params, params_uri, key, job_address(params), inputs)
    return run_here(module, params, run)
