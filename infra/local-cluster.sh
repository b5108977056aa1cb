#!/usr/bin/env bash
# A real multi-node Ray cluster + MLflow server on this machine (see infra/local_cluster.py and infra/README.md).
#   infra/local-cluster.sh up [--team] [--hosts] [--workers 2 --head-cpus 1 --worker-cpus 1 --base-port 26300 ...]
#   source tmp/local-cluster/env.sh      # ray status / ray job submit / ray.init() / MLflow now use it
#   infra/local-cluster.sh status
#   infra/local-cluster.sh restart-node worker-1 | mlflow restart | logs worker-1 | partition worker-1 | heal worker-1
#   infra/local-cluster.sh down [--wipe]
# Uses the repository's .venv python when there is one (override with PYTHON=...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
exec "$python" "$here/local_cluster.py" "$@"
