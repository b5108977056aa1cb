"""The CelebA preprocess stage on generated CelebA-layout data (real 178x218 JPEGs, official annotation
formats).

Stated tolerances:
- exact path vs torchvision ``CenterCrop(148)`` + ``Resize(S, antialias=True)`` on the PIL images that
  ``torchvision.datasets.CelebA`` returns: identical bytes (tolerance 0), for S = 64 and 128;
- ``fast_decode`` (libjpeg DCT-domain 1/2-scale decoding) vs the exact path at 64x64: mean absolute difference
  at most 1.5 grey levels (of 255) over all pixels, at most 2.0 for any single image, no pixel off by more
  than 40.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torchvision
import yaml
from PIL import Image
from torchvision import transforms

from benchmarks.celeba_layout import CelebaFixture, write_celeba_fixture
from pipeline import datasets as ds
from pipeline.celeba import center_crop_box, read_celeba_annotations, transform_celeba_image
from pipeline.common import REPO_ROOT
from pipeline.data import load_manifest, load_split
from pipeline.datasets import DataStageError
from pipeline.preprocess import main, preprocess_celeba
from pipeline.processed_folder import file_hexdigest


def torchvision_celeba(fixture: CelebaFixture, split: str, transform=None):
    """torchvision's own CelebA reader on the fixture (given the fixture's md5 sums for its integrity
    check)."""

    class FixtureCelebA(torchvision.datasets.CelebA):
        file_list = [(i, fixture.md5[name], name) for i, _, name in torchvision.datasets.CelebA.file_list]

    return FixtureCelebA(
        str(fixture.root), split=split, target_type=["attr", "identity"], transform=transform
    )


@pytest.fixture(scope="module", params=[64, 128])
def processed(request, celeba_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"processed{request.param}") / "celeba"
    manifest = preprocess_celeba(celeba_fixture.root, out, image_size=request.param, num_workers=1)
    return request.param, out, manifest


def test_images_equal_torchvision_center_crop_and_antialiased_resize(processed, celeba_fixture):
    size, out, _ = processed
    reference = transforms.Compose(
        [transforms.CenterCrop(148), transforms.Resize(size, antialias=True), transforms.PILToTensor()]
    )
    for split in ds.SPLITS:
        ours = load_split(out, split).images
        theirs = torchvision_celeba(celeba_fixture, split, reference)
        assert ours.shape == (len(theirs), 3, size, size) and ours.dtype == np.uint8
        for index in range(len(theirs)):
            np.testing.assert_array_equal(
                ours[index], theirs[index][0].numpy(), err_msg=f"{split} image {index}"
            )


def test_splits_attributes_and_identities_line_up_with_the_annotation_files(processed, celeba_fixture):
    size, out, manifest = processed
    counts = {"train": 20, "valid": 5, "test": 5}
    for split in ds.SPLITS:
        data = load_split(out, split)
        reference = torchvision_celeba(celeba_fixture, split)  # torchvision's parse of the same .txt files
        assert len(data) == counts[split] == len(reference)
        assert data.attributes.dtype == np.uint8 and data.attributes.shape == (counts[split], 40)
        assert data.identity.dtype == np.int32 and data.labels is None
        np.testing.assert_array_equal(data.attributes, reference.attr.numpy())
        np.testing.assert_array_equal(data.identity, reference.identity.numpy()[:, 0])
        assert (
            data.attribute_names == list(ds.CELEBA_ATTRIBUTE_NAMES) == [n for n in reference.attr_names if n]
        )
        # and against the generator's ground truth, row by row
        rows = [celeba_fixture.names.index(name) for name in celeba_fixture.split_names(split)]
        np.testing.assert_array_equal(data.attributes, (celeba_fixture.attributes[rows] + 1) // 2)
        assert data.attribute("Smiling").tolist() == data.attributes[:, 31].tolist()

    assert manifest == load_manifest(out)
    assert manifest["dataset"] == "celeba" and manifest["image_shape"] == [3, size, size]
    assert manifest["skipped_files"] == []
    assert manifest["preprocess"]["crop_size"] == 148 and manifest["preprocess"]["image_size"] == size
    assert manifest["sources"][ds.CELEBA_ZIP]["md5"] == celeba_fixture.md5[ds.CELEBA_ZIP]
    for split, entry in manifest["splits"].items():
        assert entry["count"] == counts[split]
        assert set(entry["files"]) == {
            f"{split}_images.npy",
            f"{split}_attributes.npy",
            f"{split}_identity.npy",
        }
        for name, digest in entry["files"].items():
            assert file_hexdigest(out / name) == digest
    assert not list(out.parent.glob(".*")), "temporary folders left beside the output"


def test_fast_decode_stays_within_the_stated_tolerance(celeba_fixture):
    with zipfile.ZipFile(celeba_fixture.path(ds.CELEBA_ZIP)) as archive:
        blobs = [archive.read(f"img_align_celeba/{name}") for name in celeba_fixture.names]
    exact = np.stack([transform_celeba_image(b, 64) for b in blobs]).astype(np.int16)
    fast = np.stack([transform_celeba_image(b, 64, fast_decode=True) for b in blobs]).astype(np.int16)
    difference = np.abs(exact - fast)
    assert difference.mean() <= 1.5
    assert difference.reshape(len(blobs), -1).mean(axis=1).max() <= 2.0
    assert difference.max() <= 40
    assert difference.any(), "the fast path should differ at all (else it is not in use)"
    # At 128 from a 148 crop no DCT scaling applies (it needs an output <= half the crop): identical.
    for blob in blobs[:3]:
        np.testing.assert_array_equal(
            transform_celeba_image(blob, 128, fast_decode=True), transform_celeba_image(blob, 128)
        )


def test_parallel_decode_equals_in_process_decode(tmp_path):
    fixture = write_celeba_fixture(tmp_path / "raw", (220, 40, 40), seed=3)  # 300 images: 2 chunks of 256
    one = preprocess_celeba(fixture.root, tmp_path / "one", num_workers=1)
    two = preprocess_celeba(fixture.root, tmp_path / "two", num_workers=2)
    assert one["splits"] == two["splits"]  # same sha256 of every array


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_jpeg_stops_the_stage_naming_the_file(tmp_path, kind):
    fixture = write_celeba_fixture(tmp_path / "raw", (6, 2, 2), seed=4, corrupt={"000005.jpg": kind})
    out = tmp_path / "processed" / "celeba"

    with pytest.raises(DataStageError) as raised:
        preprocess_celeba(fixture.root, out, num_workers=1)

    assert "000005.jpg" in str(raised.value) and "preprocess.skip_corrupt" in str(raised.value)
    assert not out.exists() and not list(out.parent.iterdir()), "partial output left behind"


def test_failed_rerun_leaves_the_previous_output_intact(tmp_path):
    good = write_celeba_fixture(tmp_path / "good", (6, 2, 2), seed=5)
    out = tmp_path / "processed" / "celeba"
    manifest = preprocess_celeba(good.root, out, num_workers=1)
    bad = write_celeba_fixture(tmp_path / "bad", (6, 2, 2), seed=5, corrupt={"000002.jpg": "truncated"})

    with pytest.raises(DataStageError, match="000002.jpg"):
        preprocess_celeba(bad.root, out, num_workers=1)

    assert load_manifest(out) == manifest
    assert sorted(p.name for p in out.parent.iterdir()) == ["celeba"]


def test_skip_corrupt_leaves_the_image_and_its_rows_out_and_lists_it(tmp_path):
    fixture = write_celeba_fixture(
        tmp_path / "raw", (6, 2, 2), seed=6, corrupt={"000003.jpg": "truncated", "000008.jpg": "garbage"}
    )
    out = tmp_path / "processed" / "celeba"

    manifest = preprocess_celeba(fixture.root, out, skip_corrupt=True, num_workers=1)

    assert manifest["skipped_files"] == ["000003.jpg", "000008.jpg"]
    for split in ds.SPLITS:
        data = load_split(out, split)
        kept = [n for n in fixture.split_names(split) if n not in fixture.corrupt]
        rows = [fixture.names.index(n) for n in kept]
        assert len(data) == len(kept) == manifest["splits"][split]["count"]
        np.testing.assert_array_equal(data.attributes, (fixture.attributes[rows] + 1) // 2)
        np.testing.assert_array_equal(data.identity, fixture.identity[rows])
        with zipfile.ZipFile(fixture.path(ds.CELEBA_ZIP)) as archive:
            for index, name in enumerate(kept):
                np.testing.assert_array_equal(
                    data.images[index], transform_celeba_image(archive.read(f"img_align_celeba/{name}"), 64)
                )


def test_missing_raw_data_says_to_run_the_download_stage(tmp_path, capsys):
    with pytest.raises(DataStageError, match=r"run `dvc repro download`"):
        preprocess_celeba(tmp_path / "raw" / "celeba", tmp_path / "out", num_workers=1)

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(raw_dir=str(tmp_path / "raw"), processed_dir=str(tmp_path / "processed"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml")]) == 1
    error = capsys.readouterr().err
    assert (
        "preprocess failed:" in error
        and "img_align_celeba.zip is missing" in error
        and "Traceback" not in error
    )


def test_malformed_annotation_line_is_named(tmp_path):
    fixture = write_celeba_fixture(tmp_path / "raw", (3, 1, 1), seed=7)
    path = fixture.path(ds.CELEBA_ATTRIBUTES)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("-1", " 0", 1) if "-1" in lines[3] else lines[3].replace(" 1", " 0", 1)
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataStageError, match=r"list_attr_celeba.txt:4: expected 40 values of -1 or 1"):
        read_celeba_annotations(fixture.folder)


def test_center_crop_box_rounds_like_torchvision():
    assert center_crop_box(178, 218, 148) == (15, 35, 163, 183)
    image = Image.new("RGB", (178, 218))
    assert transforms.CenterCrop(148)(image).size == (148, 148)
    blob = io.BytesIO()
    Image.fromarray(np.arange(178 * 218 * 3, dtype=np.uint32).astype(np.uint8).reshape(218, 178, 3)).save(
        blob, "PNG"
    )
    png = Image.open(io.BytesIO(blob.getvalue()))
    np.testing.assert_array_equal(
        np.asarray(transforms.CenterCrop(148)(png)), np.asarray(png.crop(center_crop_box(178, 218, 148)))
    )


def test_manifest_is_plain_json(processed):
    _, out, _ = processed
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1
