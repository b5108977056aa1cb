"""The stages' command line: ``python -m pipeline.<stage> [--params PATH]``, expected failures turned into
exit status 1 with a one-line message, Ctrl-C into 130."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipeline.common import StageError
from pipeline.config import Params
from pipeline.params_file import load_params

# (module, params, --params path, the stage's work) -> exit status: pipeline.submit.run_or_submit's shape,
# handed in by the data stages (this module sits beside pipeline.submit, not above it).
Submitter = Callable[[str, Params, Any, Callable[[Params], None]], int]


def log_to_stderr(logger: logging.Logger) -> None:
    """A data stage's progress messages on stderr, one per line (unless logging was configured already)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)


def stage_argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every stage shares: ``python -m <module> [--params PATH]`` (the first paragraph of the
    module docstring as the description)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--params", default=None,
                        help="params.yaml to read, a path or an s3:// URI (default: $VAE_PARAMS or the "
                        "repository's params.yaml)")
    return parser


def run_stage(name: str, body: Callable[[], int | None], interrupted: str | None = None) -> int:
    """Run a stage's ``main`` body and turn its expected failures into an exit status.

    An expected failure (a :class:`StageError` of any kind - bad params, a data, cluster or submission error -
    or a missing file) prints "<name> failed: <message>" on stderr, without a traceback, and returns 1. Ctrl-C
    returns 130 after printing ``interrupted`` (what was kept), when given. Anything else is a bug and
    propagates with its traceback.

    Returns:
        The body's exit status (None counts as 0), 1 or 130.
    """
    try:
        return body() or 0
    except (StageError, FileNotFoundError) as error:
        print(f"\n{name} failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\n{name} interrupted: {interrupted}", file=sys.stderr)
        return 130


def data_stage_main(module: str, doc: str | None, argv: list[str] | None, run: Callable[[Params], Any],
                    logger: logging.Logger, *, interrupted: str, submit: Submitter | None = None) -> int:
    """The ``main`` of a data stage: parse ``--params``, log progress to stderr, ``run(params)`` - or, given
    ``submit`` (:func:`pipeline.submit.run_or_submit`), let it decide whether to run here or as a Ray job."""
    args = stage_argument_parser(module, doc).parse_args(argv)
    log_to_stderr(logger)
    def work(params: Params) -> None:
        run(params)  # (its result, a path or a manifest, is not an exit status)

    def body() -> int | None:
        params = load_params(args.params)
        return submit(module, params, args.params, work) if submit else work(params)

    return run_stage(module.rsplit(".", 1)[-1], body, interrupted=interrupted)
