"""Look at a sweep the way a user does: start the MLflow UI on 127.0.0.1, open the sweep's experiment in
headless Chromium and save a screenshot.

    python -m pipeline.ui_screenshot                  # latest sweep of tune.experiment_name, trials compared
    python -m pipeline.ui_screenshot --view chart --out /tmp/chart.png
    python -m pipeline.ui_screenshot --tracking-uri sqlite:////abs/mlflow.db --experiment vae-sweep

Views: ``compare`` (default: MLflow's comparison of the sweep's trial runs: a parallel-coordinates plot of the
searched values, beta_schedule, latent_dim and learning_rate, against a metric, over the runs' details),
``chart`` (the experiment's chart view) and ``table`` (the runs table). The experiment page nests the trials
under their sweep's parent run, collapsed, so its chart view shows the parent's summary charts until the
parent is expanded; the comparison page shows the trials themselves. With a local tracking store (sqlite) the
tool starts ``mlflow server`` on a free port and stops it afterwards; with an http(s) tracking URI it uses
that server as it is. Needs Debian's ``chromium`` (``make system-deps``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.common import StageError
from pipeline.config import ConfigError, resolve
from pipeline.params_file import load_params
from pipeline.tracking import ui_url

DEFAULT_OUT = Path("infra/screenshots/mlflow_sweep.png")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--no-proxy-server",
]
# The UI is opened under this name, mapped to 127.0.0.1 inside Chromium: MLflow's UI treats
# "localhost"/"127.0.0.1" as a local server and opens its assistant panel over a third of the page; under
# another name it shows the page as any remote user sees it. The server still listens on 127.0.0.1 only.
UI_HOST = "mlflow-ui.test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, timeout_s: float, server: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise StageError(f"mlflow server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a local URL we built
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StageError(f"nothing answered at {url} within {timeout_s:.0f}s")


@contextmanager
def mlflow_ui(tracking_uri: str, log_path: Path | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """The base URL of an MLflow UI for ``tracking_uri``: an http(s) URI as it is, otherwise a ``mlflow
    server`` on 127.0.0.1 and a free port over that backend store, stopped (its whole process group) on
    exit."""
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/")
        return
    port = free_port()
    log = open(log_path or os.devnull, "w")  # noqa: SIM115 - closed below
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--artifacts-destination",
            str(resolve("mlartifacts")),
            "--allowed-hosts",
            f"{UI_HOST}:{port},127.0.0.1:{port},localhost:{port}",
            "--cors-allowed-origins",
            f"http://{UI_HOST}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s, server)
        yield f"http://{UI_HOST}:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)
        log.close()


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise StageError(
        "no Chromium found: install Debian's `chromium` (`make system-deps` or `apt-get install chromium`)"
    )


def screenshot(url: str, out: Path, window: tuple[int, int] = (1600, 1000), budget_ms: int = 20_000) -> Path:
    """Save a PNG of ``url`` rendered by headless Chromium (a fresh profile; virtual time lets the page's
    scripts and requests settle for ``budget_ms``). Written atomically. Raises StageError when no picture
    comes out."""
    out = resolve(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlflow-shot-") as profile:
        target = Path(profile) / "shot.png"
        command = [
            chromium_binary(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}/user-data",
            f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1",
            f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={target}",
            url,
        ]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=budget_ms / 1000 + 120, env=env
        )
        if not target.is_file() or target.stat().st_size < 1000:
            raise StageError(
                f"Chromium wrote no screenshot of {url} (exit {done.returncode}): {done.stderr[-1500:]}"
            )
        os.replace(target, out)
    return out


def sweep_runs(
    tracking_uri: str, experiment_name: str, sweep: str | None = None
) -> tuple[str, str, list[str]]:
    """(experiment id, parent run id, child run ids) of ``sweep`` or else the latest sweep in the
    experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise StageError(
            f"no MLflow experiment '{experiment_name}' at {tracking_uri}: run the tune stage first"
        )
    condition = "tags.sweep_role = 'parent'" + (f" and tags.sweep_name = '{sweep}'" if sweep else "")
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=condition,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not parents:
        raise StageError(
            f"no sweep{' ' + sweep if sweep else ''} in experiment '{experiment_name}' at {tracking_uri}"
        )
    parent = parents[0]
    children = client.search_runs(
        [experiment.experiment_id],
        max_results=1000,
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    return experiment.experiment_id, parent.info.run_id, [run.info.run_id for run in children]


def view_url(base: str, view: str, experiment_id: str, parent_id: str, children: list[str]) -> str:
    if view == "compare":
        query = urllib.parse.urlencode(
            {"runs": json.dumps(children), "experiments": json.dumps([experiment_id])}
        )
        return f"{base}/#/compare-runs?{query}"
    mode = {"chart": "CHART", "table": "TABLE"}[view]
    return ui_url(base, experiment_id, compareRunsMode=mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", type=Path, default=None, help="params file (tracking URI, tune.experiment_name)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI / mlflow.tracking_uri / mlflow.db"
    )
    parser.add_argument("--experiment", default=None, help="default: tune.experiment_name")
    parser.add_argument(
        "--sweep", default=None, help="the sweep's name (its parent run); default: the latest sweep"
    )
    parser.add_argument("--view", choices=["compare", "chart", "table"], default="compare")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--window", default="1600,1000", help="width,height in pixels")
    parser.add_argument(
        "--budget-ms", type=int, default=20_000, help="Chromium's virtual-time budget for the page"
    )
    parser.add_argument("--server-log", type=Path, default=None, help="write the mlflow server's output here")
    args = parser.parse_args(argv)
    try:
        from pipeline.tracking import tracking_uri

        params = load_params(args.params)
        uri = args.tracking_uri or tracking_uri(params.mlflow.tracking_uri)
        experiment_id, parent_id, children = sweep_runs(
            uri, args.experiment or params.tune.experiment_name, args.sweep
        )
        width, height = (int(part) for part in args.window.split(","))
        with mlflow_ui(uri, args.server_log) as base:
            url = view_url(base, args.view, experiment_id, parent_id, children)
            out = screenshot(url, args.out, (width, height), args.budget_ms)
    except (ConfigError, StageError, ValueError, subprocess.SubprocessError) as error:
        print(f"ui_screenshot: {error}", file=sys.stderr)
        return 1
    print(f"[ui_screenshot] {args.view} view of {len(children)} trials ({url}) saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
