"""The image-folder dataset (pipeline/image_folder.py) on folders of real photographs
(benchmarks/photo_folders.py): torchvision-exact decoding with EXIF orientation and every mode, stable hash
splits, duplicates, class folders, an attributes CSV, and every bad input named with nothing half-written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image
from torchvision import transforms

from benchmarks.photo_folders import photo_folder, source_photographs
from pipeline import datasets as ds
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.data import load_split
from pipeline.datasets import DataStageError
from pipeline.image_folder import list_image_folder, split_of, to_eight_bit, transform_image
from pipeline.image_folder_stage import preprocess_image_folder
from pipeline.preprocess import preprocess

FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}


def build(root: Path, out: Path, **options) -> dict:
    options.setdefault("image_size", 16)
    options.setdefault("num_workers", 1)
    return preprocess_image_folder(root, out, **options)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("photos") / "images"
    return root, photo_folder(root, 160)


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


# --------------------------------------------------------------------------- decoding equals torchvision


@pytest.mark.parametrize("crop", ["center", "none"])
@pytest.mark.parametrize("channels", [3, 1])
def test_decoded_images_equal_torchvision_transforms_in_every_format(photos, crop, channels):
    root, names = photos
    size = 24
    crop_then_resize = (
        (lambda image: transforms.Resize(size, antialias=True)(transforms.CenterCrop(min(image.size))(image)))
        if crop == "center" else transforms.Resize((size, size), antialias=True))
    formats = set()
    for name in names[:40]:
        data = (root / name).read_bytes()
        ours = transform_image(data, size, channels, crop)
        with Image.open(root / name) as image:
            formats.add(image.format)
            theirs = np.asarray(crop_then_resize(image.convert("RGB" if channels == 3 else "L")))
        theirs = theirs[None] if channels == 1 else theirs.transpose(2, 0, 1)
        assert ours.shape == (channels, size, size)
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    assert formats == {"JPEG", "PNG", "WEBP", "BMP", "TIFF"}


def test_exif_orientation_is_applied():
    photo = source_photographs()["chelsea"][:120, :200]  # landscape
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(photo, k=-1)))  # what a camera held sideways saw
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the landscape ones
    tagged = encoded(Image.fromarray(photo), "PNG", exif=exif)
    expected = transform_image(encoded(upright), 32, crop="none")
    np.testing.assert_array_equal(transform_image(tagged, 32, crop="none"), expected)
    assert not np.array_equal(transform_image(encoded(Image.fromarray(photo)), 32, crop="none"), expected)


def test_every_mode_is_converted_and_counted():
    photo = Image.fromarray(source_photographs()["coffee"][:64, :64])
    grey = photo.convert("L")
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # the same picture at 16 bits
    assert sixteen.mode == "I;16"
    cases = {
        "L": encoded(grey),
        "P": encoded(photo.convert("P")),
        "RGBA": encoded(photo.convert("RGBA")),
        "CMYK": encoded(photo.convert("CMYK"), "JPEG", quality=95),
        "I;16": encoded(sixteen),
    }
    conversions = Counter()
    for mode, data in cases.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == mode
        assert transform_image(data, 16, 3, "center", conversions).shape == (3, 16, 16)
    assert conversions == {f"{mode}->RGB": 1 for mode in cases}
    # 16-bit grey keeps its picture (the high byte), where Pillow's own convert would clip it to white.
    np.testing.assert_array_equal(transform_image(cases["I;16"], 16, 1), transform_image(cases["L"], 16, 1))
    assert np.asarray(sixteen.convert("L")).min() == 255
    np.testing.assert_array_equal(np.asarray(to_eight_bit(sixteen)), np.asarray(grey))


# ------------------------------------------------------------------------------------------------ splits


def test_split_of_follows_the_fractions_and_depends_only_on_the_path():
    names = [f"folder{i % 7}/image_{i}.jpg" for i in range(20_000)]
    counts = {split: 0 for split in ds.SPLITS}
    for name in names:
        counts[split_of(name, FRACTIONS)] += 1
    for split, fraction in FRACTIONS.items():
        assert abs(counts[split] / len(names) - fraction) < 0.01, counts
    assert split_of("a/b.jpg", {"train": 0.5, "valid": 0.25, "test": 0.25}) == split_of(
        "a/b.jpg", {"train": 0.5, "valid": 0.25, "test": 0.25})


def test_split_of_is_the_documented_rule():
    """u = the first 8 bytes of sha256(relative path) / 2**64, compared with the cumulative fractions (what
    the manifest's split rule and the README say, so that another tool can recompute a split)."""
    seen = set()
    for name in ("cats/0001.jpg", "dogs/ä b.png", "img_0.jpg", "deep/er/path/IMG_2001.JPG"):
        u = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:16], 16) / 2**64
        expected = "train" if u < 0.7 else "valid" if u < 0.85 else "test"
        assert split_of(name, {"train": 0.7, "valid": 0.15, "test": 0.15}) == expected, name
        seen.add(expected)
    assert seen == set(ds.SPLITS)


