"""The chaos soak: one training run under a seeded random schedule of faults, checked against the fault-free
run of the same settings and seed.

On the local cluster with hosts of their own and the team stack (``local-cluster up --hosts --team``, as
root: three worker hosts, MLflow on PostgreSQL behind basic-auth, data and checkpoints in the S3 endpoint), a
2-worker training job on real Fashion-MNIST images is hit, one fault at a time, each at a random step:

    kill_worker      SIGKILL one Ray Train worker process
    kill_node        SIGKILL every process of the worker host of a rank, then `restart-node`
    cut_link         cut the link of a rank's worker host until Ray declares it dead, heal, `restart-node`
    s3_outage        SIGSTOP the S3 endpoint (connections hang) for a while, then SIGCONT
    s3_kill          SIGKILL the S3 endpoint, start it again a few seconds later (`up` on the running cluster)
    postgres_restart stop PostgreSQL (fast shutdown), start it again
    mlflow_restart   SIGKILL the MLflow server, start it again
    driver_restart   stop the job (`ray job stop`) and submit it again

At the end it checks, against the fault-free run: the final weights, optimizer, learning-rate schedule and
every rank's random state are bitwise equal; MLflow holds exactly the fault-free run's values of every metric
(timings aside), each step once, and the same pictures; the evaluate stage's figures are equal; no record was
lost. The world size never changes (three worker hosts for two ranks), so no fault forces an elastic resume.
Traffic goes only to loopback and the cluster's own namespaces; every wait is bounded.

    .venv/bin/python -m tests.chaos_soak --faults 21 --seed 0 --record   # the long soak (as root)

The short schedule runs in CI: tests/test_chaos_soak.py. (It lives beside the tests, whose cluster helpers
it uses; the long run records its table in benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import append_to_section, commit, cores, cpu_model  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.checkpoints import newest_persisted_checkpoint  # noqa: E402
from tests.cluster_helpers import (  # noqa: E402
    job_actors,
    job_info,
    job_logs,
    local_cluster,
    stop_job,
    submit_job,
    wait_for_job,
)
from tests.fixtures.arrays import write_manifest  # noqa: E402

KINDS = ("kill_worker", "kill_node", "cut_link", "s3_outage", "s3_kill", "postgres_restart",
         "mlflow_restart", "driver_restart")
# Health checks every second, declared dead after 5 misses: a cut host is dead after ~10 s, not ~60 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}
COUNTS = {"train": 1024, "valid": 128, "test": 128}  # real Fashion-MNIST images
BATCH = 32
STEPS_PER_EPOCH = COUNTS["train"] // BATCH
# Figures that measure time or the machine (MLflow's system metrics: CPU, memory), not the model: they differ
# between any two runs.
def timing(key: str) -> bool:
    return key.endswith(("_per_s", "seconds")) or key in ("device", "seconds") or key.startswith("system/")
STEP_LINE = re.compile(r"\[train\]   step (\d+)/")
RESUMED = re.compile(r"resumed from the checkpoint of epoch (\d+) \(step (\d+)\)")
PLACEMENT = re.compile(r"\[train\] \d+ worker\(s\): ")  # rank 0's first line on every (re)start
PROCESS = re.compile(r"pid=(\d+)")  # Ray's prefix of a worker's line: "(RayTrainWorker pid=N, ip=...)"
EPOCHS_PER_FAULT = 4
WAIT_S = 300.0  # the longest wait for any one thing (a step, a recovery, a job)
# The checks of :func:`compare`, each a list of findings (empty: equal).
CHECKS = ("state", "metrics", "pictures", "evaluate", "lost_records")


def publish_fashion_mnist(bucket: str, root: Path) -> str:
    """The first 1,024 training images (training split), the last 128 (validation) and the first 128 test
    images of Debian's Fashion-MNIST, published to ``bucket``/processed as the preprocess stage publishes;
    returns data.processed_dir."""
    from pipeline.preprocess import read_idx

    source = Path("/usr/share/datasets/fashion-mnist")
    train = read_idx(source / "train-images-idx3-ubyte.gz")[:, None]
    test = read_idx(source / "t10k-images-idx3-ubyte.gz")[:, None]
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, images in (("train", train[: COUNTS["train"]]), ("valid", train[-COUNTS["valid"]:]),
                          ("test", test[: COUNTS["test"]])):
        np.save(folder / f"{split}_images.npy", np.ascontiguousarray(images))
    write_manifest(folder)
    storage.publish_dataset(folder, f"{bucket}/processed/fashion_mnist")
    return f"{bucket}/processed"


def params_uri(cluster, processed: str, name: str, epochs: int) -> str:
    """The run's params in the bucket (the nodes share no folder), written with infra/cluster_params.py."""
    values = {
        "data.dataset": "fashion_mnist",
        "data.processed_dir": processed,
        "train.storage_path": f"{cluster.bucket_uri}/runs",
        "model.architecture": "mlp",
        "model.hidden_dims": [128, 64],
        "model.latent_dim": 8,
        "model.likelihood": "bernoulli",
        "train.epochs": epochs,
        "train.batch_size": BATCH,
        "train.num_workers": 2,
        "train.log_every_n_steps": 1,
        "train.print_steps": True,  # the soak follows the step lines
        "train.max_failures": -1,  # every fault may cost a restart; none may end the run
        "train.run_name": name,
        "mlflow.experiment_name": "chaos-soak",
        "mlflow.registered_model_name": None,
        "evaluate.num_importance_samples": 16,
        "evaluate.num_image_rows": 4,
        "evaluate.fid": False,
        "evaluate.latent_scatter": "none",
    }
    location = f"{cluster.bucket_uri}/params/{name}.yaml"
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    done = subprocess.run([sys.executable, "infra/cluster_params.py", *sets, "-o", location], cwd=REPO_ROOT,
                          env=cluster.subprocess_env(), capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return location


def working_tree() -> Path:
    """The tree a user submits: the repository's tracked and new files, without tests and benchmarks."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    root = Path(tempfile.mkdtemp(prefix="soak-tree-"))
    for name in files:
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("tests/", "benchmarks/", "infra/screenshots")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(source.read_bytes())
    return root


@dataclasses.dataclass
class Job:
    """One training run, submitted again after a driver restart; follows its step lines."""

    cluster: Any
    tree: Path
    params: str
    name: str
    submissions: list[str] = dataclasses.field(default_factory=list)

    def submit(self, module: str = "pipeline.train") -> str:
        submission = f"{self.name}-{module.rsplit('.', 1)[-1]}-{len(self.submissions) + 1}"
        result = submit_job(self.cluster, ["python", "-m", module, "--params", self.params],
                            working_dir=self.tree, submission_id=submission, no_wait=True)
        if result.returncode:
            raise RuntimeError(result.output[-3000:])
        self.submissions.append(submission)
        return submission

    @property
    def current(self) -> str:
        return self.submissions[-1]

    def logs(self) -> str:
        return job_logs(self.cluster, self.current)

    def status(self) -> str:
        return job_info(self.cluster, self.current)["status"]

    def wait_for_step(self, step: int) -> int:
        """Block until a step line >= ``step`` shows (returns it), or the job ended (returns the last)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            steps = [int(s) for s in STEP_LINE.findall(self.logs())]
            if steps and steps[-1] >= step:
                return steps[-1]
            if self.status() in ("SUCCEEDED", "FAILED", "STOPPED"):
                return steps[-1] if steps else 0
            time.sleep(0.2)
        raise TimeoutError(f"no step {step} in {self.current} after {WAIT_S:.0f}s")

    def wait_until_training_goes_on(self, offset: int, restarts: bool | None) -> tuple[bool, re.Match | None]:
        """Block until training went on after log offset ``offset``. ``restarts`` True: the fault restarted
        the workers - wait for a step after the restarted workers' first line (rank 0 names the placement on
        every start). False: wait for any step line. None (the fault may or may not make the workers fail):
        a restart if one shows, else a step line past the next epoch's end, whose checkpoint upload then
        succeeded. Returns (whether the workers restarted, the "resumed from the checkpoint" line of that
        start or None - no restart, or one before the first checkpoint, which trains from the start again).

        Raises:
            AssertionError: the job ended first (it can neither go on nor finish).
            TimeoutError: nothing within WAIT_S.
        """
        seen = [int(s) for s in STEP_LINE.findall(self.logs())]
        past_checkpoint = ((seen[-1] if seen else 0) // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            tail = self.logs()[offset:]
            if restarts or (restarts is None and PLACEMENT.search(tail)):
                went_on = _restarted_rank0(tail)
                if went_on is not None:
                    return True, went_on[0]
            elif restarts is False and STEP_LINE.search(tail):
                return False, None
            elif restarts is None and any(int(s) > past_checkpoint for s in STEP_LINE.findall(tail)):
                return False, None
            status = self.status()
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                if restarts and status == "SUCCEEDED":
                    raise AssertionError(f"{self.current} finished without the restart the fault forces")
                return False, None
            time.sleep(0.2)
        raise TimeoutError(f"training did not go on in {self.current} within {WAIT_S:.0f}s")

    def finished(self) -> str:
        info = wait_for_job(self.cluster, self.current, timeout_s=900)
        logs = self.logs()
        if info["status"] != "SUCCEEDED":
            raise AssertionError(f"{self.current} {info['status']}: {info.get('message')}\n{logs[-4000:]}")
        return logs


def _restarted_rank0(tail: str) -> tuple[re.Match | None] | None:
    """In the log after a fault: once the restarted rank 0 has trained a step, (its "resumed from" line, or
    None when it started from the beginning); None while it has not. Lines are told apart by the process
    that printed them ("(RayTrainWorker pid=N, ...)"): the killed attempt's last lines may arrive after the
    new attempt's first."""
    lines = tail.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if not PLACEMENT.search(lines[index]):
            continue
        pid = PROCESS.search(lines[index])
        own = [line for line in lines[index + 1:] if pid is None or PROCESS.search(line) and
               PROCESS.search(line).group(1) == pid.group(1)]
        for position, line in enumerate(own):
            if STEP_LINE.search(line):
                resumed = [RESUMED.search(earlier) for earlier in own[:position]]
                return (next((m for m in resumed if m), None),)
    return None


# ---------------------------------------------------------------------------------------------- faults
def _rank_hosts(job: Job) -> list[str]:
    """The worker hosts on which the job's Train workers run now."""
    by_id = {node["node_id"]: node.get("node_ip") for node in job.cluster.nodes()}
    by_ip = {info["address"]: host for host, info in job.cluster.state["hosts"].items()}
    actors = job_actors(job.cluster, job.current, "RayTrainWorker")
    return sorted({by_ip[by_id[a["node_id"]]] for a in actors if by_id.get(a["node_id"]) in by_ip})


def _wait_dead(cluster, host: str) -> None:
    address = cluster.host_ip(host)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        records = [n for n in cluster.nodes() if n.get("node_ip") == address]
        if records and not any(n["state"] == "ALIVE" for n in records):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray did not declare {host} dead")


# Each fault: inject it, and return (what was hit, whether it restarts the workers - None: it may -, what to
# do once training went on without the part it took - None when nothing).
def kill_worker(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    actors = job_actors(job.cluster, job.current, "RayTrainWorker")
    pids = sorted(int(a["pid"]) for a in actors if a.get("pid"))
    if not pids:
        raise RuntimeError(f"no Train worker of {job.current} alive")
    pid = rng.choice(pids)
    psutil.Process(pid).kill()
    return f"worker pid {pid}", True, None


def kill_node(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    host = rng.choice(_rank_hosts(job))
    job.cluster.kill_node(host)
    return host, True, lambda: job.cluster.restart_node(host)


def cut_link(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    host = rng.choice(_rank_hosts(job))
    job.cluster.partition(host)
    try:
        _wait_dead(job.cluster, host)
    finally:
        job.cluster.heal(host)
    return host, True, lambda: job.cluster.restart_node(host)


def s3_outage(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    seconds = rng.uniform(5, 20)
    (moto,) = job.cluster.processes("s3")
    moto.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        moto.send_signal(signal.SIGCONT)
    return f"{seconds:.0f} s", False, None


def s3_kill(job: Job, rng: random.Random) -> tuple[str, bool | None, Any]:
    seconds = rng.uniform(2, 8)
    (endpoint,) = job.cluster.processes("s3")
    endpoint.kill()
    endpoint.wait(10)
    time.sleep(seconds)
    job.cluster.start_s3()  # the same key pair, every acknowledged object
    return f"down {seconds:.0f} s", None, None  # a checkpoint upload in the gap fails the workers


def postgres_restart(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    job.cluster._terminate(job.cluster.processes("postgres"), sig=signal.SIGINT, grace_s=15)
    time.sleep(rng.uniform(2, 8))
    job.cluster.start_postgres()
    return "fast shutdown", False, None


def mlflow_restart(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    job.cluster.stop_mlflow(signal.SIGKILL)
    time.sleep(rng.uniform(1, 5))
    job.cluster.start_mlflow(wait=True)
    return "SIGKILL", False, None


def driver_restart(job: Job, rng: random.Random) -> tuple[str, bool, Any]:
    stopped = job.current
    stop_job(job.cluster, stopped)
    wait_for_job(job.cluster, stopped, timeout_s=120)
    job.submit()
    return f"{stopped} stopped", True, None


FAULTS = {name: globals()[name] for name in KINDS}


def schedule(count: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """``count`` faults: every kind at least once (when ``count`` allows), the rest drawn, in a seeded random
    order."""
    rng = random.Random(seed)
    chosen = list(kinds[:count]) + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    return chosen


def run_with_faults(job: Job, faults: list[str], seed: int) -> list[dict[str, Any]]:
    """Submit the job and inject ``faults`` one after the other, each at a random step of the epoch after
    the last one recovered; returns a row per fault."""
    rng = random.Random(seed)
    rows = []
    job.submit()
    for kind in faults:
        target = job.wait_for_step(0) + rng.randint(1, STEPS_PER_EPOCH)
        at = job.wait_for_step(target)
        if job.status() != "RUNNING" or at < target:
            rows.append({"fault": kind, "at_step": "-", "detail": "the run had ended", "recovered_s": "-",
                         "resumed_from": "-", "steps_again": 0})
            continue
        submission, offset = job.current, len(job.logs())
        started = time.monotonic()
        detail, restarts, recover = FAULTS[kind](job, rng)
        if job.current != submission:
            offset = 0  # submitted again: the new job's own log
        restarted, resumed = job.wait_until_training_goes_on(offset, restarts)
        recovered = f"{time.monotonic() - started:.1f} s" if restarted else "-"
        if recover:  # a node to bring back once training went on without it
            recover()
        from_step = int(resumed.group(2)) if resumed else (0 if restarted else at)
        resumed_from = (f"epoch {resumed.group(1)}" if resumed
                        else "the start" if restarted else "no restart")
        rows.append({"fault": kind, "at_step": at, "detail": detail, "recovered_s": recovered,
                     "resumed_from": resumed_from, "steps_again": max(0, at - from_step)})
        print(f"[soak] {rows[-1]}", flush=True)
    job.finished()
    return rows


# ---------------------------------------------------------------------------------------------- checks
def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two checkpoint states differ, bit for bit (tensors with torch.equal, floats exactly); timing
    figures are left out."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}/{k}: only one side" for k in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b), key=str):
            if not timing(str(key)):
                found += differences(a[key], b[key], f"{path}/{key}")
        return found
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [path]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def run_folder(job: Job) -> str:
    return re.search(r"checkpoints in (s3://\S+),", job.logs()).group(1)


def final_state(folder: str) -> dict[str, Any]:
    filesystem, path = storage.filesystem(folder)
    found = newest_persisted_checkpoint(filesystem, path)
    if found is None:
        raise AssertionError(f"no checkpoint in {folder}")
    state = found[1]
    state.pop("mlflow_records", None)  # what was still unsent at that moment: timing, not the model
    return state


def mlflow_records(client, run_id: str, bucket: str) -> tuple[dict[str, list], dict[tuple, bytes]]:
    """Every metric's (step, value) history (timings left out) and every picture's PNG by (key, step), read
    where the tracking server keeps it (the bucket's mlflow/ prefix: ``--artifacts-destination``)."""
    run = client.get_run(run_id)
    metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics if not timing(key)}
    artifacts = f"{bucket}/mlflow/{run.info.artifact_uri.split(':', 1)[1].strip('/')}/images"
    pictures: dict[tuple, bytes] = {}
    for name in storage.list_files(artifacts):
        if not name.endswith(".png"):  # MLflow's compressed .webp copies
            continue
        key, _, step = name.split("+")[:3]
        picture = (key, int(step))
        if picture in pictures:
            picture += ("logged again",)
        pictures[picture] = storage.read_bytes(f"{artifacts}/{name}")
    return metrics, pictures


def _metric_difference(key: str, reference: list, soaked: list) -> str:
    """How one metric's (step, value) history differs: steps missing, steps logged twice, other values."""
    steps = [step for step, _ in soaked]
    twice = sorted({step for step in steps if steps.count(step) > 1})
    missing = sorted({step for step, _ in reference} - set(steps))
    extra = sorted(set(steps) - {step for step, _ in reference})
    values = dict(reference)
    other = [step for step, value in soaked if step in values and value != values[step]]
    return (f"{key}: {len(reference)} vs {len(soaked)} values; twice at {twice[:5]}, missing {missing[:5]}, "
            f"extra {extra[:5]}, other values at {other[:5]}")


def compare(cluster, reference: Job, soaked: Job) -> dict[str, Any]:
    """The checks of the soak; returns each one's findings (empty lists: all equal)."""
    import mlflow

    ref_folder, soak_folder = run_folder(reference), run_folder(soaked)
    # The run name is the one setting the two runs differ in (it names their folders and MLflow runs).
    states = [final_state(folder) for folder in (ref_folder, soak_folder)]
    for state in states:
        state["params"]["train"].pop("run_name")
    state = differences(*states)
    outputs = [json.loads(storage.read_bytes(f"{f}/outputs/reports/train_metrics.json"))
               for f in (ref_folder, soak_folder)]
    client = mlflow.MlflowClient(tracking_uri=cluster.mlflow_url)
    (ref_metrics, ref_pictures), (soak_metrics, soak_pictures) = (
        mlflow_records(client, o["mlflow_run_id"], cluster.bucket_uri) for o in outputs)
    metric_findings = [_metric_difference(key, ref_metrics.get(key, []), soak_metrics.get(key, []))
                       for key in sorted(set(ref_metrics) | set(soak_metrics))
                       if ref_metrics.get(key) != soak_metrics.get(key)]
    picture_findings = [
        f"{key}: " + ("missing" if key not in soak_pictures else "extra" if key not in ref_pictures
                      else "other bytes")
        for key in sorted(set(ref_pictures) | set(soak_pictures), key=str)
        if ref_pictures.get(key) != soak_pictures.get(key)]
    evaluated = []
    for job in (reference, soaked):
        job.submit("pipeline.evaluate")
        job.finished()
        evaluated.append(json.loads(storage.read_bytes(f"{run_folder_of(job)}/outputs/reports/metrics.json")))
    figures = differences(*[{k: v for k, v in e.items() if not timing(k)} for e in evaluated])
    lost = [line for job in (reference, soaked) for s in job.submissions
            for line in job_logs(cluster, s).splitlines() if "could not be logged" in line]
    listed = [f"{folder}/lost_mlflow_records.json" for folder in (ref_folder, soak_folder)
              if storage.list_files(folder) and "lost_mlflow_records.json" in storage.list_files(folder)]
    tagged = [f"{o['mlflow_run_id']}: {client.get_run(o['mlflow_run_id']).data.tags['mlflow.lost_records']}"
              for o in outputs if "mlflow.lost_records" in client.get_run(o["mlflow_run_id"]).data.tags]
    return {"state": state, "metrics": metric_findings, "pictures": picture_findings, "evaluate": figures,
            "lost_records": lost + listed + tagged, "metric_keys": len(ref_metrics),
            "metric_values": sum(len(v) for v in ref_metrics.values()),
            "pictures_compared": len(ref_pictures)}


def run_folder_of(job: Job) -> str:
    """The run's storage folder, from the first submission that printed it."""
    for submission in job.submissions:
        found = re.search(r"checkpoints in (s3://\S+),", job_logs(job.cluster, submission))
        if found:
            return found.group(1)
    raise AssertionError(f"no run folder in the logs of {job.submissions}")


def soak(cluster, faults: list[str], seed: int, workspace: Path) -> dict[str, Any]:
    """The reference run, the run under ``faults``, and the comparison."""
    processed = publish_fashion_mnist(cluster.bucket_uri, workspace)
    # Training outruns the faults that do not stop it (an MLflow or PostgreSQL restart takes seconds, an
    # epoch about one): enough epochs that every fault lands before the run ends.
    epochs = EPOCHS_PER_FAULT * len(faults) + 2
    tree = working_tree()
    reference = Job(cluster, tree, params_uri(cluster, processed, f"soak-reference-{seed}", epochs),
                    f"soak-reference-{seed}")
    started = time.monotonic()
    reference.submit()
    reference.finished()
    reference_s = time.monotonic() - started
    soaked = Job(cluster, tree, params_uri(cluster, processed, f"soak-faults-{seed}", epochs),
                 f"soak-faults-{seed}")
    started = time.monotonic()
    rows = run_with_faults(soaked, faults, seed)
    soak_s = time.monotonic() - started
    findings = compare(cluster, reference, soaked)
    return {"rows": rows, "findings": findings, "epochs": epochs, "steps": epochs * STEPS_PER_EPOCH,
            "reference_s": round(reference_s), "soak_s": round(soak_s),
            "equal": not any(findings[k] for k in CHECKS)}


def table(report: dict[str, Any]) -> str:
    # "training went on after": from the fault to the first step after the restart it forced ("-": the
    # workers were not restarted; an MLflow or PostgreSQL restart does not stop training, an S3 outage holds
    # it at the next checkpoint upload until the store answers).
    lines = ["| # | fault | at step | what | training went on after | resumed from | steps trained again |",
             "|---:|---|---:|---|---:|---|---:|"]
    for index, row in enumerate(report["rows"], 1):
        lines.append(f"| {index} | {row['fault']} | {row['at_step']} | {row['detail']} | "
                     f"{row['recovered_s']} | {row['resumed_from']} | {row['steps_again']} |")
    findings = report["findings"]
    verdict = "bitwise equal" if report["equal"] else "DIFFERENT"
    lines += ["", f"{report['epochs']} epochs x {STEPS_PER_EPOCH} steps, 2 workers; fault-free run "
              f"{report['reference_s']} s, run with faults {report['soak_s']} s. Final weights, optimizer, "
              f"LR schedule and random states: {verdict} ({len(findings['state'])} differences); MLflow: "
              f"{findings['metric_keys']} metrics, {findings['metric_values']} values, "
              f"{len(findings['metrics'])} differ; pictures: {findings['pictures_compared']}, "
              f"{len(findings['pictures'])} differ; evaluate figures: {len(findings['evaluate'])} differ; "
              f"lost records: {len(findings['lost_records'])}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=21, help="how many faults (every kind at least once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    from infra.cluster import hosts as hostnet

    why_not = hostnet.available()
    if why_not:
        print(f"chaos soak: {why_not}", file=sys.stderr)
        return 2
    faults = schedule(args.faults, args.seed, kinds)
    tree_commit = commit()  # the jobs run the tree as it is now (working_tree copies it before the runs)
    with tempfile.TemporaryDirectory(prefix="soak-") as state, contextlib.ExitStack() as stack:
        Path(state).chmod(0o711)  # the cluster's accounts (infra/cluster/accounts.py) must enter it
        cluster = stack.enter_context(local_cluster(Path(state) / "cluster", num_workers=3, hosts=True,
                                                    team=True, head_cpus=0, ray_env=FAST_HEALTH_CHECKS))
        stack.enter_context(_environment(cluster.client_env()))
        report = soak(cluster, faults, args.seed, Path(state) / "data")
    text = table(report)
    print(text)
    if args.record:
        command = f"python -m tests.chaos_soak --faults {args.faults} --seed {args.seed}"
        block = (f"`{command}` at {tree_commit}, {cpu_model()}, {cores()} cores, no GPU:\n\n{text}")
        append_to_section("## Chaos soak", "The run under a seeded random schedule of faults against the "
                          "fault-free run (tests/chaos_soak.py).", block)
    return 0 if report["equal"] else 1


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """This process's environment with ``values`` (the cluster's client settings, as `source env.sh`)."""
    import os

    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    sys.exit(main())
