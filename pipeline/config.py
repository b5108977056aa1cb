"""The one typed, validated configuration of the project, loaded from ``params.yaml``.

Every stage calls :func:`pipeline.params_file.load_params` once and passes the typed :class:`Params` (or its
frozen sections) on, to Ray workers and Tune trials too. The defaults below are the only ones; the
repository's params.yaml lists every setting with the same values (a test keeps them equal). pydantic
validates: unknown keys and invalid values fail at load time with :class:`ConfigError`, naming each bad
field and, for choices, the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.common import StageError, resolve
from pipeline.search_space import SearchSpace, Section
from vae.schedules import CapacityAnnealing, ConstantBeta, CyclicalBeta, LinearWarmup, SigmoidBeta

DatasetName = Literal["celeba", "mnist", "fashion_mnist", "image_folder"]


class ConfigError(StageError, ValueError):
    """params.yaml is missing, not YAML, or fails validation; the message names every bad field."""


class SplitFractions(Section):
    """The share of an image folder's images in each split (pipeline/image_folder.py: a hash of each image's
    relative path picks its split, so adding images never moves others)."""

    train: float = Field(0.8, gt=0, lt=1)
    valid: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        if abs(self.train + self.valid + self.test - 1) > 1e-9:
            total = self.train + self.valid + self.test
            raise ValueError(f"data.split_fractions must sum to 1, not {total:g}")
        return self


class DataConfig(Section):
    dataset: DatasetName = "celeba"
    raw_dir: Path = Path("data/raw")
    processed_dir: str = Field(
        "data/processed",
        min_length=1,
        description="a path (relative = project root) or a URI such as s3://bucket/processed: nodes "
        "then read the arrays into a node-local cache (pipeline.storage)",
    )
    image_size: int = Field(
        64, ge=8, le=512, description="side of the square images of CelebA and image folders (MNIST: 28)"
    )
    # data.dataset: image_folder (pipeline/image_folder.py): your own images, read in place.
    image_folder: str = Field(
        "data/images",
        min_length=1,
        description="a folder of images, searched recursively (relative = project root), or "
        "s3://bucket/prefix; a dependency of the preprocess stage in dvc.yaml",
    )
    channels: Literal[1, 3] = Field(3, description="image_folder: 3 = RGB, 1 = grey")
    crop: Literal["center", "none"] = Field(
        "center", description="image_folder: the centred square of the shorter side, or none (squeezed)"
    )
    split_fractions: SplitFractions = SplitFractions()
    class_folders: bool = Field(
        False, description="image_folder: labels from the first-level folder names (torchvision ImageFolder)"
    )
    attributes_csv: str | None = Field(
        None, description="image_folder: a CSV 'path,<attribute>,...' of 0/1 (or -1/1) per image, kept in "
        "the image folder and given relative to it"
    )

    def image_folder_location(self) -> str:
        """``image_folder`` as an absolute path (relative: under the project root), or the URI as given."""
        if "://" in self.image_folder:
            return self.image_folder.rstrip("/")
        return str(resolve(Path(self.image_folder)))

    def raw_path(self, dataset: str | None = None) -> Path:
        return resolve(self.raw_dir) / (dataset or self.dataset)

    def processed_location(self, dataset: str | None = None) -> str:
        """The dataset's preprocessed folder: an absolute path, or a URI (``s3://bucket/processed/celeba``)."""
        if "://" in self.processed_dir:
            return f"{self.processed_dir.rstrip('/')}/{dataset or self.dataset}"
        return str(self.processed_path(dataset))

    def processed_path(self, dataset: str | None = None) -> Path:
        """The local preprocessed folder (``processed_dir`` is a path); for a URI use
        ``pipeline.data.dataset_folder`` (a node-local cached copy).

        Raises:
            ValueError: ``processed_dir`` is a URI.
        """
        if "://" in self.processed_dir:
            raise ValueError(f"data.processed_dir {self.processed_dir} is a URI, not a local folder")
        return resolve(self.processed_dir) / (dataset or self.dataset)


DownloadSource = Literal["local", "gdrive", "huggingface", "kaggle"]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="32 lower-case hex digits")]


