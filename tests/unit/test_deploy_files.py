"""Deployment files: the wiring between compose services, Kubernetes objects and settings.

Parses and merges the files the way compose does (tests/unit/test_compose_render.py
checks that podman-compose and Docker Compose render them the same way, and
scripts/test-containers runs them). Compose `${VAR:-default}` substitutions resolve to
their defaults, i.e. what `docker compose up` does with no `.env`, or to a
combination's env file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
DEV = ROOT / "deploy" / "compose.dev.yml"
EDIT = ROOT / "deploy" / "compose.edit.yml"
REFINE_EDIT = ROOT / "deploy" / "compose.refine-edit.yml"
ONE_GPU_ENV = ROOT / "deploy" / "one-gpu.env"
MORE_WORKERS = ROOT / "deploy" / "compose.more-workers.yml"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"

# Every supported combination: compose files, and the env file given with --env-file.
COMBINATIONS: dict[str, tuple[list[Path], Path | None]] = {
    "base": ([BASE], None),
    "dev": ([BASE, DEV], None),
    "edit": ([BASE, EDIT], None),
    "refine-edit": ([BASE, REFINE_EDIT], None),
    "one-gpu": ([BASE], ONE_GPU_ENV),
    "more-workers": ([BASE, MORE_WORKERS], None),
}
VLLM_IMAGE = "vllm/vllm-openai"
VLLM_DEFAULT_PORT = 8000
# Not a settings name: no trailing underscore, so "GCR_" in prose does not count.
GCR_NAME = re.compile(r"\bGCR_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
SUBSTITUTION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


# --- loading compose files the way `docker compose` merges them --------------------


class _Tagged:
    """A value carrying compose's `!reset` / `!override` merge tag."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value


class _ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]  # types-PyYAML is not installed
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> _Tagged:
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    else:
        raise TypeError(f"unexpected node {node!r}")
    return _Tagged(node.tag, value)


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    """Resolve `${VAR:-default}` to the variable where set, else to its default."""
    if isinstance(value, str):

        def resolve(match: re.Match[str]) -> str:
            given = variables.get(match.group("name"))
            return given if given else (match.group("default") or "")

        return SUBSTITUTION.sub(resolve, value)
    if isinstance(value, dict):
        return {key: _substitute(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, variables) for item in value]
    if isinstance(value, _Tagged):
        return _Tagged(value.tag, _substitute(value.value, variables))
    return value


