"""params.yaml is loaded once into a typed, validated configuration; every error names the field (and, for
choices, the allowed values)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    Params,
    flatten,
    parse_params,
    set_dotted,
)
from pipeline.params_file import DEFAULT_PARAMS, load_params
from vae.model import VAE
from vae.schedules import ConstantBeta, CyclicalBeta, LinearWarmup, make_schedule

LIKELIHOOD_NAMES = ("bernoulli", "gaussian_fixed", "gaussian_learned_scalar", "gaussian_learned_pixel",
                    "categorical_256", "discretized_logistic")
SCHEDULE_NAMES = ("constant", "linear", "cyclical", "sigmoid", "capacity")


@pytest.fixture(autouse=True)
def _no_params_env(monkeypatch):
    monkeypatch.delenv("VAE_PARAMS", raising=False)


@pytest.fixture
def raw() -> dict:
    """The repository's params.yaml as a plain mapping."""
    return yaml.safe_load(DEFAULT_PARAMS.read_text())


def _write(tmp_path: Path, content: dict | str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _error(raw: dict, tmp_path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        load_params(_write(tmp_path, raw), overrides)
    return str(error.value)


# ---------------------------------------------------------------------------------------------- valid


def test_repository_params_validate_and_keep_their_values(raw):
    params = load_params()
    assert isinstance(params, Params)
    flat = flatten(params)
    for section, values in raw.items():
        if section == "beta_schedule":
            continue
        for key, value in values.items():
            got = flat.get(f"{section}.{key}")
            if isinstance(value, (int, float, str, bool)) and not isinstance(got, str):
                assert got == value, f"{section}.{key}"
    assert params.beta_schedule.name == raw["beta_schedule"]["name"]
    for key, value in raw["beta_schedule"].items():
        assert getattr(params.beta_schedule, key) == value


def test_repository_model_and_schedule_build(raw):
    params = load_params()
    model = params.model
    size = params.data.image_size if params.data.dataset == "celeba" else 28
    channels = 3 if params.data.dataset == "celeba" else 1
    vae = VAE(
        model.architecture,
        (channels, size, size),
        model.latent_dim,
        model.hidden_dims,
        model.likelihood,
        model.gaussian_std,
    )
    assert vae.latent_dim == model.latent_dim
    # the pipeline hands model_dump()["beta_schedule"] to make_schedule: it must give the same schedule back
    assert make_schedule(params.model_dump()["beta_schedule"]) == params.beta_schedule


def test_params_yaml_is_the_code_defaults_written_out():
    """The defaults exist once, in pipeline/config.py (and the schedule and search-space classes it uses);
    params.yaml lists every setting with exactly those values, so neither can drift from the other."""
    assert load_params(DEFAULT_PARAMS) == Params()
    written = yaml.safe_load(DEFAULT_PARAMS.read_text())
    code = Params().model_dump(mode="json")
    missing = []

    def walk(prefix: str, expected, given) -> None:
        if prefix == "tune.search_space":  # searched values: a family's unnamed parameters keep its defaults
            return
        if isinstance(expected, dict):
            for key, value in expected.items():
                if not isinstance(given, dict) or key not in given:
                    missing.append(f"{prefix}.{key}".lstrip("."))
                else:
                    walk(f"{prefix}.{key}".lstrip("."), value, given[key])

    walk("", code, written)
    assert not missing, f"params.yaml does not list {missing}"


def test_empty_file_gives_the_defaults(tmp_path):
    params = load_params(_write(tmp_path, ""))
    assert params == Params()
    assert isinstance(params.beta_schedule, LinearWarmup)


def test_vae_params_environment_variable(tmp_path, monkeypatch, raw):
    raw["train"]["epochs"] = 3
    monkeypatch.setenv("VAE_PARAMS", str(_write(tmp_path, raw)))
    assert load_params().train.epochs == 3


def test_params_are_frozen():
    params = load_params()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen models
        params.train.epochs = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_with_dotted_keys(raw):
    params = load_params(
        overrides={
            "train.epochs": 2,
            "model.hidden_dims": [8, 16],
            "model.latent_dim": 4,
            "beta_schedule": {"name": "constant", "beta": 4.0},
        }
    )
    assert params.train.epochs == 2 and params.model.hidden_dims == [8, 16] and params.model.latent_dim == 4
    assert params.beta_schedule == ConstantBeta(beta=4.0)
    assert params.train.batch_size == raw["train"]["batch_size"]  # everything else as in the file
    assert yaml.safe_load(DEFAULT_PARAMS.read_text()) == raw  # the file is not touched


def test_dotted_override_inside_the_schedule():
    params = load_params(
        overrides={
            "beta_schedule": {"name": "cyclical"},
            "beta_schedule.num_cycles": 3,
            "beta_schedule.ratio": 0.25,
        }
    )
    assert params.beta_schedule == CyclicalBeta(num_cycles=3, ratio=0.25)


def test_overrides_are_validated_too():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_params(overrides={"train.epochs": 0})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"low": 1.0e-3, "high": 1.0e-4, "log": True},
            r"tune\.search_space\.learning_rate.*low \(0\.001\) must be < high",
        ),
        (
            {"low": 0.0, "high": 1.0e-3, "log": True},
            r"tune\.search_space\.learning_rate.*log range needs low > 0",
        ),
    ],
)
def test_search_ranges_are_checked(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_params(overrides={"tune.search_space.learning_rate": spec})
    with pytest.raises(ConfigError, match=r"num_cycles.*low \(6\) must be < high \(2\)"):
        load_params(overrides={"tune.search_space.beta_schedule.cyclical.num_cycles": {"low": 6, "high": 2}})


def test_set_dotted_creates_sections():
    tree: dict = {"a": {"x": 1}}
    set_dotted(tree, "a.b.c", 2)
    set_dotted(tree, "d", 3)
    assert tree == {"a": {"x": 1, "b": {"c": 2}}, "d": 3}


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_section_is_named(raw, tmp_path):
    raw["modle"] = {"latent_dim": 3}
    assert "modle" in _error(raw, tmp_path)


def test_unknown_key_is_named(raw, tmp_path):
    raw["model"]["latent_dims"] = 3
    assert "model.latent_dims" in _error(raw, tmp_path)


def test_bad_choice_names_the_field_and_the_allowed_values(raw, tmp_path):
    raw["model"]["likelihood"] = "gaussian"
    message = _error(raw, tmp_path)
    assert "model.likelihood" in message and "'gaussian'" in message
    for name in LIKELIHOOD_NAMES:
        assert name in message
    raw["model"]["likelihood"] = "discretized_logistic"
    raw["model"]["architecture"] = "vit"
    message = _error(raw, tmp_path)
    assert "model.architecture" in message and all(name in message for name in ("mlp", "conv", "resnet"))


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        ("train.batch_size", 1, "greater than or equal to 2"),
        ("train.learning_rate", 0.0, "greater than 0"),
        ("model.latent_dim", "many", "valid integer"),
        ("model.hidden_dims", [], "at least 1"),
        ("model.gaussian_std", -0.1, "greater than 0"),
        ("evaluate.num_importance_samples", 0, "greater than or equal to 1"),
        ("data.dataset", "imagenet", "'celeba', 'mnist', 'fashion_mnist' or 'image_folder'"),
    ],
)
def test_bad_value_names_the_field(tmp_path, raw, dotted, value, expected):
    message = _error(raw, tmp_path, {dotted: value})
    assert dotted in message and expected in message, message


