"""infra/ for real clusters, checked without a cluster: every YAML parses; KubeRay objects use ray.io/v1 and
its current field names; all images are the one infra/Dockerfile builds; entrypoints, volumes, ConfigMaps
and params overrides point at things that exist; the `ray up` config passes Ray's own schema.

What each check is worth: the `ray up` config is validated against the real schema that the installed Ray
ships (``ray.autoscaler._private.util.validate_config``). The KubeRay manifests are checked against a static
copy of the field names below, written by hand from KubeRay's Go types (no Kubernetes API server or CRD is
available offline here): it catches typos and fields of old API versions, not a field KubeRay added or removed
after that copy. The params overrides are validated by the project's own config model."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
KUBERAY = INFRA / "kuberay"
RAY_UP = INFRA / "ray-up" / "aws-gpu.yaml"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))

# Fields of the KubeRay ray.io/v1 types (KubeRay 1.5-1.7: ray-operator/apis/ray/v1/*_types.go). A name
# outside these sets is a typo or a field from an old API version (v1alpha1's `runtimeEnv`, head `replicas`).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "env", "envFrom", "volumeMounts",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_all(path)]


def objects_of(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in k8s_objects() if doc["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's and each RayJob's rayClusterSpec."""
    specs = [(f"{p.name}:RayCluster", doc["spec"]) for p, doc in objects_of("RayCluster")]
    specs += [(f"{p.name}:RayJob", doc["spec"]["rayClusterSpec"]) for p, doc in objects_of("RayJob")]
    return specs


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod any manifest creates: Ray heads/workers and Deployments."""
    pods = []
    for label, spec in cluster_specs():
        pods.append((f"{label}:head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [
            (f"{label}:{g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])
        ]
    pods += [
        (f"{p.name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
        for p, doc in objects_of("Deployment")
    ]
    return pods


def dockerfile_image() -> str:
    found = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', (INFRA / "Dockerfile").read_text())
    assert found, (
        "infra/Dockerfile must name the image it builds in the org.opencontainers.image.ref.name label"
    )
    return found.group(1)


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    if path.parent == KUBERAY:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc.get('kind')}"
            assert doc["metadata"].get("name")


def test_expected_files_exist():
    for name in (
        "Dockerfile",
        "README.md",
        "local-cluster.sh",
        "local_cluster.py",
        "cluster_params.py",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/mlflow.yaml",
        "kuberay/storage.yaml",
        "kuberay/config.yaml",
        "ray-up/aws-gpu.yaml",
    ):
        assert (INFRA / name).is_file(), name
    assert os.access(INFRA / "local-cluster.sh", os.X_OK)


# ------------------------------------------------------------------------------------------- KubeRay
def test_kuberay_objects_use_ray_io_v1():
    kinds = [doc["kind"] for _, doc in k8s_objects()]
    assert kinds.count("RayCluster") >= 1 and kinds.count("RayJob") >= 2
    for path, doc in k8s_objects():
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['apiVersion']}"


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_fields_are_current(path):
    (job,) = load_all(path)
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown RayJob fields: {set(spec) - RAYJOB_SPEC}"
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert isinstance(spec.get("shutdownAfterJobFinishes"), bool)
    if spec.get("ttlSecondsAfterFinished") is not None:
        assert spec["shutdownAfterJobFinishes"], (
            "ttlSecondsAfterFinished only acts with shutdownAfterJobFinishes"
        )
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_raycluster_fields_are_current(label, spec):
    import ray

    assert set(spec) <= RAYCLUSTER_SPEC, f"unknown RayCluster fields: {set(spec) - RAYCLUSTER_SPEC}"
    # rayVersion: the Ray the image installs (pyproject pins ray 2.60.x, as this venv has).
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray 2.60 clusters should use token auth"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, f"unknown headGroupSpec fields: {set(head) - HEAD_GROUP}"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in [head, *groups]:
        # map[string]string in the CRD: an unquoted number or bool is rejected by the API server.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["template"]["spec"]["containers"], "the first container is the Ray container"
    for group in groups:
        assert set(group) <= WORKER_GROUP, f"unknown workerGroupSpec fields: {set(group) - WORKER_GROUP}"
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len({g["groupName"] for g in groups}) == len(groups)


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_cpu_head_and_gpu_workers(label, spec):
    def gpus(container: dict[str, Any]) -> int:
        return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))

    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert gpus(head) == 0
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]["spec"]["containers"][0]) >= 1]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


def test_all_images_are_the_dockerfile_image():
    image = dockerfile_image()
    name, tag = image.rsplit(":", 1)
    assert name.rsplit("/", 1)[1] == PYPROJECT["project"]["name"]
    assert tag == PYPROJECT["project"]["version"], "tag the image with the project version"
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{tag}"' in dockerfile
    assert f"-t {image} ." in dockerfile, "the build command in the Dockerfile's comment"
    used = [c["image"] for _, pod in pod_templates() for c in pod.get("containers", [])]
    used += [yaml.safe_load(RAY_UP.read_text())["docker"]["image"]]
    assert used and set(used) == {image}


def test_dockerfile_builds_cuda_pytorch_plus_the_project():
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert "pytorch" in base and "cuda" in base
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch>="))
    pinned = re.search(r">=(\d+\.\d+)", torch_pin).group(1)
    assert base.split(":")[1].startswith(pinned + "."), f"base image {base} vs pyproject {torch_pin}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert "COPY pyproject.toml" in dockerfile and "pip install -e ." in dockerfile
    assert "ray[default]" in dockerfile, "the dashboard (job API) needs ray[default]"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether a Docker build leaves ``path`` (relative to the context) out, by the .dockerignore
    ``patterns`` as Docker reads them: ``*`` and ``?`` within one path component, ``**`` for any number of
    folders, a leading ``!`` re-includes, the last matching pattern wins, and a pattern that matches a folder
    leaves out everything in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]
    excluded = False
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    for pattern in patterns:
        pieces = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.removeprefix("!").strip("/"))
        regex = "".join(wildcards.get(piece, re.escape(piece)) for piece in pieces)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not pattern.startswith("!")
    return excluded


def test_dockerignore_keeps_secrets_out_of_the_image():
    """`COPY . .` sends the whole checkout but what infra/Dockerfile.dockerignore leaves out: DVC's local
    config (the remote's credentials), .env files and tmp/ (the local cluster's generated credentials) must
    never reach an image that is pushed to a registry."""
    patterns = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for secret in (".dvc/config.local", ".env", "infra/kuberay/.env", "tmp/local-cluster/credentials.json",
                   ".git/config", ".dvc/cache/files/md5/ab/cdef"):
        assert dockerignore_excludes(secret, patterns), f"{secret} would be copied into the image"
    for needed in ("pyproject.toml", "pipeline/storage.py", "vae/model.py", "params.yaml"):
        assert not dockerignore_excludes(needed, patterns), f"{needed} is left out of the image"
    # The matcher itself: a '!' pattern re-includes, '**' spans folders, '*' does not.
    assert not dockerignore_excludes("tmp/keep", ["tmp", "!tmp/keep"])
    assert dockerignore_excludes("a/b/.env", ["**/.env"]) and not dockerignore_excludes("a/b.env", ["*.env"])


def _entrypoint_modules(command: str) -> list[str]:
    return re.findall(r"python3? -m ([\w.]+)", command)


def entrypoint_commands() -> list[tuple[str, str]]:
    commands = [(p.name, doc["spec"]["entrypoint"]) for p, doc in objects_of("RayJob")]
    return commands


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoints_reference_repo_files(path):
    (job,) = load_all(path)
    command = job["spec"]["entrypoint"]
    modules = _entrypoint_modules(command)
    assert modules and all(m.startswith("pipeline.") for m in modules)
    # Scripts run by path are files of the image, which holds the repository at /app.
    for script in re.findall(r"python3? (/app/\S+\.py)", command):
        assert (REPO_ROOT / script.removeprefix("/app/")).is_file(), script
    # The params overrides it reads come from a ConfigMap mounted at that path on the head (the driver).
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for file in re.findall(r"(/etc/vae/\S+)", command):
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volume = next(v for v in head["volumes"] if v["name"] == mounts[str(Path(file).parent)])
        configmaps = {doc["metadata"]["name"]: doc for _, doc in objects_of("ConfigMap")}
        assert Path(file).name in configmaps[volume["configMap"]["name"]]["data"]


STAGE_MODULES = sorted({m for _, command in entrypoint_commands() for m in _entrypoint_modules(command)})


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_entrypoint_modules_exist(module):
    """Each stage module a RayJob runs (`python -m pipeline.train`, `python -m pipeline.tune`) exists: a
    module
    file, or a package with a __main__.py."""
    path = REPO_ROOT / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), (
        f"{module}: no {path.relative_to(REPO_ROOT)}.py or "
        f"{path.relative_to(REPO_ROOT)}/__main__.py (a RayJob runs it)"
    )


def test_volumes_configmaps_and_claims_resolve():
    claims = {doc["metadata"]["name"] for _, doc in objects_of("PersistentVolumeClaim")}
    configmaps = {doc["metadata"]["name"] for _, doc in objects_of("ConfigMap")}
    for label, pod in pod_templates():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{label}: volumeMount {mount['name']} has no volume"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, label
                if "secretRef" in source:  # secrets are the user's; only optional ones may be referenced
                    assert source["secretRef"].get("optional") is True, label
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, label
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, label
    rwx = [
        doc for _, doc in objects_of("PersistentVolumeClaim") if "ReadWriteMany" in doc["spec"]["accessModes"]
    ]
    assert rwx, "the Ray pods share one ReadWriteMany volume"


def test_ray_pods_mount_the_shared_volume_and_get_mlflow():
    (env,) = [doc for _, doc in objects_of("ConfigMap") if doc["metadata"]["name"] == "vae-env"]
    shared = env["data"]["VAE_SHARED_STORAGE"]
    for label, spec in cluster_specs():
        for pod in [
            spec["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in spec["workerGroupSpecs"]),
        ]:
            ray_container = pod["containers"][0]
            assert shared in {m["mountPath"] for m in ray_container["volumeMounts"]}, label
            refs = {
                s["configMapRef"]["name"] for s in ray_container.get("envFrom", []) if "configMapRef" in s
            }
            assert "vae-env" in refs, label
    # MLFLOW_TRACKING_URI names the MLflow Service and its port.
    url = urlparse(env["data"]["MLFLOW_TRACKING_URI"])
    services = {doc["metadata"]["name"]: doc for _, doc in objects_of("Service")}
    assert url.scheme == "http" and url.hostname in services
    assert url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}
    (deployment,) = [doc for _, doc in objects_of("Deployment") if doc["metadata"]["name"] == url.hostname]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--backend-store-uri" in args and "--artifacts-destination" in args
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert url.hostname in allowed or f"{url.hostname}:*" in allowed, (
        "MLflow 3 must accept the Service's Host"
    )


# ------------------------------------------------------------------------------------ params overrides
def _overrides() -> list[tuple[str, dict[str, Any]]]:
    (params,) = [doc for _, doc in objects_of("ConfigMap") if doc["metadata"]["name"] == "vae-params"]
    return [
        ("kuberay vae-params", yaml.safe_load(params["data"]["overrides.yaml"])),
        (
            "ray-up params-overrides.yaml",
            yaml.safe_load((INFRA / "ray-up" / "params-overrides.yaml").read_text()),
        ),
    ]


@pytest.mark.parametrize("label,overrides", _overrides(), ids=lambda v: v if isinstance(v, str) else "")
def test_cluster_params_overrides_validate_and_use_shared_storage(label, overrides, tmp_path):
    sys.path.insert(0, str(INFRA))
    try:
        import cluster_params
    finally:
        sys.path.remove(str(INFRA))
    merged = cluster_params.merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), overrides)
    from pipeline.config import parse_params

    params = parse_params(merged, label)
    # Checkpoints and data on the shared mount; GPU workers.
    assert str(params.train.storage_path).startswith("/mnt/vae/")
    assert str(params.data.processed_dir).startswith("/mnt/vae/")
    assert params.train.use_gpu is True and params.train.gpus_per_worker >= 1
    # The CLI writes the same, validated.
    overrides_file = tmp_path / "overrides.yaml"
    overrides_file.write_text(yaml.safe_dump(overrides))
    assert cluster_params.main([str(overrides_file), "-o", str(tmp_path / "p.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "p.yaml").read_text()) == merged


def test_cluster_params_rejects_unknown_keys(tmp_path, capsys):
    sys.path.insert(0, str(INFRA))
    try:
        import cluster_params
    finally:
        sys.path.remove(str(INFRA))
    assert cluster_params.main(["--set", "train.no_such_knob=1", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "train.no_such_knob" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


# ---------------------------------------------------------------------------------------------- ray up
def test_ray_up_config_has_the_required_keys():
    config = yaml.safe_load(RAY_UP.read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "max_workers",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert workers and all({"min_workers", "max_workers", "node_config"} <= set(t) for t in workers.values())
    assert any(t["min_workers"] < t["max_workers"] for t in workers.values()), "autoscaling GPU workers"
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values()), (
        "GPU instances"
    )
    # The synced project imports on every node (the image installed it editable at /app); token auth on
    # every node; jobs get MLflow + shared storage.
    assert any("import pipeline" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/app"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=" in start and "ray start" in start
    assert any("auth_token" in target for target in config["file_mounts"])
    assert any("/mnt/vae:/mnt/vae" in option for option in config["docker"]["run_options"])


def test_ray_up_config_passes_rays_own_validation():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # fills Ray's AWS defaults, then its full validation


# -------------------------------------------------------------------------------------------- README
def test_readme_covers_every_infra_file_and_the_steps():
    readme = (INFRA / "README.md").read_text()
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and path.name not in ("README.md",) and "__pycache__" not in path.parts:
            assert str(path.relative_to(REPO_ROOT)) in readme, (
                f"README does not mention {path.relative_to(REPO_ROOT)}"
            )
    for step in ("local-cluster.sh up", "ray job submit", "ray up", "kubectl apply", "docker build"):
        assert step in readme, step
    # Every shell command line the README shows for the local cluster uses flags that exist.
    for line in re.findall(r"infra/local-cluster\.sh ([^\n`]+)", readme):
        args = shlex.split(line.split("#")[0])
        if args and args[0] in ("up", "down", "status", "env"):
            from infra.cluster.cli import build_parser

            build_parser().parse_args(args)


def test_the_plain_mlflow_server_admits_only_the_ray_pods():
    """infra/kuberay/mlflow.yaml has no accounts: a NetworkPolicy selects exactly its pods and admits, on its
    port only, pods that KubeRay labels as Ray nodes."""
    docs = load_all(KUBERAY / "mlflow.yaml")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert set(spec) == {"podSelector", "policyTypes", "ingress"}  # no egress rules, no other selectors


# ------------------------------------------------------------------------------ the team deployment
TEAM = KUBERAY / "team"
RAY_UP_TEAM = INFRA / "ray-up" / "aws-team.yaml"


def team_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in sorted(TEAM.glob("*.yaml")) for doc in load_all(path) if doc["kind"] == kind]


def test_team_kuberay_cluster_shares_no_volume_and_takes_secrets_from_kubernetes():
    (cluster,) = team_objects("RayCluster")
    spec = cluster["spec"]
    configmaps = {doc["metadata"]["name"] for doc in team_objects("ConfigMap")}
    for pod in [spec["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]:
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "nodes share no volume"
        container = pod["containers"][0]
        refs = [s for s in container["envFrom"]]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= configmaps
        secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
        assert secrets == {"vae-s3", "vae-mlflow-client"}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        (env,) = [d for d in team_objects("ConfigMap") if d["metadata"]["name"] == "vae-team-env"]
        assert env["data"]["VAE_DATA_CACHE"] in mounts  # each pod's own cache, an emptyDir
    assert set(cluster["spec"]) <= RAYCLUSTER_SPEC


def test_team_mlflow_runs_in_postgres_with_basic_auth_and_proxies_artifacts_to_the_bucket():
    (deployment,) = team_objects("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert "--app-name basic-auth" in command and "--artifacts-destination s3://" in command
    # The store URI holds the database password: never an argument (anyone reads /proc/<pid>/cmdline).
    assert "--backend-store-uri" not in command and "postgresql://" not in command
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "vae-mlflow-db"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "vae-mlflow-flask"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    (service,) = team_objects("Service")
    (envmap,) = [d for d in team_objects("ConfigMap") if d["metadata"]["name"] == "vae-team-env"]
    url = urlparse(envmap["data"]["MLFLOW_TRACKING_URI"])
    assert url.hostname == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"]
    assert container["image"] == dockerfile_image()


@pytest.mark.parametrize("label", ["kuberay", "ray-up"])
def test_team_params_put_data_and_checkpoints_in_the_bucket(label):
    from pipeline.config import parse_params

    sys.path.insert(0, str(INFRA))
    try:
        import cluster_params
    finally:
        sys.path.remove(str(INFRA))
    if label == "kuberay":
        (params,) = [d for d in team_objects("ConfigMap") if d["metadata"]["name"] == "vae-team-params"]
        overrides = yaml.safe_load(params["data"]["overrides.yaml"])
    else:
        overrides = yaml.safe_load((INFRA / "ray-up" / "params-overrides-team.yaml").read_text())
    merged = parse_params(
        cluster_params.merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), overrides), label)
    assert merged.train.storage_path.startswith("s3://") and merged.data.processed_dir.startswith("s3://")
    assert merged.data.processed_location().startswith("s3://")


def test_team_ray_up_config_uses_no_shared_file_system_and_no_secret_in_the_file():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = RAY_UP_TEAM.read_text()
    config = yaml.safe_load(text)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    assert "/mnt/vae" not in text and "nfs" not in text.lower()
    head = " ".join(config["head_start_ray_commands"])
    assert "--app-name basic-auth" in head and "--artifacts-destination s3://" in head
    assert "secretsmanager get-secret-value" in head and "postgresql://" not in head
    assert "--backend-store-uri" not in head and "MLFLOW_BACKEND_STORE_URI=$(aws secretsmanager" in head
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=$(aws secretsmanager" in head
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "VAE_DATA_CACHE=" in start and "MLFLOW_TRACKING_PASSWORD=" in start


def test_the_threat_model_names_only_tests_that_exist():
    """infra/SECURITY.md backs each line with a test: every `file::test` it names is defined there."""
    text = (INFRA / "SECURITY.md").read_text()
    named = set(re.findall(r"`(test_[a-z_]+)::(test_[a-z0-9_]+)", text))
    assert len(named) >= 10
    for module, test in sorted(named):
        assert f"def {test}(" in (REPO_ROOT / "tests" / f"{module}.py").read_text(), (module, test)


# ------------------------------------------------------------------------------------- least privilege
# The fields of the Kubernetes core/v1 PodSecurityContext and SecurityContext types (k8s.io/api 1.33); a name
# outside them is a typo the API server would reject or, with lenient decoding, silently drop.
POD_SECURITY_CONTEXT = {
    "seLinuxOptions", "windowsOptions", "runAsUser", "runAsGroup", "runAsNonRoot", "supplementalGroups",
    "supplementalGroupsPolicy", "fsGroup", "sysctls", "fsGroupChangePolicy", "seccompProfile",
    "appArmorProfile", "seLinuxChangePolicy",
}
CONTAINER_SECURITY_CONTEXT = {
    "capabilities", "privileged", "seLinuxOptions", "windowsOptions", "runAsUser", "runAsGroup",
    "runAsNonRoot", "readOnlyRootFilesystem", "allowPrivilegeEscalation", "procMount", "seccompProfile",
    "appArmorProfile",
}


def image_user() -> tuple[int, int]:
    """The (uid, gid) infra/Dockerfile's last ``USER`` names, its build args resolved.

    Raises:
        AssertionError: no USER, or a name instead of numbers (Kubernetes' runAsNonRoot cannot check a name).
    """
    dockerfile = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users, "infra/Dockerfile has no USER: the image would run as root"
    value = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1])
    uid, _, gid = value.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {users[-1]}: numeric uid:gid (runAsNonRoot checks numbers)"
    return int(uid), int(gid)


def every_pod() -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod any manifest under infra/kuberay/ (team/ included) makes: Ray heads and
    workers, the RayJobs' submitters, the Deployments."""
    pods = []
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for doc in load_all(path):
            label = f"{path.relative_to(KUBERAY)}:{doc['kind']}"
            if doc["kind"] == "RayJob":
                pods.append((f"{label}:submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
            if doc["kind"] in ("RayJob", "RayCluster"):
                spec = doc["spec"].get("rayClusterSpec", doc["spec"])
                pods.append((f"{label}:head", spec["headGroupSpec"]["template"]["spec"]))
                pods += [(f"{label}:{group['groupName']}", group["template"]["spec"])
                         for group in spec["workerGroupSpecs"]]
            if doc["kind"] == "Deployment":
                pods.append((f"{label}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return pods


def test_the_image_runs_as_a_numeric_non_root_user_who_owns_the_project():
    """No process of the image runs as root: the last USER is a numeric uid:gid other than 0, made by
    useradd with that uid, and /app (data/, runs/, `ray up`'s file syncs) and the volume's mount point belong
    to it. (No Docker daemon here: the Dockerfile is read, not built.)"""
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    dockerfile = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], dockerfile)
    assert re.search(rf"useradd --uid {uid} --gid {gid}\b", resolved)
    assert f"chown -R {uid}:{gid} /app" in resolved and f"chown {uid}:{gid} /mnt/vae" in resolved
    last_user = resolved.rindex("\nUSER ")
    assert "pip install" not in resolved[last_user:], "packages are installed as root, before USER"


@pytest.mark.parametrize("label,pod", every_pod(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pod_runs_as_the_image_user_without_privileges(label, pod):
    """Each pod: runAsNonRoot with the image's uid and gid (fsGroup too where it mounts volumes, so they are
    writable), the runtime's default seccomp profile; each container (and the autoscaler sidecar): no
    privilege escalation and every capability dropped. Field names checked against the Kubernetes types."""
    uid, gid = image_user()
    context = pod["securityContext"]
    assert set(context) <= POD_SECURITY_CONTEXT, set(context) - POD_SECURITY_CONTEXT
    assert context["runAsNonRoot"] is True and context["runAsUser"] == uid and context["runAsGroup"] == gid
    if pod.get("volumes"):
        assert context["fsGroup"] == gid
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        own = container["securityContext"]
        assert set(own) <= CONTAINER_SECURITY_CONTEXT, set(own) - CONTAINER_SECURITY_CONTEXT
        assert own["allowPrivilegeEscalation"] is False and own["capabilities"] == {"drop": ["ALL"]}
        assert own.get("runAsUser", uid) == uid and own.get("privileged", False) is False


def test_the_autoscaler_sidecars_and_ray_up_containers_drop_every_privilege():
    """The in-tree autoscaler KubeRay adds gets the same container securityContext; `ray up`'s containers run
    as the image's user with no capability and no-new-privileges, the token synced to that user's home (not
    /root), the host folders they write owned by its uid, and nothing installed into site-packages."""
    uid, gid = image_user()
    for label, spec in cluster_specs() + [("team", team_objects("RayCluster")[0]["spec"])]:
        if spec.get("enableInTreeAutoscaling"):
            own = spec["autoscalerOptions"]["securityContext"]
            assert own["allowPrivilegeEscalation"] is False, label
            assert own["capabilities"] == {"drop": ["ALL"]}, label
    for path in (RAY_UP, RAY_UP_TEAM):
        config = yaml.safe_load(path.read_text())
        options = config["docker"]["run_options"]
        assert "--cap-drop=ALL" in options and "--security-opt=no-new-privileges" in options, path.name
        assert not any(target.startswith("/root") for target in config["file_mounts"]), path.name
        assert "~/.ray/auth_token" in config["file_mounts"]
        assert not any("pip install" in command for command in config["setup_commands"]), path.name
        mounted = [option.split()[1].split(":")[0] for option in options if option.startswith("-v ")]
        for folder in mounted:
            assert any(f"chown {uid}:{gid} {folder}" in c for c in config["initialization_commands"]), folder


def test_team_mlflow_tls_certificate_names_the_tracking_uri_and_every_ray_pod_holds_its_ca():
    """The team shape speaks HTTPS to MLflow: MLFLOW_TRACKING_URI is https://<Service>:<port>; cert-manager
    issues the server's certificate, for that Service name, from the team CA into the Secret the Deployment
    mounts; every Ray container mounts that Secret's ca.crt where MLFLOW_TRACKING_SERVER_CERT_PATH points.
    (test_security runs the Deployment's command and checks the handshake.)"""
    docs = [doc for path in sorted(TEAM.glob("*.yaml")) for doc in load_all(path)]
    (env,) = [d for d in team_objects("ConfigMap") if d["metadata"]["name"] == "vae-team-env"]
    uri = urlparse(env["data"]["MLFLOW_TRACKING_URI"])
    (service,) = team_objects("Service")
    assert uri.scheme == "https" and uri.hostname == service["metadata"]["name"]
    assert uri.port == service["spec"]["ports"][0]["port"]
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    (server,) = [c for c in certificates.values() if not c.get("isCA")]
    assert uri.hostname in server["dnsNames"]
    ca_issuer = issuers[server["issuerRef"]["name"]]
    assert ca_issuer["ca"]["secretName"] in {c["secretName"] for c in certificates.values() if c.get("isCA")}
    (deployment,) = team_objects("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mlflow_container,) = pod["containers"]
    mount = next(m for m in mlflow_container["volumeMounts"]
                 if volumes[m["name"]].get("secret", {}).get("secretName") == server["secretName"])
    (script,) = mlflow_container["args"]
    assert f"--ssl-certfile {mount['mountPath']}/tls.crt" in script
    assert f"--ssl-keyfile {mount['mountPath']}/tls.key" in script
    assert mlflow_container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    cert_path = Path(env["data"]["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    (cluster,) = team_objects("RayCluster")
    spec = cluster["spec"]
    for ray_pod in [spec["headGroupSpec"]["template"]["spec"],
                    *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]:
        ray_volumes = {v["name"]: v for v in ray_pod["volumes"]}
        for container in ray_pod["containers"]:
            (mounted,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(cert_path.parent)]
            source = ray_volumes[mounted["name"]]["secret"]
            assert source["secretName"] == server["secretName"]
            assert source["items"] == [{"key": "ca.crt", "path": cert_path.name}]  # the CA only, not the key