class DownloadConfig(Section):
    # CelebA sources, tried in this order for each file until one delivers a verified copy.
    sources: list[DownloadSource] = Field(["local", "gdrive", "huggingface", "kaggle"], min_length=1)
    local_dir: Path | None = Field(
        None, description="a folder in torchvision's celeba/ layout, or with the zip + .txt files"
    )
    # Where each source is fetched from. Tests (and private mirrors) point these at another server.
    gdrive_url: str = Field(
        "https://drive.google.com/uc?id={file_id}",
        pattern=r"\{file_id\}",
        description="Google Drive download URL; {file_id} is torchvision's id of each file",
    )
    huggingface_repo: str = Field(
        "Yuehao/celeba",
        min_length=1,
        description="a Hub dataset repo holding img_align_celeba.zip and the .txt files",
    )
    huggingface_revision: str = Field("main", min_length=1)
    huggingface_subfolder: str = Field("", description="folder of the files inside the repo; empty: its root")
    huggingface_endpoint: str | None = Field(None, description="null: HF_ENDPOINT or https://huggingface.co")
    kaggle_dataset: str = Field("jessicali9530/celeba-dataset", pattern=r"^[^/\s]+/[^/\s]+$")
    kaggle_url: str = Field(
        "https://www.kaggle.com/api/v1/datasets/download/{dataset}", pattern=r"\{dataset\}"
    )
    # A copy whose md5 differs from the official one is accepted only when its md5 is pinned here for the
    # source that served it: {source: {file name: md5}}. Kaggle's archive has no official md5 at all, so it
    # always needs a pin (key: its file name, e.g. celeba-dataset.zip). 'mirror' pins the MNIST-family
    # mirrors.
    pinned_md5: dict[Literal["local", "gdrive", "huggingface", "kaggle", "mirror"], dict[str, Md5]] = {}
    # MNIST family: mirrors tried in order (each a base URL holding the four IDX .gz files), or a local
    # folder.
    mnist_mirrors: list[str] = [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ]
    fashion_mnist_mirrors: list[str] = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
    mnist_local_dir: Path | None = None
    fashion_mnist_local_dir: Path | None = Path("/usr/share/datasets/fashion-mnist")
    retries: int = Field(
        4, ge=0, le=20, description="extra attempts per file and source after a transient error"
    )
    retry_backoff_s: float = Field(
        2.0, ge=0, le=300, description="first wait before a retry; doubles each time"
    )
    timeout_s: float = Field(
        60.0, gt=0, description="seconds without a byte from the server before giving up"
    )

    @model_validator(mode="after")
    def _unique_sources(self) -> DownloadConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"download.sources: each source at most once (got {self.sources})")
        return self


class PreprocessConfig(Section):
    crop_size: int = Field(
        148,
        ge=8,
        le=178,
        description="CelebA center crop before resizing (the common 148; "
        "at most 178, the width of the aligned images)",
    )
    num_workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    skip_corrupt: bool = Field(
        False, description="skip corrupt JPEGs (counted in the manifest) instead of failing"
    )
    fast_decode: bool = Field(
        False, description="DCT-domain downscaled JPEG decode (tested against the exact path)"
    )
    engine: Literal["auto", "processes", "ray_data"] = Field(
        "auto", description="image_folder: who decodes - processes on this machine, or Ray Data tasks on "
        "every node of the cluster; auto: ray_data when a cluster is configured (cluster.address or "
        "RAY_ADDRESS, as in a submitted job), else processes. The arrays are the same bytes either way"
    )


class ModelConfig(Section):
    architecture: Literal["mlp", "conv", "resnet"] = "conv"
    latent_dim: int = Field(128, ge=1, le=4096)
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 64, 128, 256, 512], min_length=1
    )
    likelihood: Literal[
        "bernoulli",
        "gaussian_fixed",
        "gaussian_learned_scalar",
        "gaussian_learned_pixel",
        "categorical_256",
        "discretized_logistic",
    ] = "discretized_logistic"
    gaussian_std: float = Field(
        0.1, gt=0, description="sigma of the fixed-variance Gaussian, in [0,1] pixel units"
    )


