"""The team deployment's generated secrets: written with mode 0600 from the first byte, kept across
``down``/``up`` (so the kept PostgreSQL data and MLflow accounts stay usable), and redacted from every command
line the state file or a log shows. Plain files and :mod:`secrets`: a secrets manager would be one more
service to run on a laptop, and the cloud shapes take these from Kubernetes Secrets instead."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte (secrets: passwords, keys), atomically
    (a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    tmp.replace(path)


def credentials(path: Path) -> dict[str, str]:
    """The deployment's generated secrets (the PostgreSQL password, the MLflow admin's and the pipeline
    account's passwords, the Flask secret), created once and kept (mode 0600; one missing from an older file
    is added); plus the S3 key pair (s3_endpoint.py: new on each `up` of a stopped cluster)."""
    values = json.loads(path.read_text()) if path.is_file() else {}
    generated = {
        "postgres_password": lambda: secrets.token_urlsafe(18),
        "mlflow_admin_password": lambda: secrets.token_urlsafe(18),
        "mlflow_pipeline_password": lambda: secrets.token_urlsafe(18),
        "flask_secret_key": lambda: secrets.token_hex(24),
    }
    missing = {name: make() for name, make in generated.items() if name not in values}
    if missing:
        values.update(missing)
        write_private(path, json.dumps(values, indent=2) + "\n")
    return values


def update_credentials(path: Path, values: dict[str, str]) -> dict[str, str]:
    """Merge ``values`` into the secrets file; returns the merged secrets."""
    merged = {**credentials(path), **values}
    write_private(path, json.dumps(merged, indent=2) + "\n")
    return merged


def redact(command: list[str], creds: dict[str, Any]) -> list[str]:
    """``command`` with every generated secret (plain or URL-quoted) replaced by ***, for logs and the state
    file."""
    secrets_ = [str(v) for v in creds.values()] + [quote(str(v), safe="") for v in creds.values()]
    out = []
    for part in command:
        for secret in secrets_:
            part = part.replace(secret, "***")
        out.append(part)
    return out
