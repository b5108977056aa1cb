"""Attack tests of the trust boundaries that need no cluster (the threat model: infra/SECURITY.md). Each
performs the attack against the real running component and fails without its fix; the attacks that need the
team cluster (secrets on command lines, the pipeline's MLflow account) are in tests/test_team_deployment.py.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError

from infra.cluster.s3_server import is_admin_request


def _request(url: str, method: str = "GET", host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


ADMIN_CALLS = [
    ("GET", "/moto-api/data.json", None),  # every backend's state, the IAM user's secret key among it
    ("POST", "/moto-api/reset-auth", None),  # turns request signing off
    ("POST", "/moto-api/reset", None),  # wipes every bucket
    ("POST", "//moto-api/./reset", None),
    ("POST", "/x/../moto-api/reset", None),
    ("POST", "/MOTO-API/reset", None),
    ("GET", "/moto-api/data.json", "motoapi.amazonaws.com"),
]


@pytest.mark.parametrize(("method", "path", "host"), ADMIN_CALLS)
def test_the_s3_endpoints_admin_api_is_refused_to_anyone(s3_server, method, path, host):
    """Anyone who reaches the S3 endpoint (any local user; with --hosts any host on the bridge) tries moto's
    admin API: no keys come back, signing stays on, the bucket keeps its objects."""
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="canary", Body=b"kept")
    status, body = _request(s3_server.endpoint + path, method, host)
    assert status == 403, (status, body[:200])
    assert s3_server.secret_key.encode() not in body
    assert client.get_object(Bucket=s3_server.bucket, Key="canary")["Body"].read() == b"kept"
    intruder = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                            aws_access_key_id="AKIAINTRUDER", aws_secret_access_key="guess")
    with pytest.raises(ClientError) as refused:
        intruder.list_objects_v2(Bucket=s3_server.bucket)
    assert refused.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "SignatureDoesNotMatch")


def test_the_filter_passes_s3_requests_whose_keys_merely_look_alike():
    """Only the admin API's path segment and host are refused: S3 keys such as ``moto-api-notes.txt`` pass."""
    assert not is_admin_request({"PATH_INFO": "/vae/moto-api-notes.txt", "HTTP_HOST": "127.0.0.1:9000"})
    assert not is_admin_request({"PATH_INFO": "/vae/runs/a/checkpoint.pt", "HTTP_HOST": "127.0.0.1:9000"})
    assert is_admin_request({"PATH_INFO": "/vae/../moto-api/reset", "HTTP_HOST": "127.0.0.1:9000"})


# ------------------------------------------------------------------- folders another local user made first
def _planted(tmp_path, kind: str):
    """A folder, link or world-writable folder where Ray's temp root will be (a short path: Ray's sockets
    must fit 107 bytes)."""
    import os
    import shutil

    planted = tmp_path / "r"
    if kind == "symlink":
        (tmp_path / "attackers").mkdir()
        planted.symlink_to(tmp_path / "attackers")
    else:
        planted.mkdir()
        if kind == "world-writable":
            os.chmod(planted, 0o777)
        else:
            shutil.chown(planted, "nobody")
    return planted