def test_adding_images_moves_no_image_to_another_split_and_rows_are_recorded(tmp_path):
    root = tmp_path / "images"
    photo_folder(root, 120, seed=3)
    before = build(root, tmp_path / "out")
    first = {name: (entry["split"], entry["sha256"]) for name, entry in before["sources"].items()}
    # the arrays hold each image at the row the manifest gives
    for split in ds.SPLITS:
        images = load_split(tmp_path / "out", split).images
        for name, entry in before["sources"].items():
            if entry["split"] == split:
                expected = transform_image((root / name).read_bytes(), 16)
                np.testing.assert_array_equal(images[entry["row"]], expected, err_msg=name)
    photo_folder(tmp_path / "more", 60, seed=4, class_folders=False)
    shutil.copytree(tmp_path / "more", root / "new")
    after = build(root, tmp_path / "out")
    assert len(after["sources"]) == 180
    for name, (split, _) in first.items():
        assert after["sources"][name]["split"] == split, name


def test_exact_duplicates_are_kept_once_and_listed(tmp_path):
    root = tmp_path / "images"
    names = photo_folder(root, 60, seed=5)
    shutil.copy(root / names[0], root / "zz_copy_of_first.jpg.png")  # same bytes, another name
    (root / "copies").mkdir()
    shutil.copy(root / names[1], root / "copies" / "again.bin.jpg")
    manifest = build(root, tmp_path / "out")
    assert manifest["duplicates"] == {names[0]: ["zz_copy_of_first.jpg.png"],
                                      names[1]: ["copies/again.bin.jpg"]}
    assert sum(split["count"] for split in manifest["splits"].values()) == 60
    assert manifest["sources"]["copies/again.bin.jpg"]["duplicate_of"] == names[1]
    assert "split" not in manifest["sources"]["copies/again.bin.jpg"]


# ------------------------------------------------------------------------------- labels and attributes


def test_class_folder_labels_equal_torchvision_image_folder(photos, tmp_path):
    root, names = photos
    manifest = build(root, tmp_path / "out", class_folders=True)
    reference = torchvision.datasets.ImageFolder(str(root))
    target_of = {Path(path).relative_to(root).as_posix(): target for path, target in reference.samples}
    assert manifest["class_names"] == reference.classes
    for split in ds.SPLITS:
        labels = load_split(tmp_path / "out", split).labels
        rows = {entry["row"]: name for name, entry in manifest["sources"].items() if entry["split"] == split}
        assert [int(label) for label in labels] == [target_of[rows[row]] for row in range(len(labels))]


