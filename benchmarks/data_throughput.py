"""Data-path throughput, in one run, on a generated CelebA-layout set of real-size JPEGs (178x218; the real
CelebA cannot be downloaded here):

  (a) the loader most public VAE code uses: ``torchvision.datasets.CelebA`` + ``CenterCrop(148)`` +
      ``Resize(64)`` + ``ToTensor`` through a ``DataLoader`` (one worker process per core), images/s over
      an epoch;
  (b) this project's preprocess stage (``pipeline.preprocess.preprocess_celeba``): per core (one process,
      exact and fast decode) and on all cores;
  (c) reading shuffled batches from the preprocessed uint8 arrays (``pipeline.data.BatchSource`` over
      ``training_indices``, the training loop's own data path, on the memory-mapped split), as uint8 and
      converted to float tensors in [0, 1] as (a) yields them.

(a) is paid every epoch; (b) once per dataset; (c) every epoch instead of (a). The set is small enough to sit
in the page cache, so the figures are for a warm cache (CelebA's 1.4 GB zip and its 2.5 GB 64x64 arrays fit in
the page cache of most training machines too).

    python benchmarks/data_throughput.py [--num-images 3000] [--image-size 64] [--no-record]

Prints the figures and appends them, with the machine, date and git commit, to the "Data path" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks.recording import RESULTS_PATH, append_to_section, commit, cores, cpu_model  # noqa: E402
from pipeline import datasets as ds  # noqa: E402

SECTION = "## Data path"


def machine() -> str:
    kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    import PIL
    import torch
    import torchvision

    return (
        f"{cpu_model()}, {cores()} cores, {kib / 2**20:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}, numpy "
        f"{np.__version__}"
    )


def bench_torchvision(fixture, image_size: int, batch_size: int, workers: int) -> float:
    """(a): images/s of a full shuffled epoch (the second one, so the page cache is warm), worker start
    included as every epoch of a default (non-persistent) DataLoader pays it."""
    import torch
    import torchvision
    from torchvision import transforms

    class GeneratedCelebA(
        torchvision.datasets.CelebA
    ):  # torchvision's md5 check, with the generated files' sums
        file_list = [(i, fixture.md5[name], name) for i, _, name in torchvision.datasets.CelebA.file_list]

    dataset = GeneratedCelebA(
        str(fixture.root),
        split="all",
        target_type="attr",
        transform=transforms.Compose(
            [transforms.CenterCrop(148), transforms.Resize(image_size, antialias=True), transforms.ToTensor()]
        ),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False
    )
    rate = 0.0
    for _ in range(2):
        start = time.perf_counter()
        count = sum(len(images) for images, _ in loader)
        rate = count / (time.perf_counter() - start)
    return rate


def bench_preprocess(fixture, out: Path, image_size: int, workers: int, fast: bool) -> float:
    """(b): images/s of the preprocess stage (decode, crop, resize, write arrays, hash them)."""
    from pipeline.preprocess import preprocess_celeba

    start = time.perf_counter()
    manifest = preprocess_celeba(
        fixture.root, out, image_size=image_size, num_workers=workers, fast_decode=fast
    )
    seconds = time.perf_counter() - start
    return sum(split["count"] for split in manifest["splits"].values()) / seconds


def bench_batches(processed: Path, batch_size: int, to_float: bool) -> float:
    """(c): images/s of shuffled batches gathered from the memory-mapped train split (best of 3 epochs)."""
    import torch

    from pipeline.data import BatchSource, load_split, training_indices

    source = BatchSource(load_split(processed, "train").images, torch.device("cpu"), on_device=False)
    best = 0.0
    for epoch in range(3):
        start = time.perf_counter()
        count = 0
        for batch in source.batches(training_indices(source.num_images, batch_size, epoch, 0), batch_size):
            if to_float:
                tensor = batch.float().div_(255)
                count += tensor.shape[0]
            else:
                count += batch.shape[0]
        best = max(best, count / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=3000, help="generated images (split 80/10/10)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers / decode processes; 0 = cores"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    workers = args.workers or cores()
    load_before = os.getloadavg()[0]

    from benchmarks.celeba_layout import write_celeba_fixture

    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        tmp_path = Path(tmp)
        n_valid = n_test = args.num_images // 10
        print(f"generating {args.num_images} CelebA-layout JPEGs (178x218) ...", flush=True)
        fixture = write_celeba_fixture(
            tmp_path / "raw", (args.num_images - n_valid - n_test, n_valid, n_test), seed=0, extract=True
        )
        jpeg_kib = (tmp_path / "raw" / "celeba" / ds.CELEBA_ZIP).stat().st_size / args.num_images / 1024
        figures: list[tuple[str, float, int]] = []

        print("(a) torchvision CelebA + DataLoader ...", flush=True)
        figures.append(
            (
                f"(a) torchvision CelebA + CenterCrop(148) + Resize({args.image_size}) + ToTensor, "
                f"DataLoader, {workers} worker processes, per epoch",
                bench_torchvision(fixture, args.image_size, args.batch_size, workers),
                workers,
            )
        )
        print("(b) preprocess stage ...", flush=True)
        figures.append(
            (
                "(b) preprocess stage, exact decode, 1 process",
                bench_preprocess(fixture, tmp_path / "p1", args.image_size, 1, False),
                1,
            )
        )
        figures.append(
            (
                "(b) preprocess stage, fast decode (DCT 1/2 scale), 1 process",
                bench_preprocess(fixture, tmp_path / "p2", args.image_size, 1, True),
                1,
            )
        )
        figures.append(
            (
                f"(b) preprocess stage, exact decode, {workers} processes (start-up included)",
                bench_preprocess(fixture, tmp_path / "p3", args.image_size, workers, False),
                workers,
            )
        )
        print("(c) batches from the preprocessed arrays ...", flush=True)
        processed = tmp_path / "p1"
        figures.append(
            (
                f"(c) shuffled uint8 batches of {args.batch_size} from the memory-mapped arrays, 1 process",
                bench_batches(processed, args.batch_size, False),
                1,
            )
        )
        figures.append(
            (
                "(c) same, converted to float tensors in [0, 1] (what (a) yields), 1 process",
                bench_batches(processed, args.batch_size, True),
                1,
            )
        )

    per_core_exact = figures[1][1]
    full = ds.CELEBA_IMAGE_COUNT / per_core_exact
    lines = [
        f"### {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}",
        "",
        f"Machine: {machine()}. Load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"(other jobs on the machine lower every figure).",
        f"Set: {args.num_images} generated CelebA-layout JPEGs (178x218, {jpeg_kib:.1f} KiB each; the real "
        f"ones average 7 KiB), output {args.image_size}x{args.image_size}, warm page cache.",
        "",
        "| path | images/s | images/s per core |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rate:,.0f} | {rate / n:,.0f} |" for name, rate, n in figures]
    lines += [
        "",
        f"Preprocessing the full CelebA ({ds.CELEBA_IMAGE_COUNT:,} images) at the measured per-core rate: "
        f"{full / 60:.1f} core-minutes, once; (a) costs {ds.CELEBA_IMAGE_COUNT / figures[0][1] / 60:.1f} "
        f"minutes per epoch on this machine, (c) {ds.CELEBA_IMAGE_COUNT / figures[5][1]:.0f} s per epoch.",
    ]
    entry = "\n".join(lines)
    print("\n" + entry)
    if not args.no_record:
        append_to_section(SECTION, "Written by `benchmarks/data_throughput.py`.", entry)
        print(f"\nappended to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":  # required: the preprocess stage starts decode processes (forkserver)
    sys.exit(main())
