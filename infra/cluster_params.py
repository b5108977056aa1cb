"""Write the params file for a cluster run: the repository's params.yaml with cluster overrides on top.

    python infra/cluster_params.py infra/kuberay/params-overrides.yaml -o /tmp/params.yaml
    python infra/cluster_params.py --set train.storage_path=$VAE_SHARED_STORAGE/runs --set train.num_workers=2
    \
        -o /tmp/params.yaml
    python -m pipeline.train --params /tmp/params.yaml

The overrides file is a partial params.yaml (only what differs on the cluster: shared storage paths, GPU
workers); ``--set section.key=value`` (value parsed as YAML) is applied after it. The result is validated with
``pipeline.config``, so a misspelt key fails here, naming the field, before
any pod or node starts training. Keeping only the differences means the cluster follows every other change
made to params.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import storage  # noqa: E402
from pipeline.config import parse_params, set_dotted  # noqa: E402


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section (mappings merge, other values replace)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build(base: Path, override_files: list[Path], assignments: list[str]) -> dict[str, Any]:
    tree = yaml.safe_load(Path(base).read_text()) or {}
    for path in override_files:
        tree = merge(tree, yaml.safe_load(Path(path).read_text()) or {})
    for assignment in assignments:
        dotted, sep, raw = assignment.partition("=")
        if not sep or not dotted:
            raise ValueError(f"--set takes section.key=value, got {assignment!r}")
        set_dotted(tree, dotted, yaml.safe_load(raw))
    return tree


def validate(tree: dict[str, Any], source: str) -> None:
    """Validate with the project's own schema (raises ConfigError naming each bad field)."""
    parse_params(tree, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", type=Path, help="partial params files, applied in order")
    parser.add_argument(
        "--base", type=Path, default=REPO_ROOT / "params.yaml", help="default: the repo's params.yaml"
    )
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-o", "--output", required=True,
                        help="a path, or an s3:// URI (the team deployment: nodes share no folder)")
    args = parser.parse_args(argv)
    try:
        tree = build(args.base, args.overrides, args.assignments)
        validate(tree, str(args.output))
    except (OSError, ValueError, yaml.YAMLError) as error:  # ConfigError is a ValueError
        print(f"cluster_params: {error}", file=sys.stderr)
        return 2
    storage.write_bytes(args.output, yaml.safe_dump(tree, sort_keys=False).encode())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