def test_every_bad_field_is_reported_at_once(raw, tmp_path):
    message = _error(raw, tmp_path, {"train.epochs": 0, "model.latent_dim": 0, "evaluate.batch_size": 0})
    assert all(field in message for field in ("train.epochs", "model.latent_dim", "evaluate.batch_size"))
    assert "3 invalid setting(s)" in message


def test_unknown_schedule_lists_the_allowed_names(raw, tmp_path):
    message = _error(raw, tmp_path, {"beta_schedule": {"name": "cosine"}})
    assert "beta_schedule" in message and "'cosine'" in message
    for name in SCHEDULE_NAMES:
        assert name in message


@pytest.mark.parametrize(
    "schedule, field",
    [
        ({"name": "cyclical", "ratio": 1.5}, "ratio"),
        ({"name": "cyclical", "num_cycles": 0}, "num_cycles"),
        ({"name": "constant", "beta": -1.0}, "beta"),
        ({"name": "linear", "warmup_steps": 0}, "warmup_steps"),
        ({"name": "capacity", "capacity_steps": 0}, "capacity_steps"),
        ({"name": "sigmoid", "steepness": -1.0}, "steepness"),
    ],
)
def test_bad_schedule_value_names_the_field(raw, tmp_path, schedule, field):
    message = _error(raw, tmp_path, {"beta_schedule": schedule})
    assert f"beta_schedule.{field}" in message, message


def test_unknown_schedule_field_is_named(raw, tmp_path):
    message = _error(raw, tmp_path, {"beta_schedule": {"name": "linear", "warmup_step": 10}})
    assert "beta_schedule" in message and "warmup_step" in message


def test_cross_field_check_names_the_field(raw, tmp_path):
    message = _error(raw, tmp_path, {"data.dataset": "celeba", "model.likelihood": "bernoulli"})
    assert "model.likelihood" in message and "bernoulli" in message


def test_missing_file_bad_yaml_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(_write(tmp_path, "- a\n- b\n"))


def test_parse_params_names_the_source():
    with pytest.raises(ConfigError, match=r"^my-source: ") as error:
        parse_params({"train": {"epochs": -1}}, source="my-source")
    assert "train.epochs" in str(error.value)


# ---------------------------------------------------------------------------------------------- flatten


def test_flatten_gives_dotted_scalar_keys():
    params = load_params(
        overrides={"model.hidden_dims": [8, 16], "beta_schedule": {"name": "constant", "beta": 2.0}}
    )
    flat = flatten(params)
    assert flat["model.latent_dim"] == params.model.latent_dim
    assert flat["model.hidden_dims"] == [8, 16]
    assert flat["beta_schedule.name"] == "constant" and flat["beta_schedule.beta"] == 2.0
    assert isinstance(flat["data.raw_dir"], str)  # paths as strings (MLflow params)
    assert all("." in key for key in flat)
    assert not any(isinstance(value, dict) and value for value in flat.values())
    # every leaf of the dumped model appears exactly once
    dumped = params.model_dump(mode="json")
    assert len([k for k in flat if k.startswith("train.")]) == len(dumped["train"])


def test_run_and_model_names_default_from_the_dataset_unless_set():
    assert parse_params({}).train.run_name == "vae-celeba-64"
    mnist = parse_params({"data": {"dataset": "fashion_mnist", "image_size": 64}})
    assert (mnist.train.run_name, mnist.mlflow.registered_model_name) == ("vae-fashion_mnist-28",) * 2
    own = parse_params({"data": {"dataset": "image_folder", "image_size": 128}})
    assert (own.train.run_name, own.mlflow.registered_model_name) == ("vae-image_folder-128",) * 2
    assert parse_params(own.model_dump(mode="json")) == own  # the concrete names survive a round trip
    chosen = parse_params({"train": {"run_name": "mine"}, "mlflow": {"registered_model_name": None}})
    assert (chosen.train.run_name, chosen.mlflow.registered_model_name) == ("mine", None)
