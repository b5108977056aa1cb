"""The team deployment's S3 endpoint (infra/cluster/s3_server.py) as a store a run can rely on: every write
it acknowledged survives SIGKILL of the endpoint (objects, metadata, ETags, deletions), a restart keeps the
key pair running jobs hold, and no request is served unsigned - not even the first."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import threading

import boto3
import psutil
import pyarrow.fs as pafs
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from pipeline import storage_access
from tests.fixtures.s3 import s3_server

MiB = 1024 * 1024


@pytest.fixture
def endpoint(tmp_path):
    with s3_server(tmp_path) as server:
        yield server


def snapshot(client, bucket: str) -> dict[str, tuple[bytes, str, dict, str]]:
    """key -> (bytes, ETag, user metadata, content type) of every object in ``bucket``."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=item["Key"])
            found[item["Key"]] = (got["Body"].read(), got["ETag"], got["Metadata"], got["ContentType"])
    return found


def test_every_acknowledged_write_survives_a_killed_endpoint(endpoint):
    """Writes of each kind the pipeline makes (PutObject with metadata, a multipart upload as boto3 and MLflow
    make for large files, CopyObject, pyarrow's writes as Ray's checkpoints make, DeleteObject,
    DeleteObjects, keys that are not paths), then SIGKILL the moment the last one is acknowledged: the
    restarted endpoint serves exactly the acknowledged state, to the same key pair."""
    client, bucket = endpoint.client(), endpoint.bucket
    client.put_object(Bucket=bucket, Key="runs/a/params.json", Body=b'{"beta": 1}',
                      ContentType="application/json", Metadata={"sha256": "abc"})
    big = os.urandom(11 * MiB)
    client.upload_fileobj(io.BytesIO(big), bucket, "runs/a/checkpoint/model.pt",
                          Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    client.copy_object(Bucket=bucket, Key="runs/b/params.json",
                       CopySource={"Bucket": bucket, "Key": "runs/a/params.json"})
    filesystem = pafs.S3FileSystem(endpoint_override=endpoint.endpoint.split("://")[1], scheme="http",
                                   region="us-east-1", access_key=endpoint.access_key,
                                   secret_key=endpoint.secret_key)
    with filesystem.open_output_stream(f"{bucket}/runs/a/checkpoint/state.json") as out:
        out.write(b'{"epoch": 3}')
    for key in ("a/", "a/b", "a/../c", "unicode/é+ü space", "gone/1", "gone/2", "gone/3"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    client.put_object(Bucket=bucket, Key="a/b", Body=b"second version")  # overwritten
    client.delete_object(Bucket=bucket, Key="gone/1")
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "gone/2"}, {"Key": "gone/3"}]})
    before = snapshot(client, bucket)
    endpoint.kill()

    endpoint.start()
    after = snapshot(endpoint.client(), bucket)
    assert sorted(after) == sorted(before) and "gone/1" not in after and "gone/2" not in after
    assert after == before  # bytes, ETags (the multipart "-3" one too), metadata, content types
    model = "runs/a/checkpoint/model.pt"
    assert after[model][0] == big and before[model][1].endswith('-3"')
    assert after["a/b"][0] == b"second version"
    with filesystem.open_input_stream(f"{bucket}/runs/a/checkpoint/state.json") as read:
        assert read.read() == b'{"epoch": 3}'


def test_an_interrupted_write_and_a_deleted_bucket_leave_nothing_behind(endpoint):
    """A temporary file of a write the endpoint died in is ignored at the next start; a deleted bucket is
    gone after a restart."""
    client = endpoint.client()
    client.put_object(Bucket=endpoint.bucket, Key="kept", Body=b"1")
    client.create_bucket(Bucket="scratch")
    client.put_object(Bucket="scratch", Key="x", Body=b"2")
    client.delete_object(Bucket="scratch", Key="x")
    client.delete_bucket(Bucket="scratch")
    (endpoint.store / endpoint.bucket / ".half-written.tmp").write_bytes(b"{not json")
    endpoint.kill()
    endpoint.start()
    client = endpoint.client()
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [endpoint.bucket]
    assert list(snapshot(client, endpoint.bucket)) == ["kept"]


def test_no_request_is_served_unsigned_not_even_the_first(tmp_path):
    """An attacker who reaches a freshly started endpoint before anyone else tries the unsigned calls that
    would make them a user (moto's INITIAL_NO_AUTH_ACTION_COUNT window) and an unsigned bucket listing: all
    refused. The key pair is in a 0600 file, never on the endpoint's command line."""
    with s3_server(tmp_path) as server:
        intruder = {"endpoint_url": server.endpoint, "region_name": "us-east-1",
                    "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        with pytest.raises(ClientError) as refused:
            boto3.client("iam", **intruder).create_user(UserName="intruder")
        assert refused.value.response["Error"]["Code"] in ("InvalidClientTokenId", "InvalidAccessKeyId",
                                                          "SignatureDoesNotMatch"), refused.value.response
        with pytest.raises(ClientError):
            boto3.client("s3", **intruder).list_objects_v2(Bucket=server.bucket)
        keys_file = tmp_path / "key.json"
        assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
        assert json.loads(keys_file.read_text())["aws_secret_access_key"] == server.secret_key
        command_line = " ".join(psutil.Process(server.process.pid).cmdline())
        assert server.secret_key not in command_line and server.access_key not in command_line
        assert server.client().list_objects_v2(Bucket=server.bucket)["KeyCount"] == 0


def test_a_filesystem_sent_to_another_process_waits_for_a_restarting_endpoint(endpoint, monkeypatch):
    """Ray pickles the run's storage filesystem to its Train controller and workers. Pickled and unpickled,
    it still retries patiently: a checkpoint write while the endpoint is down (killed, back 4 s later)
    succeeds once the endpoint is back, instead of failing after pyarrow's default three quick attempts."""
    for key, value in endpoint.env().items():
        monkeypatch.setenv(key, value)
    filesystem, path = storage_access.filesystem(f"s3://{endpoint.bucket}/runs/pickled")
    unpickled = pickle.loads(pickle.dumps(filesystem))
    endpoint.kill()
    restart = threading.Timer(4.0, endpoint.start)
    restart.start()
    try:
        with unpickled.open_output_stream(f"{path}/checkpoint_manager_snapshot.json") as out:
            out.write(b'{"epoch": 2}')
    finally:
        restart.join()
    got = endpoint.client().get_object(Bucket=endpoint.bucket,
                                       Key="runs/pickled/checkpoint_manager_snapshot.json")
    assert got["Body"].read() == b'{"epoch": 2}'
