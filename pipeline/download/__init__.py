"""Download stage: CelebA (or MNIST / Fashion-MNIST) into ``data/raw/<dataset>/``, verified and ready to read
(CelebA in torchvision's layout). ``checks``: md5 sums, HTML pages, retries; ``sources``: what a source is,
how its copy is verified, the local folder; ``remote_sources``: Google Drive, the Hugging Face Hub, Kaggle,
MNIST mirrors; ``stage``: the fetch loop, extraction, the stage. See README, Data.

    python -m pipeline.download [--params params.yaml]
"""

from pipeline.download.checks import describe_html
from pipeline.download.stage import download, main

__all__ = ["describe_html", "download", "main"]
