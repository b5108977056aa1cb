"""moto's S3 server without its admin API: ``python -m infra.cluster.s3_server -H HOST -p PORT``.

moto's standalone server (``python -m moto.server``) also serves ``/moto-api/``, an unauthenticated admin API
meant for tests: ``GET /moto-api/data.json`` returns every backend's state (the IAM user's secret access key
among it), ``POST /moto-api/reset-auth`` turns request signing off and ``POST /moto-api/reset`` wipes every
bucket. Anyone who can reach the endpoint could take the keys or delete the data. This entry point serves the
same application behind a WSGI filter that answers 403 to any request for that API - by path (any path with a
``moto-api`` segment, however spelled with extra slashes or dots) or by the admin API's host name
(``motoapi.amazonaws.com``) - before moto sees it. Everything else (S3, and IAM for the three unsigned
provisioning calls) is moto's, unchanged.
"""

from __future__ import annotations

import argparse
import posixpath
import signal
import sys
from typing import Any

ADMIN_PATH_SEGMENT = "moto-api"
ADMIN_HOST = "motoapi."


def is_admin_request(environ: dict[str, Any]) -> bool:
    """Whether a WSGI request would reach moto's admin API (``/moto-api/...`` or its host name)."""
    path = posixpath.normpath("/" + environ.get("PATH_INFO", "").replace("\\", "/")).lower()
    host = environ.get("HTTP_HOST", "").lower()
    return ADMIN_PATH_SEGMENT in path.split("/") or host.startswith(ADMIN_HOST)


class WithoutAdminApi:
    """WSGI middleware: 403 for :func:`is_admin_request`, else the wrapped application."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if is_admin_request(environ):
            body = b"moto's admin API is not served by this S3 endpoint\n"
            start_response(
                "403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return self.app(environ, start_response)


def main(argv: list[str] | None = None) -> None:
    """Serve moto's application, filtered, on ``--host``:``--port`` (threaded, as moto.server does)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(
        prog="python -m infra.cluster.s3_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = WithoutAdminApi(DomainDispatcherApplication(create_backend_app))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
