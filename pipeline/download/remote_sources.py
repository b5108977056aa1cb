"""The sources that fetch over the network: Google Drive, Kaggle and the MNIST-family mirrors over HTTP(S)
through gdown (resumable ``.part`` files, retried with backoff), and the Hugging Face Hub through its own
client (probed first, so that without a network it is given up at once). Each turns every failure into a
one-line SourceError, and a source it cannot reach at all into ``_SourceUnreachable`` (skipped for the
remaining files); what a source is and how its copy is verified are ``pipeline.download.sources``'.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import datasets as ds
from pipeline.archives import celeba_image_entries
from pipeline.datasets import DataStageError, RemoteFile

if TYPE_CHECKING:
    from pipeline.config import DownloadConfig

from pipeline.download.checks import (
    SourceError,
    _chain,
    _connection_problem,
    _http_status,
    _is_dns_failure,
    _retrying,
    _short,
    _SourceUnreachable,
    _write_celeba_zip,
    describe_html,
    file_md5,
    sniff_html,
)
from pipeline.download.sources import Fetched, Source, _md5_mismatch

log = logging.getLogger("pipeline.download")


class _HttpSource(Source):
    """Downloads over HTTP(S) with gdown: resumable (Range + If-Range on the kept ``.part`` file), with
    progress."""

    def _download(self, url: str, target: Path, what: str, *, use_cookies: bool = False) -> None:
        import gdown
        import gdown.exceptions
        import requests

        target.parent.mkdir(parents=True, exist_ok=True)
        if (
            target.exists()
        ):  # gdown would return an existing file unchecked: start over (a .part file resumes)
            target.unlink()
        quiet = not sys.stderr.isatty()
        log.info("    %s: GET %s", self.name, url)
        try:
            for attempt in _retrying(self.config, f"{self.name} {what}"):
                with attempt:
                    try:
                        gdown.download(
                            url,
                            str(target),
                            quiet=quiet,
                            resume=True,
                            use_cookies=use_cookies,
                            timeout=self.config.timeout_s,
                            retries=0,
                        )
                    except gdown.exceptions.DownloadError as error:
                        if "did not honor" in str(error):  # the server ignored Range: restart from byte 0
                            for part in target.parent.glob(f"{target.name}*.part"):
                                part.unlink()
                        raise
        except gdown.exceptions.FileURLRetrievalError as error:
            page = describe_html(f"<html>{error}</html>".encode())
            raise SourceError(f"Google Drive answered with {page} instead of {what}") from None
        except Exception as error:  # noqa: BLE001 - every failure of one source becomes a one-line reason
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} for {url}") from None
            if isinstance(error, requests.exceptions.ConnectionError) or _is_dns_failure(error):
                self.unreachable = f"cannot connect to {_host(url)}: {_connection_problem(error, _host(url))}"
                raise _SourceUnreachable(self.unreachable) from None
            raise SourceError(
                f"{_short(error)} ({url}); the partial download is kept and resumed next time"
            ) from None


def _host(url: str) -> str:
    match = re.match(r"^[a-z]+://([^/]+)", url)
    return match.group(1) if match else url


class GoogleDriveSource(_HttpSource):
    """The official files on Google Drive (torchvision's file ids), through gdown (confirm tokens,
    cookies)."""

    name = "gdrive"
    pin_key = "gdrive"

    def fetch(self, spec: RemoteFile) -> Fetched:
        if not spec.gdrive_id:
            raise SourceError(f"no Google Drive id for {spec.name}")
        target = self.staging / spec.name
        self._download(
            self.config.gdrive_url.format(file_id=spec.gdrive_id), target, spec.name, use_cookies=True
        )
        return self.verify(target, spec)


class KaggleSource(_HttpSource):
    """Kaggle's CelebA archive: the images (in ``img_align_celeba/img_align_celeba/``) and CSV annotations.

    Only ``img_align_celeba.zip`` comes from here: the archive is verified by its md5 pinned in
    ``download.pinned_md5.kaggle`` (Kaggle publishes no checksum), then its images are repacked into the
    official layout. Its CSV files are not the official .txt files and it has no identity file.
    """

    name = "kaggle"
    pin_key = "kaggle"

    @property
    def archive_name(self) -> str:
        return self.config.kaggle_dataset.split("/")[-1] + ".zip"

    def fetch(self, spec: RemoteFile) -> Fetched:
        if spec.name != ds.CELEBA_ZIP:
            raise SourceError(
                f"the Kaggle archive has no {spec.name} (it ships CSV versions of some annotations)"
            )
        archive = self.staging / self.archive_name
        pinned = self.config.pinned_md5.get("kaggle", {}).get(self.archive_name)
        if not (archive.is_file() and pinned and file_md5(archive) == pinned):
            url = self.config.kaggle_url.format(dataset=self.config.kaggle_dataset)
            self._download(url, archive, self.archive_name)
            page = sniff_html(archive)
            if page:
                archive.unlink()
                raise SourceError(f"got {page} instead of {self.archive_name}")
            md5 = file_md5(archive, f"md5 {self.archive_name}")
            if md5 != pinned:
                archive.unlink()
                raise SourceError(_md5_mismatch(self.archive_name, md5, None, "kaggle", pinned))
        target = self.staging / ds.CELEBA_ZIP
        try:
            with zipfile.ZipFile(archive) as zf:
                prefixes = {
                    i.filename.rsplit("/", 1)[0] + "/"
                    for i in zf.infolist()
                    if re.search(r"(^|/)img_align_celeba/[^/]+\.jpg$", i.filename, re.I)
                }
                if len(prefixes) != 1:
                    raise SourceError(
                        f"{self.archive_name} has no single img_align_celeba/ image folder "
                        f"(found {sorted(prefixes)[:3]})"
                    )
                entries = celeba_image_entries(zf, self.archive_name, prefixes.pop())
                _write_celeba_zip({n: (lambda i=i: zf.open(i)) for n, i in entries.items()}, target)
        except zipfile.BadZipFile as error:
            archive.unlink(missing_ok=True)
            raise SourceError(f"{self.archive_name} is not a valid zip ({error})") from None
        except DataStageError as error:
            raise SourceError(str(error)) from None
        return Fetched(
            target,
            file_md5(target),
            f"repacked from Kaggle's {self.archive_name}, md5 {pinned} pinned in download.pinned_md5.kaggle",
            {"kind": "repacked", "pin": ["kaggle", self.archive_name, pinned]},
        )


class HuggingFaceSource(Source):
    """A Hugging Face Hub dataset repo with the official files, through ``huggingface_hub.hf_hub_download``
    (resumable ``.incomplete`` files, its own retries with backoff, progress bars; ``HF_TOKEN`` for gated
    repos).

    The endpoint is probed first with a plain TCP connection (retried with our backoff), so that with no
    network the source is given up at once instead of after the Hub client's own ~25 s of retries for every
    file.
    """

    name = "huggingface"
    pin_key = "huggingface"

    def describe(self) -> str:
        return f"huggingface ({self.config.huggingface_repo}@{self.config.huggingface_revision})"

    @property
    def endpoint(self) -> str:
        return (
            self.config.huggingface_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        ).rstrip("/")

    def _probe(self) -> None:
        import socket
        import urllib.parse
        import urllib.request

        url = urllib.parse.urlsplit(self.endpoint)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return  # a proxy decides what is reachable
        try:
            for attempt in _retrying(self.config, f"huggingface connect {host}:{port}"):
                with attempt:
                    socket.create_connection((host, port), timeout=min(self.config.timeout_s, 10)).close()
        except OSError as error:
            self.unreachable = f"cannot reach {self.endpoint}: {_connection_problem(error, host)}"
            raise _SourceUnreachable(self.unreachable) from None

    def fetch(self, spec: RemoteFile) -> Fetched:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download

        config = self.config
        repo = f"{config.huggingface_repo}@{config.huggingface_revision}"
        path_in_repo = f"{config.huggingface_subfolder.strip('/')}/{spec.name}".lstrip("/")
        self._probe()
        log.info(
            "    huggingface: %s/datasets/%s/resolve/%s/%s",
            self.endpoint,
            config.huggingface_repo,
            config.huggingface_revision,
            path_in_repo,
        )
        try:
            path = Path(
                hf_hub_download(
                    config.huggingface_repo,
                    path_in_repo,
                    repo_type="dataset",
                    revision=config.huggingface_revision,
                    local_dir=self.staging,
                    endpoint=config.huggingface_endpoint,
                    etag_timeout=config.timeout_s,
                )
            )
        except hf_errors.LocalEntryNotFoundError as error:  # the Hub client's word for "could not connect"
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} from {self.endpoint} for {repo}/{path_in_repo}") from None
            cause = next((e for e in _chain(error) if e is not error), error)
            raise SourceError(f"cannot download from {self.endpoint} ({_short(cause)})") from None
        except (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError):
            raise SourceError(f"{repo} has no file {path_in_repo}") from None
        except hf_errors.GatedRepoError:
            raise SourceError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
        except hf_errors.RepositoryNotFoundError:
            raise SourceError(f"dataset repo {repo} not found (or private: set HF_TOKEN)") from None
        except hf_errors.RevisionNotFoundError:
            raise SourceError(f"{repo}: no such revision") from None
        except Exception as error:  # noqa: BLE001 - every failure of one source becomes a one-line reason
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} from the Hub for {repo}/{path_in_repo}") from None
            raise SourceError(
                f"{_short(error)}; the partial download is kept and resumed next time"
            ) from None
        return self.verify(path, spec)


class MirrorSource(_HttpSource):
    """A base URL holding the MNIST-family IDX ``.gz`` files (the usual S3/GCS mirrors)."""

    name = "mirror"
    pin_key = "mirror"

    def __init__(self, config: DownloadConfig, staging: Path, base_url: str, index: int):
        super().__init__(config, staging)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.staging = staging / f"mirror{index}"

    def describe(self) -> str:
        return f"mirror {self.base_url}"

    def fetch(self, spec: RemoteFile) -> Fetched:
        target = self.staging / spec.name
        self._download(self.base_url + spec.name, target, spec.name)
        return self.verify(target, spec)
