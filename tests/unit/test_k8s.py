"""deploy/k8s as `kubectl apply -k` sees it: rendered by kustomize, validated against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and KEDA's
ScaledObject CRD schema (tests/unit/k8s_schemas, from KEDA v2.20.2), then its wiring
and what a real cluster would refuse or break on (a Service named `vllm`, an unset
storage class or registry, a missing Secret, pods outside the "restricted" profile).

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

from gcr.types import PRIORITIES
from service.jobs.keys import Keys
from service.settings import Settings
from tests.unit.test_deploy_files import VLLM_DEFAULT_PORT, flag

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
STACK = K8S
OVERLAYS = sorted(p.parent for p in (K8S / "models").glob("*/kustomization.yaml"))
CLUSTERS = sorted(p.parent for p in (ROOT / "deploy" / "clusters").glob("*/kustomization.yaml"))
FOLDERS = [STACK, *OVERLAYS, *CLUSTERS]
SECRET_EXAMPLE = K8S / "secret.example.yaml"
OUR_IMAGES = ("gcr-gateway", "gcr-worker")
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


def folder_id(folder: Path) -> str:
    return str(folder.relative_to(ROOT / "deploy"))


def pods(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload."""
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


def gpu_pods(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, pod)
        for name, pod in pods(objects)
        if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in pod["containers"])
    ]


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", FOLDERS, ids=folder_id)
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
    assert critic.hostname == "critic" and critic.port == find(stack, "Service", "critic")["spec"]["ports"][0]["port"]
    vllm = container(find(stack, "Deployment", "critic"))
    assert flag(vllm["args"], "--served-model-name") == config["GCR_CRITIC_MODEL"]
    assert flag(vllm["args"], "--max-model-len") == "40960"
    assert float(flag(vllm["args"], "--gpu-memory-utilization") or 0) == 0.8
    assert int(flag(vllm["args"], "--port") or VLLM_DEFAULT_PORT) == vllm["ports"][0]["containerPort"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1

    gateway = find(stack, "Deployment", "gateway")
    assert container(gateway)["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for deployment in (gateway, find(stack, "Deployment", "worker-flux-schnell")):
        # The Secret is required: a gateway without GCR_API_KEYS would answer 401 to everyone.
        assert container(deployment)["envFrom"] == [
            {"configMapRef": {"name": "gcr-config"}},
            {"secretRef": {"name": "gcr-secrets"}},
        ]
    hpa = find(stack, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replicas"

    claims = find(stack, "PersistentVolumeClaim", "model-cache")
    assert claims["spec"]["accessModes"] == ["ReadWriteMany"]
    # vLLM and the workers share one Hugging Face cache, as one user (10001), on the claim.
    assert env(find(stack, "Deployment", "critic"))["HF_HOME"] == "/cache/huggingface"
    for deployment in (find(stack, "Deployment", "critic"), find(stack, "Deployment", "worker-flux-schnell")):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        assert {"name": "model-cache", "mountPath": "/cache"} in container(deployment)["volumeMounts"]
        cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}


def test_every_probe_has_a_timeout_and_gpu_pods_wait_for_their_model() -> None:
    for folder in FOLDERS:
        for obj in render(folder):
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container(obj):  # exec probes too: the default timeout is 1 s
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
    assert int(modifiers["target"]) <= int(stack_config["GCR_MAX_INFLIGHT_JOBS"]), "a worker can hold its target"
    assert all(t["metadata"]["streamLength"] == modifiers["target"] for t in triggers.values())
    assert "GCR_REDIS_PREFIX" not in stack_config


def test_model_overlays_do_not_share_selectors_or_critics() -> None:
    stack, edit = render(STACK), render(K8S / "models" / "qwen-image-edit")
    t2i_vllm, edit_vllm = find(stack, "Service", "critic"), find(edit, "Service", "critic-qwen-image-edit")
    edit_pods = find(edit, "Deployment", "critic-qwen-image-edit")["spec"]["template"]["metadata"]["labels"]
    t2i_selector = set(t2i_vllm["spec"]["selector"].items())
    assert not t2i_selector <= set(edit_pods.items()), "the T2I Service would pick edit pods"
    assert set(edit_vllm["spec"]["selector"].items()) <= set(edit_pods.items())
    worker = find(edit, "Deployment", "worker-qwen-image-edit")
    assert urlsplit(env(worker)["GCR_CRITIC_BASE_URL"]).hostname == edit_vllm["metadata"]["name"]
    served = flag(container(find(edit, "Deployment", "critic-qwen-image-edit"))["args"], "--served-model-name")
    assert env(worker)["GCR_CRITIC_MODEL"] == env(worker)["GCR_CRITIC_EDIT_MODEL"] == served
    defaults = json.loads(find(stack, "ConfigMap", "gcr-config")["data"]["GCR_DEFAULT_MODELS"])
    assert defaults == {"t2i": "black-forest-labs/FLUX.1-schnell", "edit": env(worker)["GCR_GENERATOR"]}


# --- what a real cluster would break on ------------------------------------------------------


def service_link_variables(service: dict[str, Any]) -> set[str]:
    """The variables the kubelet sets in every pod of the namespace for `service` (while the
    pod keeps enableServiceLinks), named as the Kubernetes Service docs give them."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        proto = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{proto}"
        names |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
        if "name" in port:
            names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
    return names


@pytest.mark.parametrize("folder", FOLDERS, ids=folder_id)
def test_no_service_sets_a_variable_vllm_reads(folder: Path) -> None:
    """A Service `vllm` makes the kubelet set VLLM_PORT=tcp://<ip>:8000 in every pod, which
    vLLM refuses at start (vllm/envs.py get_vllm_port: "appears to be a URI"). No Service
    may set a VLLM_* variable, and no pod takes service-link variables at all."""
    objects = render(folder)
    for service in (o for o in objects if o["kind"] == "Service"):
        clashing = sorted(v for v in service_link_variables(service) if v.startswith("VLLM_"))
        assert not clashing, f"Service {service['metadata']['name']} would set {clashing} in every pod"
    for name, pod in pods(objects):
        assert pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks is not false"


def test_the_service_link_rule_catches_a_service_named_vllm() -> None:
    service = {"metadata": {"name": "vllm"}, "spec": {"ports": [{"name": "http", "port": 8000}]}}
    assert "VLLM_PORT" in service_link_variables(service)
    assert "VLLM_PORT_8000_TCP" in service_link_variables(service)


def has_registry(image: str) -> bool:
    """Whether an image reference names its registry: a first path part with a dot or a port,
    or localhost (the rule container runtimes use); `gcr-worker` alone means Docker Hub."""
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def cluster_problems(objects: tuple[dict[str, Any], ...]) -> list[str]:
    """What stops a rendering from running on a real cluster until its overlay sets it."""
    problems: list[str] = []
    for name, pod in pods(objects):
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["image"].rpartition("/")[2].split(":")[0] in OUR_IMAGES and not has_registry(c["image"]):
                problems.append(f"{name}: image {c['image']} names no registry (set `images:` newName)")
    for claim in (o for o in objects if o["kind"] == "PersistentVolumeClaim"):
        if "ReadWriteMany" in claim["spec"]["accessModes"] and not claim["spec"].get("storageClassName"):
            problems.append(f"PVC {claim['metadata']['name']}: ReadWriteMany with no storageClassName")
    return problems


@pytest.mark.parametrize("folder", CLUSTERS, ids=folder_id)
def test_a_cluster_overlay_sets_the_registry_and_the_storage_class(folder: Path) -> None:
    assert cluster_problems(render(folder)) == []


def test_the_stack_alone_is_refused_until_an_overlay_sets_them() -> None:
    """The base names no registry and no storage class: the check above must say so, or it
    could pass on a rendering that pulls docker.io/library/gcr-worker and stays Pending."""
    assert CLUSTERS, "no cluster overlay under deploy/clusters"
    problems = cluster_problems(render(STACK))
    assert len(problems) == 3, problems
    assert sum("names no registry" in p for p in problems) == 2
    assert any(p.startswith("PVC model-cache") for p in problems)
    assert has_registry("registry.example.com/gcr/gcr-worker:0.1.0") and has_registry("localhost:5000/gcr-worker")
    assert not has_registry("gcr-worker:0.1.0") and not has_registry("library/gcr-worker")


def test_the_example_secret_has_every_key_the_pods_need() -> None:
    [secret] = [d for d in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if d]
    validate(secret)
    assert secret["metadata"] == {"name": "gcr-secrets", "namespace": "gcr"}
    keys = set(secret["stringData"])
    assert {"GCR_API_KEYS", "GCR_WEBHOOK_SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    assert {"AWS_ENDPOINT_URL", "HF_TOKEN"} <= keys
    fields = set(Settings.model_fields)
    for key in keys:
        if key.startswith("GCR_"):
            assert key[len("GCR_") :].lower() in fields, f"{key} is not a setting"
    for folder in FOLDERS:  # never committed inside a rendering
        assert not [o for o in render(folder) if o["kind"] == "Secret"], folder


def test_gpu_pods_go_to_cards_their_model_fits_on() -> None:
    """A required node affinity on GPU Feature Discovery's nvidia.com/gpu.memory (MiB), and a
    toleration for tainted GPU pools; FLUX.1-schnell's threshold covers the worker's own
    estimate at the configured batch."""
    from workers.generators.memory import MemoryEstimate, count_parameters

    for folder in FOLDERS:
        for name, pod in gpu_pods(render(folder)):
            [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ]
            [rule] = term["matchExpressions"]
            assert rule["key"] == "nvidia.com/gpu.memory" and rule["operator"] == "Gt", name
            assert int(rule["values"][0]) >= 39000, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    worker = find(render(STACK), "Deployment", "worker-flux-schnell")
    assert env(worker)["GCR_GENERATOR"] == "black-forest-labs/FLUX.1-schnell"
    config = find(render(STACK), "ConfigMap", "gcr-config")["data"]
    batch = int(env(worker).get("GCR_MAX_BATCH") or config.get("GCR_MAX_BATCH") or Settings().max_batch)
    folder = ROOT / "workers" / "generators" / "data" / "flux1-schnell"
    needs = MemoryEstimate(count_parameters(folder), 2, batch, 1024 * 1024 / 1e6)
    [term] = worker["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert int(term["matchExpressions"][0]["values"][0]) * 1024**2 >= needs.total, needs.describe()


def test_vllm_is_probed_on_health_and_sized_for_the_critics_images() -> None:
    config = find(render(STACK), "ConfigMap", "gcr-config")["data"]
    edge = int(config.get("GCR_CRITIC_MAX_IMAGE_EDGE") or Settings().critic_max_image_edge)
    for folder in FOLDERS:
        for obj in render(folder):
            if obj["kind"] != "Deployment" or container(obj)["image"].partition(":")[0] != "vllm/vllm-openai":
                continue
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container(obj)[probe]["httpGet"]["path"] == "/health", (obj["metadata"]["name"], probe)
            limits = json.loads(flag(container(obj)["args"], "--limit-mm-per-prompt") or "{}")
            image = limits["image"]
            assert isinstance(image, dict) and image["count"] >= 2, "edit critiques send two images"
            assert image["width"] == image["height"] == edge, "profiled for the images the critic sends"
            assert limits["video"] == 0


def test_redis_refuses_writes_before_its_memory_limit() -> None:
    redis = container(find(render(STACK), "StatefulSet", "redis"))
    args = redis["args"]
    assert flag(args, "--maxmemory-policy") == "noeviction", "an evicted key is a lost job"
    limit = redis["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    maxmemory = flag(args, "--maxmemory") or "0"
    assert maxmemory.endswith("gb") and int(maxmemory[:-2]) > 0
    # Half the limit or less: the AOF rewrite's fork copies the pages written meanwhile.
    assert int(maxmemory[:-2]) * 2 <= int(limit[:-2])


def test_the_worker_is_probed_on_its_event_loops_livez() -> None:
    """/livez is answered by the worker's event loop and asks its executor (workers/health.py);
    /metrics came from prometheus_client's own thread and answered whatever the loop did."""
    stack = render(STACK)
    port = int(find(stack, "ConfigMap", "gcr-config")["data"]["GCR_WORKER_METRICS_PORT"])
    worker = container(find(stack, "Deployment", "worker-flux-schnell"))
    assert [p["containerPort"] for p in worker["ports"] if p["name"] == "metrics"] == [port]
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/livez", "port": "metrics"}


def test_rollouts_keep_every_model_served() -> None:
    for folder in FOLDERS:
        for obj in render(folder):
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] in dict(gpu_pods((obj,))):
                strategy = obj["spec"]["strategy"]
                assert strategy["type"] == "RollingUpdate", obj["metadata"]["name"]
                assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, obj["metadata"]["name"]


def restricted_problems(name: str, pod: dict[str, Any]) -> list[str]:
    """What the Pod Security Standards' "restricted" profile refuses (kubernetes.io, Pod
    Security Standards), plus what we ask on top: a read-only root filesystem, and an
    fsGroup that re-owns a volume only when its root is not ours yet."""
    problems: list[str] = []
    pod_ctx = pod.get("securityContext", {})
    for flag_name in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag_name):
            problems.append(f"{name}: {flag_name}")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append(f"{name}: hostPath volume")
    if "fsGroup" in pod_ctx and pod_ctx.get("fsGroupChangePolicy") != "OnRootMismatch":
        problems.append(f"{name}: fsGroup without fsGroupChangePolicy OnRootMismatch")
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as root")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation")
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        capabilities = ctx.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem")
    return problems


