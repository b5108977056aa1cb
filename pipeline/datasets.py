"""Facts about the datasets the pipeline knows: file names, official checksums, Google Drive ids, split sizes.

Pure constants (stdlib only), shared by the download and preprocess stages and by the tests.

Sources:
- CelebA (Liu et al. 2015, "Deep Learning Face Attributes in the Wild"): file names, Google Drive ids and md5
  sums as in ``torchvision/datasets/celeba.py`` (torchvision 0.29); torchvision checks only the .txt files, we
  check the zip too. Split sizes from the official ``list_eval_partition.txt``.
- MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017): md5 sums of the official ``.gz`` files as in
  ``torchvision/datasets/mnist.py``, plus md5 sums of their *uncompressed* IDX contents, which identify the
  same data when a mirror re-compressed the files (Debian's ``dataset-fashion-mnist`` package does: its .gz
  files differ from the official ones while their contents are identical).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common import StageError

# ----------------------------------------------------------------------------------------------- CelebA

CELEBA_FOLDER = "celeba"  # torchvision's CelebA.base_folder: files live in <root>/celeba/
CELEBA_ZIP = "img_align_celeba.zip"
CELEBA_IMAGE_FOLDER = "img_align_celeba"  # the zip's top-level folder, and the extracted folder
CELEBA_IMAGE_SIZE = (178, 218)  # (width, height) of every aligned-and-cropped image
CELEBA_IMAGE_COUNT = 202_599
CELEBA_SPLIT_COUNTS = {"train": 162_770, "valid": 19_867, "test": 19_962}
CELEBA_SPLIT_CODES = {0: "train", 1: "valid", 2: "test"}  # values in list_eval_partition.txt

CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_ATTRIBUTES = "list_attr_celeba.txt"
CELEBA_IDENTITY = "identity_CelebA.txt"
CELEBA_BBOX = "list_bbox_celeba.txt"
CELEBA_LANDMARKS = "list_landmarks_align_celeba.txt"
CELEBA_ANNOTATIONS = (CELEBA_PARTITION, CELEBA_ATTRIBUTES, CELEBA_IDENTITY, CELEBA_BBOX, CELEBA_LANDMARKS)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset release: its name, official md5 and (for CelebA) its Google Drive file id."""

    name: str
    md5: str
    gdrive_id: str | None = None
    content_md5: str | None = None  # md5 of the decompressed content, for .gz files


CELEBA_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        # Annotations first: they are small, and the image count of the zip is checked against the partition
        # file.
        RemoteFile(CELEBA_PARTITION, "d32c9cbf5e040fd4025c592c306e6668", "0B7EVK8r0v71pY0NSMzRuSXJEVkk"),
        RemoteFile(CELEBA_ATTRIBUTES, "75e246fa4810816ffd6ee81facbd244c", "0B7EVK8r0v71pblRyaVFSWGxPY0U"),
        RemoteFile(CELEBA_IDENTITY, "32bd1bd63d3c78cd57e08160ec5ed1e2", "1_ee_0u7vcNLOfNLegJRHmolfH5ICW-XS"),
        RemoteFile(CELEBA_BBOX, "00566efa6fedff7a56946cd1c10f1c16", "0B7EVK8r0v71pbThiMVRxWXZ4dU0"),
        RemoteFile(CELEBA_LANDMARKS, "cc24ecafdb5b50baae59b03474781f8c", "0B7EVK8r0v71pd0FJY3Blby1HUTQ"),
        RemoteFile(CELEBA_ZIP, "00d2c5bc6d35e252742224ab0c1e8fcb", "0B7EVK8r0v71pZjFTYXZWM3FlRnM"),
    )
}

# Where a person can fetch the files by hand (e.g. after a Drive quota error), for error messages.
CELEBA_HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_DRIVE_FOLDER = "https://drive.google.com/drive/folders/0B7EVK8r0v71pWEZsZE9oNnFzTm8"

CELEBA_ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

# ------------------------------------------------------------------------------------------ MNIST family

MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
MNIST_TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

# Our splits of the official 60,000/10,000 release: train = the first 55,000 training images, valid = the last
# 5,000 training images, test = the official 10,000 test images (the split of Kingma & Welling's experiments
# and of many VAE papers since; no image appears in two splits).
MNIST_TRAIN_COUNT = 55_000
MNIST_SPLIT_COUNTS = {"train": 55_000, "valid": 5_000, "test": 10_000}
MNIST_IMAGE_SHAPE = (1, 28, 28)

# Class names of the labels 0-9 (for legends).
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"],
}

MNIST_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        RemoteFile(
            MNIST_TRAIN_IMAGES,
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            content_md5="6bbc9ace898e44ae57da46a324031adb",
        ),
        RemoteFile(
            MNIST_TRAIN_LABELS,
            "d53e105ee54ea40749a09fcbcd1e9432",
            content_md5="a25bea736e30d166cdddb491f175f624",
        ),
        RemoteFile(
            MNIST_TEST_IMAGES,
            "9fb629c4189551a2d022fa330f9573f3",
            content_md5="2646ac647ad5339dbf082846283269ea",
        ),
        RemoteFile(
            MNIST_TEST_LABELS,
            "ec29112dd5afa0611ce80d1b7f02629c",
            content_md5="27ae3e4e09519cfbb04c329615203637",
        ),
    )
}

FASHION_MNIST_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        RemoteFile(
            MNIST_TRAIN_IMAGES,
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            content_md5="f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ),
        RemoteFile(
            MNIST_TRAIN_LABELS,
            "25c81989df183df01b3e8a0aad5dffbe",
            content_md5="9018921c3c673c538a1fc5bad174d6f9",
        ),
        RemoteFile(
            MNIST_TEST_IMAGES,
            "bef4ecab320f06d8554ea6380940ec79",
            content_md5="8181f5470baa50b63fa0f6fddb340f0a",
        ),
        RemoteFile(
            MNIST_TEST_LABELS,
            "bb300cfdad3c16e7a12a480ee83cd310",
            content_md5="15d484375f8d13e6eb1aabb0c3f46965",
        ),
    )
}

MNIST_FAMILY_FILES = {"mnist": MNIST_FILES, "fashion_mnist": FASHION_MNIST_FILES}

SPLITS = ("train", "valid", "test")


class DataStageError(StageError):
    """An expected failure of a data stage (no network, bad checksum, corrupt file, missing input).

    The message is complete for the user: it names the problem and the fix. Stage ``main()`` functions print
    it without a traceback and exit with status 1.
    """