BetaScheduleConfig = Annotated[
    ConstantBeta | LinearWarmup | CyclicalBeta | SigmoidBeta | CapacityAnnealing,
    Field(discriminator="name"),
]


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=2, description="global batch; each worker takes batch_size / num_workers")
    optimizer: Literal["adam", "adamw"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(200, ge=0)
    grad_clip_norm: float | None = Field(None, gt=0)
    num_mc_samples: int = Field(1, ge=1, description="L, Monte-Carlo samples of z per image in the ELBO")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs, fp32 on CPUs"
    )
    num_workers: int = Field(
        1, ge=1, description="Ray Train workers (DDP ranks); the most, when min_workers is set"
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic training: go on with as few as this many "
        "workers when nodes are lost (Ray Train's num_workers=(min, max))",
    )
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, le=8, description="fractional values let trials share a GPU")
    data_on_device: Literal["auto", "always", "never"] = "auto"
    channels_last: bool = True
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model and loss; auto: where the measured compile time pays back "
        "within one worker's epoch (on a CPU; pipeline.train_plan.COMPILE_PAYBACK_IMAGES)",
    )
    checkpoint_num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)
    storage_path: str = Field(
        "runs",
        min_length=1,
        description="checkpoints: a path (relative = project root) or a URI such as s3://bucket/runs",
    )
    run_name: str = Field(
        "auto", min_length=1, description="auto: vae-<dataset>-<image side>, e.g. vae-celeba-64"
    )
    log_every_n_steps: int = Field(50, ge=1, description="per-step metrics to MLflow every this many steps")
    print_steps: bool = Field(
        False, description="also print a progress line every log_every_n_steps (else one line per epoch)"
    )
    use_best_params: bool = Field(False, description="take model/beta/lr from reports/tune/best_params.yaml")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke runs)")


# Train settings that do not change the trained weights: where and on what a run executes, how often it logs
# and checkpoints, and exact-math-preserving speed-ups. Every other setting of data, model, beta_schedule and
# train names the run (pipeline.train.run_name), so that re-running after a crash resumes the run - on other
# resources or another number of workers too (the global batches do not depend on it;
# pipeline.data.training_indices) - while a changed setting starts a new run.
RUN_IDENTITY_EXCLUDES = frozenset(
    {
        "num_workers",
        "min_workers",
        "use_gpu",
        "cpus_per_worker",
        "gpus_per_worker",
        "data_on_device",
        "channels_last",
        "compile",
        "checkpoint_num_to_keep",
        "max_failures",
        "storage_path",
        "run_name",
        "log_every_n_steps",
        "print_steps",
        "use_best_params",
    }
)


class EvaluateConfig(Section):
    num_importance_samples: int = Field(1000, ge=1, description="K for the importance-sampled log p(x)")
    importance_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="samples of z decoded at once per image; auto: as many as fit in free memory"
    )
    num_workers: int = Field(1, ge=1, description="Ray workers sharing the test images for the NLL")
    batch_size: int = Field(128, ge=1)
    max_images: int | None = Field(None, ge=1, description="evaluate on the first N test images only")
    attributes: list[str] = ["Smiling", "Eyeglasses"]
    num_image_rows: int = Field(8, ge=1)
    fid: bool | Literal["auto"] = Field(
        "auto", description="FID of samples and reconstructions; auto: skipped when the weights are missing"
    )
    fid_num_samples: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        "auto", description="generated images per FID; auto: 10,000 on a GPU, 2,000 on a CPU"
    )
    latent_scatter: str = Field(
        "auto",
        description="colour of the latent scatter: label, a CelebA attribute, none; auto: label or Smiling",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="arithmetic of the test -ELBO and the "
        "importance-sampled NLL, both alike; bf16 rounds the decoder's "
        "outputs and biases the likelihood (the likelihood terms are fp32 "
        "either way)",
    )


class MLflowConfig(Section):
    tracking_uri: str | None = Field(
        None, description="null: sqlite mlflow.db in the repo; MLFLOW_TRACKING_URI overrides"
    )
    experiment_name: str = "vae-celeba"
    registered_model_name: str | None = Field(
        "auto", description="auto: vae-<dataset>-<image side>, as train.run_name; null: register nothing"
    )
    log_images_every_n_epochs: int = Field(1, ge=1)
    system_metrics_interval_s: float | None = Field(
        10.0, ge=1, description="training runs log CPU/GPU utilisation and memory every this many seconds "
        "(MLflow system metrics, per node); null: off"
    )


