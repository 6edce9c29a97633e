"""Data flows one way: client -> gateway -> Redis -> worker -> Redis -> gateway.

Every module of gcr/, service/ and workers/ belongs to exactly one layer, and imports
only from the layers below it (read from the source: every import statement, those
inside functions included). The SDK stands alone: it imports nothing of ours but
itself, and nothing outside it reaches into its private modules. A module no rule
places fails the test, so a new folder has to say where it stands.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.interpreter import modules_loaded_by

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gcr", "service", "workers")

# layer -> module prefixes it holds (the longest matching prefix wins)
LAYERS: dict[str, tuple[str, ...]] = {
    "sdk": ("gcr",),
    "core": (
        "service",  # the package itself
        "service.errors",
        "service.settings",
        "service.netguard",
        "service.retrying",
        "service.logs",
        "service.servers",
    ),
    "jobs": ("service.jobs",),
    "critic": ("service.critic",),
    "evaluation": ("service.evaluation",),
    "gateway": ("service.gateway",),
    "worker": ("workers",),
    "cli": ("service.cli", "service.evaluation.cli"),
}
# layer -> layers it may import (itself always)
ALLOWED: dict[str, set[str]] = {
    "sdk": set(),
    "core": {"sdk"},
    "jobs": {"sdk", "core"},
    "critic": {"sdk", "core"},
    "evaluation": {"sdk", "core"},
    "gateway": {"sdk", "core", "jobs", "critic"},
    "worker": {"sdk", "core", "jobs", "critic"},
    # the composition root: `gcr serve`, `gcr worker`, `gcr up --dev`, `gcr eval`
    "cli": {"sdk", "core", "jobs", "critic", "evaluation", "gateway", "worker"},
}
SDK_THIRD_PARTY = {"httpx", "httpx_sse", "pydantic"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best: tuple[int, str | None] = (-1, None)
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                # "service" itself is core, but a deeper module of service is core only if listed
                if prefix == "service" and module != "service":
                    continue
                best = (len(prefix), layer)
    return best[1]


def imports_of(path: Path) -> list[str]:
    """Every module an import statement in the file names (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in modules() if layer_of(module_name(p)) is None]
    assert unplaced == []


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in modules():
        own = layer_of(module_name(path))
        assert own is not None
        for imported in imports_of(path):
            if imported.split(".")[0] not in PACKAGES:
                continue
            theirs = layer_of(imported)
            if theirs is None:  # `from service import x` names a module; judge by x
                continue
            if theirs != own and theirs not in ALLOWED[own]:
                wrong.append(f"{module_name(path)} ({own}) imports {imported} ({theirs})")
    assert wrong == []


def test_only_the_sdk_touches_its_private_modules() -> None:
    private = [
        f"{module_name(path)} imports {name}"
        for path in modules()
        if layer_of(module_name(path)) != "sdk"
        for name in imports_of(path)
        if name.startswith("gcr._")
    ]
    assert private == []


def test_the_sdk_needs_only_httpx_httpx_sse_and_pydantic() -> None:
    stdlib = sys.stdlib_module_names
    extra = {
        f"{module_name(path)}: {name}"
        for path in (ROOT / "gcr").rglob("*.py")
        for name in imports_of(path)
        if name.split(".")[0] not in stdlib | SDK_THIRD_PARTY | {"gcr", "__future__"}
    }
    assert extra == set()


def test_the_rules_catch_a_worker_import_in_the_gateway() -> None:
    """The checker itself: a gateway module that imports workers/ is reported."""
    assert layer_of("service.gateway.routers.jobs") == "gateway"
    assert "worker" not in ALLOWED["gateway"] and layer_of("workers.loop") == "worker"
    assert layer_of("service.protocol") is None  # an unknown flat module would be unplaced


def test_the_gateway_app_imports_nothing_from_workers() -> None:
    """At run time too: building the app loads no workers/, torch or diffusers module."""
    code = "from service.gateway.app import create_app\nfrom service.settings import Settings\ncreate_app(Settings())"
    assert modules_loaded_by(code, ("workers", "torch", "diffusers")) == []


def test_each_owner_stands_in_its_layer() -> None:
    """The modules that own a piece of state, each where both sides can reach it or only one."""
    owners = {
        "service.jobs.lifecycle": "jobs",  # every job state change
        "service.jobs.records": "jobs",  # the stored job, apart from the wire document
        "service.jobs.presenter": "jobs",  # the document clients and webhook receivers see
        "service.jobs.ranking": "jobs",  # one ranking for the loop and /v1
        "service.jobs.registry": "jobs",  # the typed heartbeat, written by workers, read by the fleet
        "service.gateway.job_service": "gateway",
        "service.gateway.fleet": "gateway",
        "service.gateway.follow": "gateway",
        "workers.rounds": "worker",
        "workers.job_events": "worker",
        "workers.critics.protocol": "worker",
    }
    for module, layer in owners.items():
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
        assert layer_of(module) == layer, module
    assert "gateway" not in ALLOWED["worker"] and "worker" not in ALLOWED["gateway"]