@pytest.mark.parametrize("folder", FOLDERS, ids=folder_id)
def test_every_pod_meets_the_restricted_pod_security_profile(folder: Path) -> None:
    objects = render(folder)
    problems = [p for name, pod in pods(objects) for p in restricted_problems(name, pod)]
    assert problems == []
    for namespace in (o for o in objects if o["kind"] == "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_restricted_check_catches_a_root_init_container() -> None:
    """The old cache-owner init container: root, to chown the cache."""
    pod = copy.deepcopy(find(render(STACK), "Deployment", "worker-flux-schnell")["spec"]["template"]["spec"])
    pod["initContainers"] = [
        {
            "name": "cache-owner",
            "image": "gcr-worker",
            "securityContext": {"runAsNonRoot": False, "runAsUser": 0, "allowPrivilegeEscalation": False},
        }
    ]
    del pod["securityContext"]["fsGroupChangePolicy"]
    problems = restricted_problems("worker", pod)
    assert any("cache-owner: runAsNonRoot" in p for p in problems)
    assert any("cache-owner: capabilities" in p for p in problems)
    assert any("fsGroupChangePolicy" in p for p in problems)


def ingress_allowed(
    objects: tuple[dict[str, Any], ...], source: dict[str, str], namespace: str, target: dict[str, str], port: int
) -> bool:
    """Whether the rendered NetworkPolicies let a pod with labels `source` in `namespace`
    reach a gcr pod with labels `target` on `port` (the Kubernetes semantics: a pod that
    any policy selects for Ingress takes only what some such policy allows)."""

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return set(selector.get("matchLabels", {}).items()) <= set(labels.items())

    policies = [
        o["spec"] for o in objects if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], target)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy.get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                in_namespace = (
                    selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                    if "namespaceSelector" in peer
                    else namespace == "gcr"
                )
                if in_namespace and selects(peer.get("podSelector", {}), source):
                    return True
    return False