@pytest.mark.parametrize("kind", ["another-user", "symlink", "world-writable"])
def test_a_ray_temp_folder_someone_else_made_is_refused_before_anything_starts(tmp_path, kind):
    """Ray keeps its sockets and logs under /tmp/vaeray-<port> (a predictable name): another local user who
    makes that folder first must not get root's Ray to use it."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from infra.cluster import ClusterError, ClusterSettings, LocalCluster
    from tests.cluster_helpers import free_base_port

    if kind == "another-user" and os.geteuid() != 0:
        pytest.skip("making a folder of another user needs root (CI runs as root)")
    short = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    planted = _planted(short, kind)
    cluster = LocalCluster(ClusterSettings(state_dir=tmp_path / "state", ray_temp_root=planted,
                                           base_port=free_base_port(), num_workers=0, mlflow=False))
    try:
        with pytest.raises(ClusterError, match="is not this cluster's") as refused:
            cluster.up()
        assert str(planted) in str(refused.value) and "--ray-temp-root" in str(refused.value)
        assert not cluster.processes() and not cluster.state_path.exists()
    finally:
        cluster.down()
        shutil.rmtree(short, ignore_errors=True)


def test_the_postgres_folder_under_var_tmp_is_unpredictable_and_a_planted_one_is_never_adopted(tmp_path):
    """As root, PostgreSQL's data live under /var/tmp when the postgres user cannot reach the state folder.
    A folder planted there (PG_VERSION and a `trust` pg_hba.conf: a passwordless superuser) must not be
    adopted, nor a link to it."""
    import hashlib
    import os
    import pwd
    import shutil
    import stat

    from infra.cluster import postgres
    from infra.cluster.services import ServiceError

    if os.geteuid() != 0:
        pytest.skip("the /var/tmp folder is used as root only (CI runs as root)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user: PostgreSQL is not installed")
    state = tmp_path / "private"
    state.mkdir(mode=0o700)
    wanted = state / "postgres"
    old_name = postgres.DATA_PARENT / f"vae-postgres-{hashlib.sha256(str(wanted).encode()).hexdigest()[:12]}"
    old_name.mkdir(exist_ok=True)
    (old_name / "PG_VERSION").write_text("16\n")
    (old_name / "pg_hba.conf").write_text("host all all 0.0.0.0/0 trust\n")
    made = None
    try:
        made = postgres.postgres_data_dir(wanted)
        assert made != old_name and made.parent == postgres.DATA_PARENT and not (made / "PG_VERSION").exists()
        info = os.lstat(made)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == pwd.getpwnam("postgres").pw_uid
        assert wanted.resolve() == made and postgres.postgres_data_dir(wanted) == made  # its own, kept
        wanted.unlink()
        wanted.symlink_to(old_name)  # a link to the planted folder
        with pytest.raises(ServiceError, match="not a private PostgreSQL folder"):
            postgres.postgres_data_dir(wanted)
    finally:
        shutil.rmtree(old_name, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


# ---------------------------------------------------------------------------------- the bucket writer
class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("reader", ["local", "filesystem"])
def test_a_crafted_checkpoint_in_run_storage_runs_no_code_when_a_run_resumes(tmp_path, reader):
    """Whoever can write run storage (the bucket) can replace a checkpoint; resuming must refuse a file that
    carries code instead of running it (``weights_only=True``)."""
    import pickle

    import pyarrow.fs as pafs
    import torch

    from pipeline import checkpoints

    marker = tmp_path / "owned"
    folder = tmp_path / "checkpoint_epoch_000001"
    folder.mkdir()
    torch.save({"model": _Payload(str(marker))}, folder / checkpoints.CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        if reader == "local":
            checkpoints.load_state(folder)
        else:
            checkpoints.read_persisted_state(pafs.LocalFileSystem(), str(folder))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ TLS
@pytest.mark.slow
def test_the_mlflow_server_over_https_is_verified_with_the_clusters_ca(tmp_path_factory, monkeypatch):
    """`up --tls`: the tracking server speaks HTTPS only; a client that verifies with the cluster's CA (as
    env.sh sets it) logs a run; one that trusts only the system's CAs is refused, and plain HTTP gets no
    answer from the server."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tests.cluster_helpers import local_cluster

    with local_cluster(tmp_path_factory.mktemp("tls"), num_workers=0, tls=True) as cluster:
        env = cluster.client_env()
        assert cluster.mlflow_url.startswith("https://") and env["MLFLOW_TRACKING_URI"] == cluster.mlflow_url
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", env["MLFLOW_TRACKING_SERVER_CERT_PATH"])
        client = mlflow.MlflowClient(tracking_uri=cluster.mlflow_url)
        run = client.create_run(client.create_experiment("over-https"))
        client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        with pytest.raises(MlflowException, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            mlflow.MlflowClient(tracking_uri=cluster.mlflow_url).search_experiments()
        plain = cluster.mlflow_url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(plain + "/health", timeout=5).read()
        assert cluster.processes("mlflow") and cluster.mlflow_healthy()  # the plain request did not hurt it


@pytest.mark.slow
def test_the_team_kuberay_mlflow_command_serves_https_that_only_its_ca_verifies(tmp_path):
    """The team MLflow Deployment's own command (infra/kuberay/team/mlflow.yaml), run here with what its pod
    would have: the Secret's tls.crt / tls.key / ca.crt (a CA and a certificate for 127.0.0.1 made for the
    test) and the auth config at stand-ins for their mounted paths, a SQLite store instead of PostgreSQL,
    127.0.0.1 and a free port instead of 0.0.0.0:5000. A client that verifies with the CA (as the Ray pods'
    MLFLOW_TRACKING_SERVER_CERT_PATH) logs in; a request without the password gets 401; one that trusts only
    the system's CAs is refused at the handshake; plain HTTP gets no answer."""
    import configparser
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests
    import yaml

    from infra.cluster import tls

    repo = Path(__file__).resolve().parent.parent
    docs = list(yaml.safe_load_all((repo / "infra/kuberay/team/mlflow.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (script,) = container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    ca, cert, key = tls.server_certificate(tmp_path / "tls", ["127.0.0.1"], "kuberay-team-test")
    secret = tmp_path / "mlflow-tls"
    secret.mkdir()
    for source, name in ((cert, "tls.crt"), (key, "tls.key"), (ca, "ca.crt")):
        shutil.copy(source, secret / name)
    auth = configparser.ConfigParser()
    auth["mlflow"] = {
        "default_permission": "READ", "database_uri": f"sqlite:///{tmp_path / 'auth.db'}",
        "admin_username": "admin", "admin_password": "a-long-test-password-1",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    (tmp_path / "mlflow-auth").mkdir()
    with open(tmp_path / "mlflow-auth" / "basic_auth.ini", "w") as handle:
        auth.write(handle)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = (script.replace(mounts["tls"], str(secret)).replace("--host 0.0.0.0", "--host 127.0.0.1")
               .replace("--port 5000", f"--port {port}"))
    assert str(secret / "tls.crt") in command and str(secret / "tls.key") in command
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-flask-key",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "mlflow-auth" / "basic_auth.ini")}
    url = f"https://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen(["sh", "-c", command], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", verify=str(secret / "ca.crt"), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        answer = requests.get(search, verify=str(secret / "ca.crt"), auth=("admin", "a-long-test-password-1"))
        assert answer.status_code == 200, answer.text
        assert requests.get(search, verify=str(secret / "ca.crt")).status_code == 401
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{url}/health", timeout=5)  # the system's CAs only
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn's workers may wait for idle keep-alive connections
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_the_team_ray_up_head_serves_mlflow_over_https_that_the_workers_verify(tmp_path):
    """infra/ray-up/aws-team.yaml's own start commands, run here in bash: the head's (MLflow's auth config,
    its certificate signed with the team CA, the server) and the worker's (the CA's certificate), with an
    `aws` stand-in on PATH that answers `secretsmanager get-secret-value` from a table (a SQLite store instead
    of RDS), the test's folder for /tmp/, 127.0.0.1 for the head's address and a free port for 5000. A client
    verifying with the worker's file logs in; without the password it gets 401; trusting only the system's CAs
    it is refused at the handshake; the CA's key is in no file the commands wrote."""
    import configparser
    import io
    import json
    import os
    import socket
    import stat
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    import requests
    import yaml

    from infra.cluster.tls import new_ca_json

    repo = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((repo / "infra/ray-up/aws-team.yaml").read_text())
    head = [c for c in config["head_start_ray_commands"]
            if any(k in c for k in ("> /tmp/basic_auth.ini", "mlflow_tls issue", "mlflow server"))]
    (worker,) = [c for c in config["worker_start_ray_commands"] if "vae/mlflow-ca-cert" in c]
    assert len(head) == 3
    # The ray start lines point MLflow's client at the https URL and at the CA file their node wrote.
    issued = re.search(r"--out (\S+)", next(c for c in head if "mlflow_tls issue" in c)).group(1)
    fetched = re.search(r"> (\S+)$", worker.strip()).group(1)
    for start, ca_path in ((config["head_start_ray_commands"][-1], f"{issued}/ca.pem"),
                           (config["worker_start_ray_commands"][-1], fetched)):
        assert "MLFLOW_TRACKING_URI=https://" in start
        assert f"MLFLOW_TRACKING_SERVER_CERT_PATH={ca_path}" in start
    ca = new_ca_json("test team CA")
    auth = configparser.ConfigParser()
    auth["mlflow"] = {
        "default_permission": "READ", "database_uri": f"sqlite:///{tmp_path / 'auth.db'}",
        "admin_username": "admin", "admin_password": "a-long-test-password-2",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    ini = io.StringIO()
    auth.write(ini)
    secrets_table = {
        "vae/mlflow-auth-ini": ini.getvalue(), "vae/mlflow-db": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "vae/mlflow-flask-key": "test-flask-key", "vae/mlflow-ca": ca,
        "vae/mlflow-ca-cert": json.loads(ca)["cert"],
    }
    (tmp_path / "secrets.json").write_text(json.dumps(secrets_table))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[:2] == ['secretsmanager', 'get-secret-value'], args\n"
        "assert args[-2:] == ['--output', 'text'], args\n"
        f"print(json.load(open({str(tmp_path / 'secrets.json')!r}))[args[args.index('--secret-id') + 1]])\n")
    (bin_dir / "aws").chmod(0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def here(command: str) -> str:
        return (command.replace("/tmp/", f"{tmp_path}/")
                .replace("$(hostname -I | awk '{print $1}')", "127.0.0.1")
                .replace("--port 5000", f"--port {port}").replace("PYTHONPATH=/app", f"PYTHONPATH={repo}"))

    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for command in [*head, worker]:
        done = subprocess.run(["bash", "-c", here(command)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    server = psutil.Process(int((tmp_path / "mlflow.pid").read_text()))
    try:
        ca_file = str(tmp_path / "vae-mlflow-ca.pem")  # what a worker verifies with
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", verify=ca_file, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.is_running() and time.monotonic() < deadline, \
                (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        admin = ("admin", "a-long-test-password-2")
        assert requests.get(search, verify=ca_file, auth=admin).status_code == 200
        assert requests.get(search, verify=ca_file).status_code == 401
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{url}/health", timeout=5)
        key_file = tmp_path / "vae-mlflow-tls" / "mlflow-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        ca_key = json.loads(ca)["key"].strip().splitlines()[1]
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "secrets.json"]
        assert not [p for p in written if ca_key.encode() in p.read_bytes()]
    finally:
        family = [server, *server.children(recursive=True)]
        for process in family:
            process.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for process in alive:
            process.kill()
