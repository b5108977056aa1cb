"""The quick start (``make run``): the whole pipeline - download, preprocess, a small Tune sweep, training
with the best parameters, evaluation - on the real Fashion-MNIST from Debian's package (no internet), as a DVC
experiment on top of params.yaml. params.yaml and dvc.lock are put back as they were afterwards, so the
workspace is left as found (the experiment stays in ``dvc exp show``; ``dvc exp apply`` brings it back).

    python -m pipeline.quickstart [--images PATH] [--set KEY=VALUE ...] [--dry-run]

With ``--images PATH`` the same walk runs on your own images (a folder or ``s3://bucket/prefix``) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.common import REPO_ROOT, StageError, say
from pipeline.params_file import load_params

# The settings of the quick start, applied with `dvc exp run -S` on top of params.yaml. The budget fits about
# ten minutes on a 2-core CPU: an MLP VAE 784-512-256-32 with the 8-bit discretized logistic likelihood, a
# 4-trial sweep of learning rate and KL warm-up (2 epochs each, ASHA), then 10 epochs with the best of them,
# and the importance-sampled NLL with K = 250 on all 10,000 test images.
SETTINGS: dict[str, str | None] = {
    "data.dataset": "fashion_mnist",
    "model.architecture": "mlp",
    "model.hidden_dims": "[512,256]",
    "model.latent_dim": "32",
    "model.likelihood": "discretized_logistic",
    "beta_schedule.warmup_steps": "2000",
    "train.epochs": "10",
    "train.batch_size": "128",
    "train.lr_warmup_steps": "100",
    "train.cpus_per_worker": "2",
    "train.use_best_params": "true",
    "train.run_name": "vae-fashion-mnist",
    "tune.experiment_name": "vae-fashion-mnist-sweep",
    "tune.num_samples": "4",
    "tune.epochs": "2",
    "tune.grace_period": "1",
    "tune.search_space.latent_dim": "32",
    "tune.search_space.learning_rate": "{low: 0.0005, high: 0.002, log: true}",
    # the sweep keeps only the linear KL warm-up family (None: the key is removed, DVC's `-S ~key`)
    "tune.search_space.beta_schedule.constant": None,
    "tune.search_space.beta_schedule.cyclical": None,
    "tune.search_space.beta_schedule.sigmoid": None,
    "tune.search_space.beta_schedule.capacity": None,
    "tune.search_space.beta_schedule.linear.warmup_steps": "{low: 1000, high: 4000, log: true}",
    "evaluate.num_importance_samples": "250",
    "mlflow.experiment_name": "vae-fashion-mnist",
    "mlflow.registered_model_name": "vae-fashion-mnist",
}
# `--images PATH`: the same walk on your own folder of images (a folder or s3://bucket/prefix; README, "Your
# own images"): 32x32 crops, a small conv VAE with the discretized logistic likelihood, 10 epochs, no sweep;
# the run and the registered model are named from the dataset (vae-image_folder-32).
IMAGE_SETTINGS: dict[str, str | None] = {
    "data.dataset": "image_folder",
    "data.image_size": "32",
    "model.architecture": "conv",
    "model.hidden_dims": "[32,64,128]",
    "model.latent_dim": "64",
    "model.likelihood": "discretized_logistic",
    "beta_schedule.warmup_steps": "1000",
    "train.epochs": "10",
    "train.batch_size": "64",
    "train.lr_warmup_steps": "100",
    "train.cpus_per_worker": "2",
    "train.run_name": "auto",
    "evaluate.num_importance_samples": "100",
    "mlflow.experiment_name": "vae-images",
    "mlflow.registered_model_name": "auto",
}
KEPT = ("params.yaml", "dvc.lock")  # what `dvc exp run` rewrites in the workspace


def dvc_command(settings: dict[str, str | None], force: bool = False) -> list[str]:
    """``dvc exp run -S key=value ...`` (``-S ~key`` for a None value: remove the key) with the DVC of this
    Python's environment; ``force`` runs every stage again (no outputs restored from DVC's run cache)."""
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.is_file() else "dvc", "exp", "run", *(["--force"] if force else [])]
    for key, value in settings.items():
        command += ["-S", f"~{key}" if value is None else f"{key}={value}"]
    return command


def settings_option(parser: argparse.ArgumentParser, example: str) -> None:
    """Add ``--set KEY=VALUE`` (repeatable) to ``parser``; read it back with :func:`parse_settings`."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change or add a setting (dotted params key), e.g. --set {example}")


def parse_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """``--set`` values as {dotted key: value}; a malformed one is a usage error (exit 2)."""
    settings: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=20")
        settings[key] = value
    return settings


def _git(root: Path, *args: str) -> str | None:
    """git's output in ``root``, or None when it fails (not a repository, detached HEAD for symbolic-ref)."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _index_entries(root: Path) -> dict[str, str]:
    """git's index entries of the files in :data:`KEPT`: path -> "mode blob-id stage" (empty outside a git
    repository, or for a file the index does not hold)."""
    entries = {}
    for line in (_git(root, "ls-files", "--stage", "--", *KEPT) or "").splitlines():
        info, _, path = line.partition("\t")
        entries[path] = info
    return entries


def _restore_index(root: Path, before: dict[str, str]) -> None:
    """Put git's index entries of :data:`KEPT` back to ``before`` (:func:`_index_entries`): a file staged
    before the run is staged again with the content it had, one the run staged anew is unstaged."""
    after = _index_entries(root)
    for name in KEPT:
        if after.get(name) == before.get(name):
            continue
        if name in before:
            mode, blob, _ = before[name].split()
            _git(root, "update-index", "--add", "--cacheinfo", f"{mode},{blob},{name}")
        else:
            _git(root, "rm", "-q", "--cached", "--ignore-unmatch", "--", name)


# After SIGTERM or Ctrl-C, how long `dvc exp run` and its stages (and their Ray) get to stop before SIGKILL.
STOP_GRACE_S = 30.0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _run_stoppable(command: list[str], root: Path, env: dict[str, str], grace_s: float = STOP_GRACE_S) -> int:
    """Run ``command`` in a process group of its own; when this process is interrupted (SIGTERM, Ctrl-C),
    the whole group - dvc, the stage it runs, that stage's children - gets SIGTERM, then SIGKILL after
    ``grace_s`` seconds, so nothing of it outlives the interruption and writes after the files are put back.
    Returns the command's exit status; re-raises the interruption."""
    process = subprocess.Popen(command, cwd=root, env=env, start_new_session=True)
    try:
        return process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what is left of the group: stages, their children
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_until_group_ended(process.pid)
        raise