def read_env_file(path: Path | None) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped (compose's env file format)."""
    if path is None:
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge, reduced to what these files use: mappings merge key by key,
    `!reset` removes, `!override` and every other value replace. (Compose appends
    some sequences, e.g. ports; no assertion here depends on that.)"""
    if isinstance(override, _Tagged):
        return None if override.tag == "!reset" else _strip(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = _merge(base.get(key), value)
            if result is None and isinstance(value, _Tagged):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return _strip(override)


def _strip(value: Any) -> Any:
    if isinstance(value, _Tagged):
        return _strip(value.value)
    if isinstance(value, dict):
        return {key: _strip(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strip(item) for item in value]
    return value


def load_compose(*paths: Path, env_file: Path | None = None) -> dict[str, Any]:
    variables = read_env_file(env_file)
    merged: dict[str, Any] = {}
    for path in paths:
        document = yaml.load(path.read_text(), Loader=_ComposeLoader)
        assert isinstance(document, dict), f"{path}: not a mapping"
        merged = _merge(merged, _substitute(document, variables))
    return merged


def load_combination(name: str) -> dict[str, Any]:
    paths, env_file = COMBINATIONS[name]
    return load_compose(*paths, env_file=env_file)


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = config["services"]
    return found


def active(config: dict[str, Any]) -> set[str]:
    """Services a plain `docker compose up` starts (no --profile)."""
    return {name for name, svc in services(config).items() if not svc.get("profiles")}


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command") or []
    assert isinstance(raw, list), "use the exec (list) form for commands"
    return [str(part) for part in raw]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def listen_port(service: dict[str, Any]) -> int:
    args = command(service)
    port = flag(args, "--port")
    if port is not None:
        return int(port)
    assert is_vllm(service), f"say --port in the command of {service.get('image')}"
    return VLLM_DEFAULT_PORT


def is_vllm(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith(VLLM_IMAGE)


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations", {})
    return [
        device
        for device in reservations.get("devices", [])
        if device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
    ]


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck"
    return " ".join(test) if isinstance(test, list) else str(test)


@pytest.fixture(params=sorted(COMBINATIONS))
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_combination(request.param)


# --- compose ------------------------------------------------------------------------


def test_dockerfile_has_the_build_targets_compose_uses() -> None:
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M | re.I))
    assert {"gateway", "worker"} <= stages
    for combination in COMBINATIONS:
        for name, svc in services(load_combination(combination)).items():
            build = svc.get("build")
            if isinstance(build, dict) and "target" in build:
                assert build["target"] in stages, f"{name}: no stage {build['target']!r} in the Dockerfile"


def test_every_redis_url_points_at_the_redis_service(config: dict[str, Any]) -> None:
    redis = services(config)["redis"]
    seen = 0
    for name, svc in services(config).items():
        url = env(svc).get("GCR_REDIS_URL")
        if url is None:
            continue
        seen += 1
        parts = urlsplit(url)
        assert parts.scheme == "redis" and parts.hostname == "redis", f"{name}: {url}"
        assert (parts.port or 6379) == 6379, f"{name}: {url}"
        assert "redis" in active(config)
        assert svc.get("depends_on", {}).get("redis", {}).get("condition") == "service_healthy", name
    assert seen >= 2  # gateway and worker at least
    assert "redis-cli" in healthcheck_text(redis) and "ping" in healthcheck_text(redis)


def test_redis_persists_with_an_append_only_file() -> None:
    redis = services(load_compose(BASE))["redis"]
    args = command(redis)
    assert flag(args, "--appendonly") == "yes"
    assert flag(args, "--appendfsync") == "everysec"
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])
    # full: refuse writes rather than evict jobs (a queue must never lose an entry)
    assert flag(args, "--maxmemory") and flag(args, "--maxmemory-policy") == "noeviction"


def test_critic_urls_reach_a_started_server_on_its_port(config: dict[str, Any]) -> None:
    all_services = services(config)
    for name, svc in all_services.items():
        if name not in active(config):
            continue
        variables = env(svc)
        url = variables.get("GCR_CRITIC_BASE_URL")
        if url is None:
            continue
        parts = urlsplit(url)
        host = parts.hostname
        assert host in all_services, f"{name}: critic host {host!r} is not a service"
        assert host in active(config), f"{name}: critic {host!r} is not started by a plain `up`"
        target = all_services[host]
        assert parts.port == listen_port(target), f"{name}: {url} but {host} listens elsewhere"
        assert parts.path.rstrip("/") == "/v1", f"{name}: {url}"
        if is_vllm(target):
            served = flag(command(target), "--served-model-name")
            assert variables["GCR_CRITIC_MODEL"] == served, f"{name}: {host} serves {served}"
            # one base URL, one vLLM, one model: the edit model must be that model too
            assert variables.get("GCR_CRITIC_EDIT_MODEL", served) == served, name


def test_workers_depend_on_started_services_only(config: dict[str, Any]) -> None:
    for name in active(config):
        for dependency in services(config)[name].get("depends_on") or {}:
            assert dependency in active(config), f"{name} waits for {dependency}, which does not start"


def test_vllm_runs_the_upstream_launch_settings() -> None:
    pairs = (("base", "vllm", "worker"), ("edit", "vllm-edit", "worker-edit"))
    for combination, vllm_name, worker_name in pairs:
        svcs = services(load_combination(combination))
        args = command(svcs[vllm_name])
        model = env(svcs[worker_name])["GCR_CRITIC_MODEL"]
        assert args[0] == model, "vllm serve <model>: the worker's GCR_CRITIC_MODEL"
        assert flag(args, "--served-model-name") == model
        assert flag(args, "--max-model-len") == "40960"
        limits = json.loads(flag(args, "--limit-mm-per-prompt") or "{}")
        assert limits["image"] == {"count": 16, "width": 1024, "height": 1024} and limits.get("video") == 0
        assert float(flag(args, "--gpu-memory-utilization") or 0) == 0.8
        assert gpu_devices(svcs[vllm_name]), f"{vllm_name}: no GPU reservation"
        assert "/health" in healthcheck_text(svcs[vllm_name])
        assert svcs[worker_name]["depends_on"][vllm_name]["condition"] == "service_healthy"
    edit_models = {"TIGER-Lab/RationalRewards-8B-T2I", "TIGER-Lab/RationalRewards-8B-Edit"}
    served = {command(services(load_combination("edit"))[n])[0] for n in ("vllm", "vllm-edit")}
    assert served == edit_models


# --- GPU placement: no two services share a GPU unless their memory shares fit -----------

CARD_GIB = 80  # the ordinary GPU host the defaults are sized for (A100/H100 80GB)
FLUX_SCHNELL = ROOT / "workers" / "generators" / "data" / "flux1-schnell"
# Models whose configs ship with the repo; any other generator is taken to need a whole card.
CONFIG_FOLDERS = {"black-forest-labs/FLUX.1-schnell": FLUX_SCHNELL}


@functools.cache
def _parameters(folder: Path) -> dict[str, int]:
    from workers.generators.memory import count_parameters

    return count_parameters(folder)


def gpu_ids(service: dict[str, Any]) -> set[str]:
    """The host GPUs Docker hands a service: `device_ids` as given; `count: N` is GPUs 0..N-1
    for EVERY container that asks (moby's countToDevices); `all` or no count is every GPU."""
    ids: set[str] = set()
    for device in gpu_devices(service):
        assert not ("count" in device and "device_ids" in device), "count and device_ids are mutually exclusive"
        if "device_ids" in device:
            ids |= {str(i) for i in device["device_ids"]}
        elif str(device.get("count", "all")) == "all":
            ids.add("*")
        else:
            ids |= {str(i) for i in range(int(device["count"]))}
    return ids


def memory_share(service: dict[str, Any]) -> float:
    """The fraction of a CARD_GIB card a GPU service needs."""
    from workers.generators.memory import GIB, MemoryEstimate

    if is_vllm(service):
        return float(flag(command(service), "--gpu-memory-utilization") or 0.9)  # vLLM's own default: 0.9
    values = env(service)
    folder = CONFIG_FOLDERS.get(values.get("GCR_GENERATOR", ""))
    if folder is None:
        return 1.0
    needs = MemoryEstimate(
        _parameters(folder),
        dtype_bytes=2,
        max_batch=int(values.get("GCR_MAX_BATCH", "4")),
        # The largest job it takes: its cap, else the API's 2048x2048.
        megapixels=int(values.get("GCR_MAX_OUTPUT_PIXELS") or 2048 * 2048) / 1e6,
        cpu_offload=values.get("GCR_CPU_OFFLOAD", "false") == "true",
    )
    return needs.total / (CARD_GIB * GIB)


def placement_problems(config: dict[str, Any]) -> list[str]:
    on_gpu: dict[str, list[str]] = {}
    svcs = services(config)
    for name in active(config):
        for gpu in gpu_ids(svcs[name]):
            on_gpu.setdefault(gpu, []).append(name)
    everywhere = on_gpu.pop("*", [])
    problems = []
    for gpu, names in sorted(on_gpu.items()):
        sharing = sorted(names + everywhere)
        shares = {name: memory_share(svcs[name]) for name in sharing}
        if len(sharing) > 1 and sum(shares.values()) > 1.0:
            problems.append(f"GPU {gpu}: {shares} add up to more than one {CARD_GIB} GB card")
    return problems


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_no_two_services_share_a_gpu_unless_their_memory_fits(name: str) -> None:
    assert placement_problems(load_combination(name)) == []


def test_the_placement_rule_catches_count_1_on_every_service() -> None:
    """The old default: `count: 1` everywhere put vLLM (0.8) and FLUX.1-schnell on GPU 0."""
    config = load_compose(BASE)
    for name in ("vllm", "worker"):
        services(config)[name]["deploy"]["resources"]["reservations"]["devices"] = [
            {"driver": "nvidia", "capabilities": ["gpu"], "count": 1}
        ]
    [problem] = placement_problems(config)
    assert problem.startswith("GPU 0:") and "vllm" in problem and "worker" in problem


def test_default_placement_pins_each_gpu_service_to_its_own_card() -> None:
    base = services(load_compose(BASE))
    assert gpu_ids(base["vllm"]) == {"0"} and gpu_ids(base["worker"]) == {"1"}
    edit = services(load_combination("edit"))
    assert gpu_ids(edit["vllm-edit"]) == {"2"} and gpu_ids(edit["worker-edit"]) == {"3"}
    one = services(load_combination("one-gpu"))
    assert gpu_ids(one["vllm"]) == gpu_ids(one["worker"]) == {"0"}
    assert float(flag(command(one["vllm"]), "--gpu-memory-utilization") or 1) <= 0.5
    assert 0.4 < memory_share(one["worker"]) < 0.55  # FLUX.1-schnell at batch 2: ~38 GiB of 80
    more = services(load_combination("more-workers"))
    assert [gpu_ids(more[n]) for n in ("worker", "worker-2", "worker-3")] == [{"1"}, {"2"}, {"3"}]
    for combination in COMBINATIONS:
        for name, svc in services(load_combination(combination)).items():
            if gpu_devices(svc) and not is_vllm(svc):
                assert env(svc)["GCR_GENERATOR_DEVICE"] == "cuda", f"{name}: a GPU worker pins its device"


def test_gateway_and_workers_share_the_artifact_folder(config: dict[str, Any]) -> None:
    """A file artifact store must be the same folder for the gateway (which serves the images)
    and every worker (which writes them): one named volume at the URL's path."""
    svcs = services(config)
    users = [name for name in active(config) if "GCR_ARTIFACT_URL" in env(svcs[name])]
    assert "gateway" in users and any(name.startswith("worker") for name in users)
    for name in users:
        url = urlsplit(env(svcs[name])["GCR_ARTIFACT_URL"])
        if url.scheme != "file":
            continue
        mounts = [str(v) for v in svcs[name].get("volumes", [])]
        assert any(m.split(":")[1] == url.path for m in mounts), f"{name}: nothing mounted at {url.path}"
        assert f"artifacts:{url.path}" in mounts, f"{name}: not the shared artifacts volume"


def test_gpu_reservations() -> None:
    base = services(load_compose(BASE))
    assert gpu_devices(base["worker"]) and gpu_devices(base["vllm"])
    assert env(base["worker"])["GCR_WORKER_METRICS_PORT"] == "9100"
    assert env(base["worker"])["GCR_WORKER_METRICS_HOST"] == "0.0.0.0", "Prometheus scrapes it from its container"
    assert env(base["worker"])["GCR_GENERATOR"] == "black-forest-labs/FLUX.1-schnell"
    assert gpu_devices(services(load_combination("edit"))["worker-edit"])
    dev = load_combination("dev")
    assert not gpu_devices(services(dev)["worker"]), "the GPU-less trial must not reserve a GPU"
    assert not any(gpu_devices(services(dev)[name]) for name in active(dev))
    assert env(services(dev)["worker"])["GCR_GENERATOR"].startswith("tiny:")


def test_gateway_healthcheck_is_liveness() -> None:
    gateway = services(load_compose(BASE))["gateway"]
    assert gateway["build"]["target"] == "gateway"
    assert "/healthz" in healthcheck_text(gateway)
    assert "HEALTHCHECK" in DOCKERFILE.read_text() and "/healthz" in DOCKERFILE.read_text()


def test_dev_critic_is_the_standin_from_the_gateway_image() -> None:
    """The dev overlay turns the `vllm` service into the stand-in critic, on vLLM's port."""
    critic = services(load_combination("dev"))["vllm"]
    assert critic["build"]["target"] == "gateway"
    assert critic["entrypoint"] == ["gcr", "dev", "standin-critic"]
    assert flag(command(critic), "--port") == str(VLLM_DEFAULT_PORT)
    assert not gpu_devices(critic) and not critic.get("volumes")
    assert "/health" in healthcheck_text(critic)


# --- settings names ---------------------------------------------------------------------


def _deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in [BASE, DEV, EDIT, MORE_WORKERS, ONE_GPU_ENV, PROMETHEUS, DOCKERFILE, *sorted(K8S.rglob("*.y*ml"))]:
        yield path, path.read_text()


def test_every_gcr_variable_is_a_setting() -> None:
    """pydantic-settings ignores unknown GCR_* variables: a typo would silently fall back to a default."""
    fields = set(Settings.model_fields)
    names: set[str] = set()
    for path, text in _deploy_texts():
        for name in GCR_NAME.findall(text):
            names.add(name)
            assert name[len("GCR_") :].lower() in fields, f"{path.relative_to(ROOT)}: {name} is not a setting"
    assert {"GCR_REDIS_URL", "GCR_CRITIC_BASE_URL", "GCR_CRITIC_MODEL", "GCR_GENERATOR"} <= names


# --- Kubernetes and Prometheus ------------------------------------------------------------


def test_prometheus_scrapes_gateway_and_worker() -> None:
    scrape = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    targets = {
        name: {(host, sd["port"]) for sd in job["dns_sd_configs"] for host in sd["names"]}
        for name, job in scrape.items()
    }
    assert ("gateway", 8000) in targets["gateway"]
    assert ("worker", 9100) in targets["worker"]
    assert scrape["gateway"]["metrics_path"] == "/metrics"


# --- reproducible images ----------------------------------------------------------------

CONSTRAINTS = ROOT / "constraints"


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


LOCK = CONSTRAINTS / "lock.txt"


def test_the_images_install_with_the_lock_file() -> None:
    dockerfile = DOCKERFILE.read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-c /constraints/lock.txt" in line for line in installs), installs
    assert "!constraints/" in (ROOT / ".dockerignore").read_text()


def test_the_tests_run_with_what_the_lock_file_pins() -> None:
    """scripts/setup installed this environment with the images' lock: every package the
    lock names is here at exactly its pinned version (torch's local +cpu label aside)."""
    pins = _pins(LOCK)
    # site-packages only: setuptools puts its vendored copies on sys.path once imported
    installed = importlib.metadata.distributions(
        path=sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    )
    drift = {
        name: (dist.version, pins[name])
        for dist in installed
        if (name := canonicalize_name(dist.metadata["Name"])) in pins
        and Version(dist.version).public != Version(pins[name]).public
    }
    assert drift == {}, f"installed vs locked: {drift}; run scripts/setup"


def test_the_lock_file_pins_every_dependency_within_pyproject() -> None:
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sdk = tomllib.loads((ROOT / "sdk" / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*service["dependencies"], *sdk["dependencies"]]]
    for requirements in service["optional-dependencies"].values():
        wanted += [Requirement(r) for r in requirements]
    pins = _pins(LOCK)
    for requirement in (r for r in wanted if r.name != "gcr-sdk"):  # ours, from sdk/: not pinned
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"lock.txt does not pin {requirement.name}; run scripts/lock"
        assert requirement.specifier.contains(pinned, prereleases=True), f"lock.txt: {requirement} vs {pinned}"


def test_the_worker_image_gets_the_torch_ci_tests_with_and_its_torchvision() -> None:
    pins = _pins(LOCK)
    setup = (ROOT / "scripts" / "setup").read_text()
    tested = re.search(r"torch==([0-9.]+)", setup)
    assert tested and pins["torch"] == tested.group(1)
    assert pins["torchvision"], "Qwen-Image-Edit's processor imports torchvision"
    assert Version(pins["diffusers"]) >= Version("0.36")  # the first release with QwenImageEditPlusPipeline


def test_refine_by_editing_judges_every_round_with_the_one_t2i_critic() -> None:
    """A text-to-image job that hops to the edit worker is still judged as text-to-image by
    the same critic: both workers reach the base file's vLLM and name its model."""
    config = load_combination("refine-edit")
    workers = {name: env(config["services"][name]) for name in ("worker", "worker-edit")}
    critic = {(e["GCR_CRITIC_BASE_URL"], e["GCR_CRITIC_MODEL"]) for e in workers.values()}
    assert critic == {("http://vllm:8000/v1", "TIGER-Lab/RationalRewards-8B-T2I")}
    assert "vllm-edit" not in config["services"]
    assert workers["worker-edit"]["GCR_GENERATOR"] == "black-forest-labs/FLUX.1-Kontext-dev"