def test_class_folders_refuse_an_image_outside_a_class_folder(photos, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    shutil.copy(root / photos[1][0], root / "loose.jpg")
    with pytest.raises(DataStageError, match=r"lie directly in .*loose\.jpg.*class_folders: false"):
        build(root, tmp_path / "out", class_folders=True)
    assert not (tmp_path / "out").exists()


def write_attributes(root: Path, names: list[str], extra: str = "") -> Path:
    lines = ["path,is_cat,is_portrait"]
    for name in names:
        lines.append(f"{name},{1 if name.startswith('chelsea') else -1},{int(name.startswith('astronaut'))}")
    path = root / "attributes.csv"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_attributes_csv_rows_follow_the_images(photos, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    write_attributes(root, photos[1])
    manifest = build(root, tmp_path / "out", attributes_csv="attributes.csv")
    assert manifest["attribute_names"] == ["is_cat", "is_portrait"]
    assert manifest["other_files"] == ["attributes.csv"]
    for split in ds.SPLITS:
        loaded = load_split(tmp_path / "out", split)
        rows = {entry["row"]: name for name, entry in manifest["sources"].items() if entry["split"] == split}
        expected = [[name.startswith("chelsea"), name.startswith("astronaut")]
                    for name in (rows[row] for row in range(len(loaded)))]
        np.testing.assert_array_equal(loaded.attributes, np.asarray(expected, np.uint8))
        assert loaded.attribute("is_cat").sum() > 0 or split != "train"


@pytest.mark.parametrize("problem", ["row for a missing image", "image without a row", "outside the folder",
                                     "bad value"])
def test_attributes_csv_mismatches_are_named(photos, tmp_path, problem):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    names = photos[1]
    if problem == "row for a missing image":
        path = write_attributes(root, names, "ghost/none.jpg,1,0\n")
        match = r"attributes\.csv:162: ghost/none\.jpg"
    elif problem == "image without a row":
        path, match = write_attributes(root, names[1:]), rf"no row for 1 image\(s\).*{names[0]}"
    elif problem == "bad value":
        path, match = write_attributes(root, names, f"{names[0]},yes,0\n"), r"attributes\.csv:162: expected"
    else:
        path = write_attributes(tmp_path, names)
        match = "must be a path inside data.image_folder"
    relative = "../attributes.csv" if problem == "outside the folder" else path.name
    with pytest.raises(DataStageError, match=match):
        build(root, tmp_path / "out", attributes_csv=relative)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- bad input


def test_a_corrupt_or_truncated_image_stops_the_stage_naming_it_or_is_skipped_and_listed(photos, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    jpeg = next(name for name in photos[1] if name.endswith(".jpg"))
    data = (root / jpeg).read_bytes()
    (root / jpeg).write_bytes(data[: len(data) // 2])  # truncated
    (root / "chelsea" / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))  # not a PNG inside
    out = tmp_path / "out"
    previous = build(photos[0], out)  # a previous good output must survive the failed run
    with pytest.raises(DataStageError,
                       match=rf"2 image\(s\) .*cannot be used: {jpeg}: .*noise\.png.*skip_corrupt"):
        build(root, out)
    assert json.loads((out / "manifest.json").read_text()) == previous
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    manifest = build(root, out, skip_corrupt=True)
    assert manifest["skipped_files"] == sorted([jpeg, "chelsea/noise.png"])
    assert "skipped" in manifest["sources"][jpeg] and "split" not in manifest["sources"][jpeg]
    assert sum(split["count"] for split in manifest["splits"].values()) == len(photos[1]) - 1


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes that claim to be a width x height grey PNG (the header of a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_by_name(photos, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    (root / "astronaut" / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    with pytest.raises(DataStageError, match=r"astronaut/bomb\.png: refused as a decompression bomb"):
        build(root, tmp_path / "out")
    # above Pillow's limit but below twice it, where Pillow only warns, it is refused too
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with pytest.raises(ValueError, match="decompression bomb"):
        transform_image(png_claiming(side, side), 16)


def test_no_images_and_too_few_images_are_refused(tmp_path):
    empty = tmp_path / "empty"
    (empty / "docs").mkdir(parents=True)
    (empty / "docs" / "readme.txt").write_text("no pictures")
    with pytest.raises(DataStageError, match=r"no images in .*empty.*1 other file"):
        build(empty, tmp_path / "out")
    few = tmp_path / "few"
    photo_folder(few, 4, seed=9)
    with pytest.raises(DataStageError, match=r"4 usable image\(s\) give .* split\(s\) would be empty"):
        build(few, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_symlink_leading_outside_the_folder_is_refused_and_one_inside_is_read(photos, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    (root / "inside.jpg").symlink_to(root / photos[1][0])
    listing = list_image_folder(root)
    assert "inside.jpg" in listing.images
    (root / "linked_folder").symlink_to(root / "chelsea", target_is_directory=True)
    assert not any(name.startswith("linked_folder") for name in list_image_folder(root).images)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(root / photos[1][0], outside)
    (root / "astronaut" / "escape.jpg").symlink_to(outside)
    with pytest.raises(DataStageError, match=r"astronaut/escape\.jpg is a symbolic link to .*elsewhere\.jpg"):
        build(root, tmp_path / "out")


def test_parallel_decode_equals_in_process_decode(photos, tmp_path):
    root, _ = photos
    one = build(root, tmp_path / "one", num_workers=1)
    two = build(root, tmp_path / "two", num_workers=2)
    assert one["splits"] == two["splits"] and one["sources"] == two["sources"]


def test_the_preprocess_stage_reads_the_folder_from_params(photos, tmp_path):
    root, names = photos
    data = DataConfig(dataset="image_folder", image_folder=str(root),
                      processed_dir=str(tmp_path / "processed"), image_size=20, channels=1, crop="none",
                      split_fractions={"train": 0.5, "valid": 0.25, "test": 0.25})
    manifest = preprocess(data, PreprocessConfig(num_workers=1))
    assert manifest["dataset"] == "image_folder" and manifest["image_shape"] == [1, 20, 20]
    assert manifest["preprocess"]["crop"] == "none"
    valid = load_split(tmp_path / "processed" / "image_folder", "valid", verify=True)
    assert valid.images.shape[1:] == (1, 20, 20)
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    assert counts == {split: sum(split_of(n, data.split_fractions.model_dump()) == split for n in names)
                      for split in ds.SPLITS}


# ------------------------------------------------------------------------------- Ray Data and the store


def test_ray_data_decodes_the_same_bytes_as_local_processes(photos, tmp_path):
    import ray

    root, _ = photos
    local = build(root, tmp_path / "local", num_workers=2, class_folders=True)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        with_ray = build(root, tmp_path / "ray", engine="ray_data", class_folders=True)
    finally:
        ray.shutdown()
    assert with_ray == local  # every array's sha256 (in the manifest), every source's split and row
    assert (tmp_path / "ray" / "train_images.npy").read_bytes() == (tmp_path / "local" /
                                                                    "train_images.npy").read_bytes()


def upload(s3, root: Path, prefix: str) -> None:
    bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
    client = s3.client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{key_prefix}/{path.relative_to(root).as_posix()}",
                          Body=path.read_bytes())


def test_a_folder_in_the_object_store_gives_the_same_dataset_as_on_disk(photos, tmp_path, s3):
    root = tmp_path / "images"
    shutil.copytree(photos[0], root)
    write_attributes(root, photos[1])
    (root / "notes.txt").write_text("not an image")
    prefix = f"{s3.prefix()}/my-photos"
    upload(s3, root, prefix)
    on_disk = build(root, tmp_path / "disk", attributes_csv="attributes.csv", class_folders=True)
    in_store = build(prefix, tmp_path / "store", attributes_csv="attributes.csv", class_folders=True,
                     num_workers=2)
    assert in_store["preprocess"].pop("image_folder") == prefix
    assert on_disk["preprocess"].pop("image_folder") == str(root)
    assert in_store == on_disk
    assert in_store["other_files"] == ["attributes.csv", "notes.txt"]


def test_an_empty_or_unreachable_prefix_is_refused_naming_the_fix(s3, tmp_path, monkeypatch):
    from pipeline.storage_access import StorageError

    empty = f"{s3.prefix()}/nothing-here"
    with pytest.raises(DataStageError, match=rf"data.image_folder {empty} holds no objects"):
        build(empty, tmp_path / "out")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        build("s3://no-such-bucket/photos", tmp_path / "out")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="data.image_folder .* refused the credentials") as raised:
        build(f"{s3.prefix()}/photos", tmp_path / "out")
    assert s3.secret_key not in str(raised.value)
    assert not (tmp_path / "out").exists()