def _wait_until_group_ended(group: int, timeout_s: float = 10.0) -> None:
    """Return once no process of process group ``group`` runs any more (zombies count as ended): a SIGKILL is
    acted on when the process is next scheduled, which on a loaded machine may be after the files were put
    back. Bounded by ``timeout_s``."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = False
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    running = True
                    break
        if not running:
            return
        time.sleep(0.02)


def run_experiment(root: Path, command: list[str]) -> int:
    """Run ``command`` in ``root`` and put the files in :data:`KEPT` back as they were, whatever happens (an
    error, Ctrl-C, SIGTERM), in the working tree and in git's index (``dvc exp run`` stages dvc.lock; a file
    the user had staged stays staged with the user's content); a branch that a killed ``dvc exp run`` left
    detached (HEAD on the same commit) is checked out again. An interrupted command is stopped with its
    stages first (:func:`_run_stoppable`). Returns the command's exit status."""
    saved = {name: (root / name).read_bytes() if (root / name).is_file() else None for name in KEPT}
    index_before = _index_entries(root)
    branch, commit = _git(root, "symbolic-ref", "-q", "HEAD"), _git(root, "rev-parse", "HEAD")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C: the finally runs
    try:
        return _run_stoppable(command, root, env)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for name, content in saved.items():
            path = root / name
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != content:
                path.write_bytes(content)
        detached = _git(root, "symbolic-ref", "-q", "HEAD") is None
        if branch and detached and _git(root, "rev-parse", "HEAD") == commit:
            _git(root, "symbolic-ref", "HEAD", branch)  # re-attach; the working tree is not touched
        _restore_index(root, index_before)


def summary(root: Path, what: str = "Fashion-MNIST, MLP VAE") -> str:
    """The closing lines: the test NLL, where the pictures are, and the command that opens the run in
    MLflow; ``what`` names the data and model."""
    import mlflow

    from pipeline.tracking import tracking_uri, ui_url

    metrics = json.loads((root / "reports/metrics.json").read_text())
    run_id = json.loads((root / "models/vae/run.json").read_text())["mlflow_run_id"]
    store = tracking_uri(load_params(root / "params.yaml").mlflow.tracking_uri)
    experiment_id = mlflow.MlflowClient(store).get_run(run_id).info.experiment_id
    fid = (f"FID {metrics['fid_samples']:.1f} (prior samples)" if "fid_samples" in metrics
           else f"FID skipped: {str(metrics.get('fid_skipped', '')).split('. ')[0]}")
    lines = [
        "",
        f"Quick start done ({what}, discretized logistic likelihood):",
        f"  test NLL   {metrics['test_nll']:.1f} nats/image = {metrics['test_nll_bits_per_dim']:.3f} "
        f"bits/dim (importance-sampled, K={metrics['num_importance_samples']}, "
        f"{metrics['num_test_images']:,} images)",
        f"  test -ELBO {metrics['test_negative_elbo']:.1f} nats/image; {fid}",
        f"  pictures   {root / 'reports/eval'}/ (samples, reconstructions, interpolations, latent scatter)",
        f"  MLflow     {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {store} "
        f"--port 5000, then open {ui_url('http://127.0.0.1:5000', experiment_id, run_id)}",
        "  params.yaml is unchanged; `dvc exp show` lists this run, `make celeba` is the CelebA GPU job.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.quickstart", description=__doc__.split("\n\n")[0]
    )
    settings_option(parser, "train.epochs=20")
    parser.add_argument("--images", metavar="PATH", default=None,
                        help="your own images instead of Fashion-MNIST: a folder (searched recursively) or "
                        "s3://bucket/prefix; add --set data.class_folders=true for labels from its folders")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")
    args = parser.parse_args(argv)
    if args.images:
        folder = args.images if "://" in args.images else str(Path(args.images).expanduser().resolve())
        if "://" not in folder and not Path(folder).is_dir():
            parser.error(f"--images {args.images}: not a folder")
        base, what = {**IMAGE_SETTINGS, "data.image_folder": folder}, f"your images in {folder}, conv VAE"
    else:
        base, what = SETTINGS, "Fashion-MNIST, MLP VAE"
    settings: dict[str, str | None] = {**base, **parse_settings(parser, args.set)}
    root = Path(os.environ.get("VAE_PROJECT_ROOT") or REPO_ROOT)
    command = dvc_command(settings)
    if args.dry_run:
        print(" ".join(command))
        return 0
    say(f"[quickstart] {' '.join(command[:3])} with the settings of pipeline/quickstart.py ({what})")
    status = run_experiment(root, command)
    if status:
        print(f"[quickstart] dvc exp run failed (exit {status}); params.yaml and dvc.lock are as they "
              "were", file=sys.stderr)
        return status
    try:
        say(summary(root, what))
    except (OSError, KeyError, StageError) as error:
        print(f"[quickstart] finished, but its outputs could not be read: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