class TuneConfig(Section):
    experiment_name: str = Field(
        "vae-sweep",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the MLflow experiment of the sweeps (letters, digits, _ . -); each sweep "
        "is one parent run there and a folder <train.storage_path>/tune/<name>-<hash>",
    )
    num_samples: int = Field(16, ge=1, description="trials in the sweep")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="null: as many as the cluster's CPUs/GPUs fit"
    )
    metric: Literal["val_negative_elbo", "val_bits_per_dim"] = "val_negative_elbo"
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA: 1/reduction_factor of the trials go on at each rung"
    )
    seed: int = Field(0, description="seed of Optuna's TPE sampler")
    epochs: int = Field(10, ge=1, description="epochs of a trial that is not stopped early (ASHA's max_t)")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) of each trial")
    cpus_per_trial_worker: float = Field(1.0, gt=0)
    gpus_per_trial_worker: float = Field(
        0.25,
        ge=0,
        le=8,
        description="fractions let several trials share a GPU; 0 or a cluster without GPUs: CPU training",
    )
    cpus_per_trial_driver: float = Field(
        0.05, gt=0, description="the Tune trial actor that only drives its Train run"
    )
    decision_timeout_s: float = Field(
        600.0,
        gt=0,
        description="longest wait of a trial's workers for the scheduler's "
        "decision after an epoch; then they go on",
    )
    search_space: SearchSpace = Field(default_factory=SearchSpace)

    @model_validator(mode="after")
    def _grace_within_epochs(self) -> TuneConfig:
        if self.grace_period > self.epochs:
            raise ValueError(
                f"tune.grace_period ({self.grace_period}) must be <= tune.epochs ({self.epochs})"
            )
        return self


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; null: RAY_ADDRESS or a local ray.init()")
    submit: bool = Field(False, description="DVC stages submit to the cluster with `ray job submit`")
    job_address: str | None = Field(
        None, description="the dashboard URL for `ray job submit` (http://head:8265)"
    )
    shared_dir: Path | None = Field(
        None,
        description="a folder all nodes and this machine see (NFS); submitted "
        "stages exchange inputs/outputs and keep checkpoints there. Null with train.storage_path on a bucket "
        "(s3://...): they go through the bucket",
    )
    s3_endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="endpoint of an S3-compatible store (MinIO, the local cluster's); null: "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS. Credentials never go here: the AWS environment "
        "variables or a profile",
    )


class Params(Section):
    data: DataConfig = DataConfig()
    download: DownloadConfig = DownloadConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    beta_schedule: BetaScheduleConfig = LinearWarmup()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MLflowConfig = MLflowConfig()
    tune: TuneConfig = TuneConfig()
    cluster: ClusterConfig = ClusterConfig()

    def default_name(self) -> str:
        """``vae-<dataset>-<image side>`` (``vae-celeba-64``, ``vae-fashion_mnist-28``,
        ``vae-image_folder-128``): what ``train.run_name`` and ``mlflow.registered_model_name`` mean by
        ``auto``."""
        side = 28 if self.data.dataset in ("mnist", "fashion_mnist") else self.data.image_size
        return f"vae-{self.data.dataset}-{side}"

    @model_validator(mode="after")
    def _names_from_the_dataset(self) -> Params:
        # "auto" becomes the name itself here, so every stage, the MLflow params and models/vae/params.json
        # see the same concrete name.
        name = self.default_name()
        if self.train.run_name == "auto":
            object.__setattr__(self, "train", self.train.model_copy(update={"run_name": name}))
        if self.mlflow.registered_model_name == "auto":
            object.__setattr__(self, "mlflow", self.mlflow.model_copy(update={"registered_model_name": name}))
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.train.min_workers and self.train.min_workers > self.train.num_workers:
            raise ValueError(
                f"train.min_workers ({self.train.min_workers}) must "
                f"be <= train.num_workers ({self.train.num_workers})"
            )
        if (
            self.data.dataset in ("mnist", "fashion_mnist")
            and self.model.architecture != "mlp"
            and len(self.model.hidden_dims) > 5
        ):
            raise ValueError("model.hidden_dims: at most 5 conv blocks fit 28x28 MNIST images")
        if self.model.likelihood == "bernoulli" and self.data.dataset in ("celeba", "image_folder"):
            raise ValueError(
                "model.likelihood: 'bernoulli' is for binarized MNIST-family data; for photographs use "
                "'discretized_logistic', 'categorical_256' or a Gaussian"
            )
        return self


class SearchedValues(Section):
    """The values a sweep searches, as one trial (or the best one) sets them: written to
    reports/tune/best_params.yaml and applied by the train stage with ``train.use_best_params``."""

    latent_dim: int = Field(ge=1, le=4096)
    learning_rate: float = Field(gt=0)
    beta_schedule: BetaScheduleConfig

    def apply(self, params: Params) -> Params:
        """``params`` with these values (the other settings unchanged)."""
        return params.model_copy(
            update={
                "model": params.model.model_copy(update={"latent_dim": self.latent_dim}),
                "train": params.train.model_copy(update={"learning_rate": self.learning_rate}),
                "beta_schedule": self.beta_schedule,
            }
        )


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {location or '<top level>'}: {item['msg']}{got_text}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping. Raises :class:`ConfigError` naming every bad field."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def flatten(params: Params) -> dict[str, Any]:
    """The config as flat ``section.key`` -> value pairs (MLflow params)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", params.model_dump(mode="json"))
    return flat
