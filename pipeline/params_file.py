"""Where the params come from: the repository's ``params.yaml``, the file ``VAE_PARAMS`` names, or one on
object storage (a job on a cluster whose nodes share no folder), read once per stage with dotted overrides
applied, into the typed :class:`pipeline.config.Params`. What the settings are, their defaults and their
validation are ``pipeline.config``'s, which thus needs no object storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage, storage_access
from pipeline.common import REPO_ROOT
from pipeline.config import ConfigError, Params, parse_params, set_dotted

DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


def load_params(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml`` (``VAE_PARAMS`` env var or the repo's file by default).

    Args:
        path: the YAML file, or a URI (``s3://bucket/params/train.yaml``: a job on a cluster whose nodes share
            no folder reads its params from the object store; endpoint from ``AWS_ENDPOINT_URL``).
        overrides: dotted keys to set after loading, e.g. ``{"train.epochs": 2}`` (used by tests and Tune).
    Raises:
        ConfigError: missing file, invalid YAML, unknown key or invalid value.
    """
    source = str(path or os.environ.get("VAE_PARAMS") or DEFAULT_PARAMS)
    try:
        if storage_access.is_uri(source):
            text = storage.read_bytes(source, patient=False).decode()
        elif Path(source).is_file():
            text = Path(source).read_text()
        else:
            raise FileNotFoundError(source)
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such params file; copy the repository's params.yaml or pass its path"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (data, model, train, ...)")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_params(raw, source)