@pytest.mark.parametrize("folder", CLUSTERS, ids=folder_id)
def test_network_policies_let_through_exactly_what_gcr_needs(folder: Path) -> None:
    objects = render(folder)
    labels = {name: pod_template["metadata"]["labels"] for name, pod_template in templates(objects)}
    gateway, redis, critic = labels["gateway"], labels["redis"], labels["critic"]
    workers = [labels[name] for name in labels if name.startswith("worker-")]
    assert workers and all(
        ingress_allowed(objects, w, "gcr", redis, 6379) and ingress_allowed(objects, w, "gcr", critic, 8000)
        for w in workers
    )
    assert ingress_allowed(objects, gateway, "gcr", redis, 6379)
    assert ingress_allowed(objects, gateway, "gcr", critic, 8000), "POST /critique"
    assert ingress_allowed(objects, {}, "keda", redis, 6379), "KEDA's scaler reads the streams"
    assert ingress_allowed(objects, {}, "ingress-nginx", gateway, 8000)
    assert ingress_allowed(objects, {}, "monitoring", workers[0], 9100)
    edit_critic = labels["critic-qwen-image-edit"]
    assert ingress_allowed(objects, labels["worker-qwen-image-edit"], "gcr", edit_critic, 8000)
    # and nothing else
    assert not ingress_allowed(objects, critic, "gcr", redis, 6379)
    assert not ingress_allowed(objects, {}, "default", redis, 6379)
    assert not ingress_allowed(objects, {}, "default", critic, 8000)
    assert not ingress_allowed(objects, labels["worker-flux-schnell"], "gcr", edit_critic, 8000)
    assert not ingress_allowed(objects, gateway, "gcr", workers[0], 6379)


def templates(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")
    ]
