"""deploy/k8s as `kubectl apply -k` sees it: rendered by kustomize, validated against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and KEDA's
ScaledObject CRD schema (tests/unit/k8s_schemas, from KEDA v2.20.2), then its wiring.

Rendering needs `kubectl` (its built-in kustomize) or `kustomize`; `scripts/test`
installs kustomize when neither is there.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.keys import PRIORITIES, Keys
from tests.unit.test_deploy_files import VLLM_DEFAULT_PORT, flag

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
STACK = K8S
OVERLAYS = sorted(p.parent for p in (K8S / "models").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.30.0"  # the oldest we claim: autoscaling/v2 and every field used are there
KEDA_SCHEMA = Path(__file__).parent / "k8s_schemas" / "keda-scaledobject-v2.20.2.json"


def kustomize_command() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.fail("neither kubectl nor kustomize is installed: run ./scripts/test, which installs kustomize")


@functools.cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    built = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return tuple(d for d in yaml.safe_load_all(built.stdout) if d is not None)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.cache
def keda_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(KEDA_SCHEMA.read_text())))


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject":
        errors = sorted(keda_validator().iter_errors(obj), key=str)
        assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = only
    return found


def env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(deployment).get("env", [])}


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [STACK, *OVERLAYS], ids=lambda p: str(p.relative_to(K8S)) or "stack")
def test_every_rendered_object_is_valid_against_its_schema(folder: Path) -> None:
    objects = render(folder)
    assert objects
    for obj in objects:
        validate(obj)
        # Each folder applies on its own (`kubectl apply -k` of a model's overlay beside the stack).
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "gcr", f"{obj['kind']} {obj['metadata']['name']}"
        pod = obj["spec"]["template"]["spec"] if obj["kind"] in ("Deployment", "StatefulSet") else {}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            assert ":" in c["image"], f"{obj['metadata']['name']}: {c['image']} has no tag"


def test_the_validation_refuses_typos_in_both_kinds_of_schema() -> None:
    """The checks above can fail: a misspelt field is refused in a Deployment and a ScaledObject."""
    stack = render(STACK)
    deployment = copy.deepcopy(find(stack, "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(find(stack, "ScaledObject", "worker-flux-schnell"))
    scaled["spec"]["minReplicas"] = 1  # an HPA field, not KEDA's
    with pytest.raises(AssertionError, match="minReplicas"):
        validate(scaled)


# --- wiring --------------------------------------------------------------------------------------


def test_the_stack_is_wired_to_its_redis_critic_and_cache() -> None:
    stack = render(STACK)
    config = find(stack, "ConfigMap", "gcr-config")["data"]
    assert all(isinstance(value, str) for value in config.values()), "ConfigMap values must be strings"
    assert urlsplit(config["GCR_REDIS_URL"]).hostname == "redis"
    redis = find(stack, "StatefulSet", "redis")
    assert flag(container(redis)["args"], "--appendonly") == "yes" and redis["spec"]["volumeClaimTemplates"]

    critic = urlsplit(config["GCR_CRITIC_BASE_URL"])
    assert critic.hostname == "vllm" and critic.port == find(stack, "Service", "vllm")["spec"]["ports"][0]["port"]
    vllm = container(find(stack, "Deployment", "vllm"))
    assert flag(vllm["args"], "--served-model-name") == config["GCR_CRITIC_MODEL"]
    assert flag(vllm["args"], "--max-model-len") == "40960"
    assert float(flag(vllm["args"], "--gpu-memory-utilization") or 0) == 0.8
    assert int(flag(vllm["args"], "--port") or VLLM_DEFAULT_PORT) == vllm["ports"][0]["containerPort"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1

    gateway = find(stack, "Deployment", "gateway")
    assert container(gateway)["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for deployment in (gateway, find(stack, "Deployment", "worker-flux-schnell")):
        assert [source["configMapRef"]["name"] for source in container(deployment)["envFrom"]] == ["gcr-config"]
    hpa = find(stack, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replicas"

    claims = find(stack, "PersistentVolumeClaim", "model-cache")
    assert claims["spec"]["accessModes"] == ["ReadWriteMany"]
    worker_pod = find(stack, "Deployment", "worker-flux-schnell")["spec"]["template"]["spec"]
    [owner] = worker_pod["initContainers"]  # RWX volumes often ignore fsGroup
    assert "chown 10001:10001 /cache/workers" in owner["command"][-1]
    [worker] = worker_pod["containers"]
    assert {"name": "hf-cache", "mountPath": "/cache/huggingface", "subPath": "workers"} in worker["volumeMounts"]
    for deployment in (find(stack, "Deployment", "vllm"), find(stack, "Deployment", "worker-flux-schnell")):
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        cache = next(v for v in volumes if v["name"] == "hf-cache")
        assert cache == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}


def test_every_probe_has_a_timeout_and_gpu_pods_wait_for_their_model() -> None:
    for folder in (STACK, *OVERLAYS):
        for obj in render(folder):
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container(obj) and "httpGet" in container(obj)[probe]:
                    assert container(obj)[probe].get("timeoutSeconds"), f"{obj['metadata']['name']}: {probe}"
            if container(obj).get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
                startup = container(obj)["startupProbe"]
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "30 min to download and load"


@pytest.mark.parametrize("folder", OVERLAYS, ids=lambda p: p.name)
def test_each_model_overlay_scales_its_own_workers_on_its_own_streams(folder: Path) -> None:
    objects = render(folder)
    worker = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("worker-"))
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"], "KEDA owns the workers' replicas"
    assert scaled["spec"]["minReplicaCount"] >= 1, "a model with no worker is refused at the gateway: never 0"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    assert env(worker)["GCR_GENERATOR_DEVICE"] == "cuda"
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1

    model = env(worker).get("GCR_MODEL_NAME") or env(worker)["GCR_GENERATOR"]
    mode = "edit" if "edit" in folder.name else "t2i"
    keys = Keys("gcr")  # the default GCR_REDIS_PREFIX, which the ConfigMap keeps
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == set(PRIORITIES)
    for priority, trigger in triggers.items():
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["stream"] == keys.queue(model, mode, priority)
        assert trigger["metadata"]["address"] == "redis.gcr.svc.cluster.local:6379"
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert modifiers["formula"] == " + ".join(PRIORITIES)
    stack_config = find(render(STACK), "ConfigMap", "gcr-config")["data"]
    assert modifiers["target"] == stack_config["GCR_MAX_INFLIGHT_JOBS"], "one worker's worth of jobs"
    assert "GCR_REDIS_PREFIX" not in stack_config


def test_model_overlays_do_not_share_selectors_or_critics() -> None:
    stack, edit = render(STACK), render(K8S / "models" / "qwen-image-edit")
    t2i_vllm, edit_vllm = find(stack, "Service", "vllm"), find(edit, "Service", "vllm-qwen-image-edit")
    edit_pods = find(edit, "Deployment", "vllm-qwen-image-edit")["spec"]["template"]["metadata"]["labels"]
    t2i_selector = set(t2i_vllm["spec"]["selector"].items())
    assert not t2i_selector <= set(edit_pods.items()), "the T2I Service would pick edit pods"
    assert set(edit_vllm["spec"]["selector"].items()) <= set(edit_pods.items())
    worker = find(edit, "Deployment", "worker-qwen-image-edit")
    assert urlsplit(env(worker)["GCR_CRITIC_BASE_URL"]).hostname == edit_vllm["metadata"]["name"]
    served = flag(container(find(edit, "Deployment", "vllm-qwen-image-edit"))["args"], "--served-model-name")
    assert env(worker)["GCR_CRITIC_MODEL"] == env(worker)["GCR_CRITIC_EDIT_MODEL"] == served
    defaults = json.loads(find(stack, "ConfigMap", "gcr-config")["data"]["GCR_DEFAULT_MODELS"])
    assert defaults == {"t2i": "black-forest-labs/FLUX.1-schnell", "edit": env(worker)["GCR_GENERATOR"]}
