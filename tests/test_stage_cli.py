"""The stages' command lines: with ``cluster.submit`` the DVC-side call submits a Ray job, while the same
command inside that job (``VAE_SUBMITTED=1``, same params file) runs the stage; expected failures exit 1 with
"<stage> failed: ..." and Ctrl-C exits 130 with what was kept."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import evaluate, train
from pipeline import submit as submit_module
from pipeline.cli import run_stage
from pipeline.common import StageError
from pipeline.tune import sweep as tune
from tests.cluster_helpers import write_params

STAGES = [(train, "train", "pipeline.train"), (evaluate, "evaluate", "pipeline.evaluate"),
          (tune, "tune_sweep", "pipeline.tune")]


@pytest.mark.parametrize(("module", "local_function", "name"), STAGES, ids=["train", "evaluate", "tune"])
@pytest.mark.parametrize("inside_job", [False, True], ids=["dvc-side", "inside-the-job"])
def test_submit_switch_submits_once(module, local_function, name, inside_job, tmp_path, monkeypatch, capsys):
    params = write_params(
        tmp_path / "params.yaml", {"cluster.submit": True, "cluster.shared_dir": str(tmp_path)}
    )
    submitted: list[str] = []
    monkeypatch.setattr(submit_module, "submit_stage", lambda name, *_: submitted.append(name) or 0)

    def run_locally(*_args, **_kwargs):
        raise StageError("ran here")

    monkeypatch.setattr(module, local_function, run_locally)
    if inside_job:
        monkeypatch.setenv("VAE_SUBMITTED", "1")
    else:
        monkeypatch.delenv("VAE_SUBMITTED", raising=False)
    status = module.main(["--params", str(params)])
    if inside_job:  # the job runs the stage; it does not submit itself again
        assert status == 1 and not submitted
        assert f"{name.rsplit('.', 1)[-1]} failed: ran here" in capsys.readouterr().err
    else:
        assert status == 0 and submitted == [name]


def test_run_stage_exit_statuses(capsys):
    assert run_stage("demo", lambda: None) == 0
    assert run_stage("demo", lambda: 3) == 3

    def missing():
        raise FileNotFoundError("data/processed/x.npy")

    assert run_stage("demo", missing) == 1
    assert "demo failed: data/processed/x.npy" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    assert run_stage("demo", interrupted, interrupted="partial files kept") == 130
    assert "demo interrupted: partial files kept" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        run_stage("demo", interrupted)

    def bug():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_stage("demo", bug)


def test_quickstart_puts_params_and_lock_back_whatever_the_run_does(tmp_path):
    """`make run` rewrites params.yaml and dvc.lock through `dvc exp run`; afterwards (here: a failed run)
    they are byte for byte what they were, and a lock file that did not exist is gone."""
    from pipeline import quickstart

    (tmp_path / "params.yaml").write_text("data:\n  dataset: celeba  # mine\n")
    script = ("open('params.yaml', 'w').write('changed'); open('dvc.lock', 'w').write('lock'); "
              "raise SystemExit(3)")
    status = quickstart.run_experiment(tmp_path, [sys.executable, "-c", script])
    assert status == 3
    assert (tmp_path / "params.yaml").read_text() == "data:\n  dataset: celeba  # mine\n"
    assert not (tmp_path / "dvc.lock").exists()
    (tmp_path / "dvc.lock").write_text("my own lock")
    assert quickstart.run_experiment(tmp_path, [sys.executable, "-c", script]) == 3
    assert (tmp_path / "dvc.lock").read_text() == "my own lock"


def test_quickstart_settings_become_dvc_overrides(capsys):
    from pipeline import quickstart

    assert quickstart.main(["--dry-run", "--set", "train.epochs=20", "--set", "tune.num_samples=2"]) == 0
    command = capsys.readouterr().out.split()
    assert command[1:3] == ["exp", "run"] and "train.epochs=20" in command and "tune.num_samples=2" in command
    assert "data.dataset=fashion_mnist" in command and "train.epochs=10" not in command
    assert "~tune.search_space.beta_schedule.constant" in command  # removals as DVC's -S ~key
    with pytest.raises(SystemExit):
        quickstart.main(["--dry-run", "--set", "train.epochs"])


def test_compare_settings_are_the_quick_start_without_its_sweep(capsys):
    from pipeline import compare

    settings = compare.experiment_settings("conv", "categorical_256", {"train.epochs": "3"})
    assert not any(key.startswith("tune.") for key in settings)
    assert settings["train.use_best_params"] == "false" and settings["data.dataset"] == "fashion_mnist"
    assert settings["model.architecture"] == "conv" and settings["model.hidden_dims"] == "[32,64,128]"
    assert settings["model.likelihood"] == "categorical_256" and settings["train.epochs"] == "3"
    assert settings["mlflow.registered_model_name"] == "null"  # table runs make no registry versions
    assert compare.main(["--dry-run", "--architectures", "mlp", "--likelihoods", "bernoulli"]) == 0
    assert capsys.readouterr().out.split()[1:4] == ["exp", "run", "--force"]  # no run-cache restores
    with pytest.raises(SystemExit):
        compare.main(["--dry-run", "--likelihoods", "poisson"])


def test_compare_writes_one_row_per_model_and_a_rerun_replaces_only_its_row(tmp_path):
    """A stand-in for `dvc exp run` writes the stage outputs each model would: the table takes its figures
    from them, a failed model is a row with its exit status, and running one model again replaces its row
    only (while a changed budget starts a new table)."""
    from pipeline import compare

    reports = tmp_path / "reports"
    reports.mkdir()

    def runner(nll: float):
        def run(root, command):
            assert "--force" in command  # no stage restored from DVC's run cache
            likelihood = next(a.split("=", 1)[1] for a in command if a.startswith("model.likelihood="))
            if likelihood == "categorical_256":
                return 2
            (reports / "metrics.json").write_text(json.dumps({
                "test_nll": nll, "test_nll_bits_per_dim": nll / 543.4, "test_negative_elbo": nll + 30,
                "active_units": 20, "latent_dim": 32, "num_importance_samples": 100,
                "evaluation_seconds": 12}))
            (reports / "train_metrics.json").write_text(json.dumps({"images_per_s": 900.0, "epochs": 2}))
            (reports / "train_curves.csv").write_text("epoch,epoch_seconds\n1,30.5\n2,29.5\n")
            return 0
        return run

    rows = compare.run_table(tmp_path, ["mlp"], ["bernoulli", "categorical_256"], {}, runner(2000.0))
    assert [(r["likelihood"], r["status"]) for r in rows] == [("bernoulli", 0), ("categorical_256", 2)]
    assert rows[0]["test_nll"] == 2000.0 and rows[0]["train_seconds"] == 60.0
    table = (reports / "model_table.md").read_text()
    expected = ("| mlp | bernoulli (binarized data) | 3.681 | 2,000.0 | 2,030.0 | skipped | 20/32 | 900 "
                "| 1.0 min | 0.2 min |")
    assert expected in table and "| mlp | categorical_256 | failed (exit 2)" in table
    rows = compare.run_table(tmp_path, ["mlp"], ["bernoulli"], {}, runner(1900.0))
    assert [(r["likelihood"], r.get("test_nll")) for r in rows] == [("bernoulli", 1900.0),
                                                                    ("categorical_256", None)]
    rows = compare.run_table(tmp_path, ["mlp"], ["bernoulli"], {"train.epochs": "2"}, runner(1800.0))
    assert [r["likelihood"] for r in rows] == ["bernoulli"]
    assert json.loads((reports / "model_table.json").read_text())["budget"]["train.epochs"] == "2"


def _git_repo(root: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    (root / "params.yaml").write_text("mine\n")
    subprocess.run(["git", "add", "params.yaml"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"],
                   cwd=root, check=True)


def _index(root: Path, name: str) -> str:
    """The content git's index holds for ``name`` ("" when it holds none)."""
    done = subprocess.run(["git", "show", f":{name}"], cwd=root, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def test_quickstart_leaves_a_file_the_user_had_staged_staged_with_the_users_content(tmp_path):
    from pipeline import quickstart

    _git_repo(tmp_path)
    (tmp_path / "dvc.lock").write_text("my staged lock\n")
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("my lock, edited after staging\n")
    script = ("import subprocess; open('dvc.lock', 'w').write('experiment lock'); "
              "subprocess.run(['git', 'add', 'dvc.lock', 'params.yaml'])")
    assert quickstart.run_experiment(tmp_path, [sys.executable, "-c", script]) == 0
    assert (tmp_path / "dvc.lock").read_text() == "my lock, edited after staging\n"
    assert _index(tmp_path, "dvc.lock") == "my staged lock\n"
    assert _index(tmp_path, "params.yaml") == "mine\n"


def test_quickstart_puts_params_and_lock_back_when_terminated(tmp_path):
    """SIGTERM (a killed job, `kill`) while `dvc exp run` runs: dvc and what it started (a stage) get SIGTERM
    and stop before the files are put back - none is left running to write after the restore; params.yaml is
    restored, the dvc.lock the run created and staged is gone from the working tree and from git's index, and
    the branch is checked out again."""
    import psutil

    _git_repo(tmp_path)
    stage = "import time\nwhile True:\n    open('stage_writes', 'a').write('x')\n    time.sleep(0.05)"
    script = ("import signal, subprocess, sys, time\n"
              "def stop(*_):\n    open('dvc_stopped', 'w').close()\n    sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "open('params.yaml', 'w').write('changed'); open('dvc.lock', 'w').write('lock')\n"
              "subprocess.run(['git', 'add', 'dvc.lock'])\n"
              "subprocess.run(['git', 'checkout', '-q', '--detach'])\n"
              f"stage = subprocess.Popen([sys.executable, '-c', {stage!r}])\n"
              "open('stage.pid', 'w').write(str(stage.pid)); open('started', 'w').close(); time.sleep(60)")
    driver = ("import sys; from pathlib import Path; from pipeline import quickstart; "
              f"sys.exit(quickstart.run_experiment(Path({str(tmp_path)!r}), "
              f"[sys.executable, '-c', {script!r}]))")
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 128 + signal.SIGTERM
    assert (tmp_path / "dvc_stopped").exists(), "dvc was killed without a chance to stop its stage"
    stage_pid = int((tmp_path / "stage.pid").read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(stage_pid).status() == psutil.STATUS_ZOMBIE, "the stage outlived the run"
    written = (tmp_path / "stage_writes").stat().st_size
    time.sleep(0.3)
    assert (tmp_path / "stage_writes").stat().st_size == written  # nothing writes after the restore
    assert (tmp_path / "params.yaml").read_text() == "mine\n" and not (tmp_path / "dvc.lock").exists()
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=tmp_path, capture_output=True,
                            text=True).stdout
    assert staged == ""
    branch = subprocess.run(["git", "symbolic-ref", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True).stdout.strip()
    assert branch == "main"  # the run detached HEAD, as `dvc exp run` does; it is attached again


def test_quickstart_images_runs_the_walk_on_a_folder_with_valid_settings(tmp_path, capsys):
    from pipeline import quickstart
    from pipeline.params_file import load_params

    assert quickstart.main(["--dry-run", "--images", str(tmp_path)]) == 0
    command = capsys.readouterr().out
    assert f"-S data.image_folder={tmp_path}" in command and "-S data.dataset=image_folder" in command
    settings = {**quickstart.IMAGE_SETTINGS, "data.image_folder": str(tmp_path)}
    params = load_params(overrides={key: yaml.safe_load(value) for key, value in settings.items()})
    assert params.train.run_name == "vae-image_folder-32" == params.mlflow.registered_model_name
    with pytest.raises(SystemExit):
        quickstart.main(["--dry-run", "--images", str(tmp_path / "missing")])
    assert "not a folder" in capsys.readouterr().err
