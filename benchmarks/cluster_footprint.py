"""The idle cost of the local cluster (infra/local-cluster.sh up): processes and memory per node and service,
with MLflow's GenAI job runner on (MLflow's default) and off (the cluster's default, `--mlflow-jobs` turns it
on). Appends the table to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/cluster_footprint.py [--settle 15]

Memory is the proportional set size (PSS: shared pages divided among the processes that map them), summed per
node, so the totals add up to what the machine really holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import append_to_section, commit, cores, cpu_model  # noqa: E402


def load_local_cluster():
    import infra.cluster

    return infra.cluster


def free_base_port(module) -> int:
    for base in range(27400, 31000, 100):
        if not any(module.port_in_use(port) for port in range(base, base + 70)):
            return base
    raise RuntimeError("no free block of ports")


def measure(module, mlflow_jobs: bool, settle_s: float) -> dict[str, tuple[int, float]]:
    """{node or service: (processes, PSS MiB)} of an idle cluster."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="footprint-") as state, \
            tempfile.TemporaryDirectory(prefix="vaeray-", dir="/tmp") as ray_tmp:
        settings = module.ClusterSettings(state_dir=Path(state), num_workers=2,
                                          base_port=free_base_port(module), ray_temp_root=Path(ray_tmp),
                                          mlflow_jobs=mlflow_jobs)
        cluster = module.LocalCluster(settings)
        cluster.up()
        try:
            time.sleep(settle_s)
            result = {}
            for name in [*cluster.state["nodes"], "mlflow"]:
                procs = cluster.processes(name)
                pss = 0
                for proc in procs:
                    try:
                        pss += proc.memory_full_info().pss
                    except psutil.Error:
                        continue
                result[name] = (len(procs), pss / 2**20)
            return result
        finally:
            cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=15.0, help="seconds idle before measuring")
    args = parser.parse_args(argv)
    module = load_local_cluster()
    before = measure(module, mlflow_jobs=True, settle_s=args.settle)
    after = measure(module, mlflow_jobs=False, settle_s=args.settle)
    rows = ["| part | processes, job runner on | processes, off | PSS MiB, on | PSS MiB, off |",
            "|---|---:|---:|---:|---:|"]
    for name in before:
        rows.append(f"| {name} | {before[name][0]} | {after[name][0]} | {before[name][1]:,.0f} | "
                    f"{after[name][1]:,.0f} |")
    total = [sum(v[i] for v in d.values()) for d in (before, after) for i in (0, 1)]
    rows.append(f"| total | {total[0]} | {total[2]} | {total[1]:,.0f} | {total[3]:,.0f} |")
    block = (f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}\n\n"
             f"Machine: {cpu_model()}, {cores()} cores. Head (1 CPU) + 2 workers + MLflow (SQLite), idle "
             f"{args.settle:.0f} s after `up`.\n\n" + "\n".join(rows))
    print(block)
    append_to_section("## Local cluster footprint", "Written by `benchmarks/cluster_footprint.py`.", block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
