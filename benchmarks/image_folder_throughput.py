"""Preprocessing a folder of photographs (``data.dataset: image_folder``): images/s and peak memory per node,
in local processes and with Ray Data on the local multi-node cluster with 1 and 2 worker nodes. Appends the
table to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/image_folder_throughput.py [--images 100000] [--side 64] [--folder DIR]

The folder holds JPEG crops (48-240 px a side) of the photographs scikit-image and scikit-learn ship
(benchmarks/photo_folders.py), built once and reused from ``--folder``. Each configuration runs
:func:`pipeline.image_folder_stage.preprocess_image_folder` end to end - listing, decoding, hashing, the split
arrays and the manifest - as the preprocess stage does. Memory is the proportional set size (PSS: shared pages
divided among the processes that map them, so Ray's shared object store is not counted once per process),
summed over each node's processes, sampled every ``--sample`` seconds; "driver" is this process, which
receives the decoded batches and writes the arrays. CPU is the CPU-seconds the driver and the nodes' processes
used over the run, per second of wall time: how many cores the configuration kept busy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import append_to_section, commit, cores, cpu_model  # noqa: E402


class Sampler:
    """Samples, in a thread, the PSS (MiB) of groups of processes and keeps each group's peak, and the CPU
    seconds each process used (its last reading, so a process that exits keeps what it used)."""

    def __init__(self, groups, interval_s: float) -> None:
        self.groups = groups  # () -> {group: [psutil.Process]}
        self.interval_s = interval_s
        self.peak_mib: dict[str, float] = {}
        self.start_cpu_s: dict[int, float] = {}  # processes alive when measuring began
        self.last_cpu_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        for group, procs in self.groups().items():
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                self.last_cpu_s[proc.pid] = times.user + times.system
            self.peak_mib[group] = max(self.peak_mib.get(group, 0.0), total / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self.start_cpu_s = dict(self.last_cpu_s)
        self.peak_mib = {}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def cpu_seconds(self) -> float:
        """CPU-seconds used while measuring: by the processes alive at the start since then, and by those
        started later (the decode processes, Ray's task workers) since their start."""
        return sum(used - self.start_cpu_s.get(pid, 0.0) for pid, used in self.last_cpu_s.items())


def own_processes() -> list:
    """This process and its children (the decode processes of the ``processes`` engine)."""
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def build_folder(folder: Path, count: int) -> Path:
    """``count`` JPEG crops in ``folder`` (kept: a later run with the same count reuses them)."""
    from benchmarks.photo_folders import photo_folder

    marker = folder.parent / f"{folder.name}.complete-{count}"
    if not marker.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        photo_folder(folder, count, seed=7, class_folders=False, formats=(("jpg", "JPEG"),))
        marker.touch()
        print(f"built {count} photographs in {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run_preprocess(folder: Path, side: int, engine: str, num_workers: int, groups, sample_s: float
                   ) -> dict[str, object]:
    """One end-to-end preprocess of ``folder``; images/s, cores kept busy and each group's peak PSS."""
    from pipeline.image_folder_stage import preprocess_image_folder

    with tempfile.TemporaryDirectory(prefix="images-bench-") as out:
        with Sampler(groups, sample_s) as sampler:
            started = time.perf_counter()
            manifest = preprocess_image_folder(folder, Path(out) / "processed", image_size=side,
                                               engine=engine, num_workers=num_workers)
            wall = time.perf_counter() - started
    images = sum(split["count"] for split in manifest["splits"].values())
    return {"images": images, "wall_s": wall, "images_per_s": images / wall,
            "cores_busy": sampler.cpu_seconds() / wall, "peak_mib": dict(sampler.peak_mib)}


def free_base_port(module) -> int:
    for base in range(27400, 31000, 100):
        if not any(module.port_in_use(port) for port in range(base, base + 70)):
            return base
    raise RuntimeError("no free block of ports")


def on_cluster(folder: Path, side: int, workers: int, worker_cpus: float, sample_s: float
               ) -> dict[str, object]:
    """Ray Data on the local cluster (infra/local-cluster.sh's): a head that runs no task, ``workers``
    worker nodes of ``worker_cpus`` each, and the driver in a child process with the cluster's client
    environment (its address and token, read when Ray is imported), as a shell or a job gets it."""
    import psutil

    import infra.cluster as module

    with tempfile.TemporaryDirectory(prefix="images-bench-cluster-") as state, \
            tempfile.TemporaryDirectory(prefix="vaeray-", dir="/tmp") as ray_tmp:
        settings = module.ClusterSettings(state_dir=Path(state), num_workers=workers, head_cpus=0,
                                          worker_cpus=worker_cpus, mlflow=False,
                                          base_port=free_base_port(module), ray_temp_root=Path(ray_tmp))
        cluster = module.LocalCluster(settings)
        cluster.up()
        try:
            nodes = list(cluster.state["nodes"])
            driver = subprocess.Popen(
                [sys.executable, __file__, "--driver", str(folder), "--side", str(side)],
                env={**os.environ, **cluster.client_env()}, stdout=subprocess.PIPE, text=True)
            driver_process = psutil.Process(driver.pid)

            def groups() -> dict[str, list]:
                try:
                    own = [driver_process, *driver_process.children(recursive=True)]
                except psutil.Error:
                    own = []
                return {"driver": own, **{node: cluster.processes(node) for node in nodes}}

            with Sampler(groups, sample_s) as sampler:
                output, _ = driver.communicate()
            if driver.returncode != 0:
                raise RuntimeError(f"the driver failed (exit {driver.returncode})")
            result = json.loads(output.strip().splitlines()[-1])
            wall = result["wall_s"]
            return {**result, "images_per_s": result["images"] / wall,
                    "cores_busy": sampler.cpu_seconds() / wall, "peak_mib": dict(sampler.peak_mib)}
        finally:
            cluster.down()


def drive(folder: Path, side: int) -> None:
    """The child of :func:`on_cluster`: connect to ``RAY_ADDRESS``, preprocess with Ray Data, print
    {"images", "wall_s"} as JSON on the last line."""
    import ray

    from pipeline.image_folder_stage import preprocess_image_folder

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="images-bench-") as out:
        started = time.perf_counter()
        manifest = preprocess_image_folder(folder, Path(out) / "processed", image_size=side,
                                           engine="ray_data")
        wall = time.perf_counter() - started
    images = sum(split["count"] for split in manifest["splits"].values())
    print(json.dumps({"images": images, "wall_s": wall}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="photographs in the folder")
    parser.add_argument("--side", type=int, default=64, help="data.image_size, pixels")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "vae-bench-photos",
                        help="where the photographs are built (and reused)")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)  # the child of on_cluster
    args = parser.parse_args(argv)
    if args.driver:
        drive(args.driver, args.side)
        return 0
    folder = build_folder(args.folder, args.images)
    source_mib = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 2**20

    configurations = [
        ("processes, 1 process", lambda: run_preprocess(folder, args.side, "processes", 1,
                                                        lambda: {"driver": own_processes()}, args.sample)),
        (f"processes, {cores()} processes", lambda: run_preprocess(
            folder, args.side, "processes", cores(), lambda: {"driver": own_processes()}, args.sample)),
        ("Ray Data, 1 worker node x 1 CPU", lambda: on_cluster(folder, args.side, 1, 1, args.sample)),
        ("Ray Data, 1 worker node x 2 CPUs", lambda: on_cluster(folder, args.side, 1, 2, args.sample)),
        ("Ray Data, 2 worker nodes x 1 CPU", lambda: on_cluster(folder, args.side, 2, 1, args.sample)),
    ]
    rows = ["| configuration | images | wall s | images/s | cores busy | peak PSS MiB per node |",
            "|---|---:|---:|---:|---:|---|"]
    for name, run in configurations:
        result = run()
        peaks = ", ".join(f"{node} {mib:,.0f}" for node, mib in result["peak_mib"].items())
        row = (f"| {name} | {result['images']:,} | {result['wall_s']:.0f} | {result['images_per_s']:,.0f} | "
               f"{result['cores_busy']:.2f} | {peaks} |")
        print(row, flush=True)
        rows.append(row)
    block = (f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}\n\n"
             f"Machine: {cpu_model()}, {cores()} cores. {args.images:,} JPEG photographs "
             f"({source_mib:,.0f} MiB, 48-240 px a side) to {args.side}x{args.side} RGB, from the local "
             "disk.\n\n" + "\n".join(rows))
    print(block)
    if not args.no_record:
        append_to_section("## Image-folder preprocessing",
                          "Written by `benchmarks/image_folder_throughput.py`.", block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
