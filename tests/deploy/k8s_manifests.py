"""The Kustomize overlays rendered by a real kubectl, and the schemas to check them against."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "kserve")
SCHEMAS = DEPLOY / "k8s" / "schemas"
K8S_VERSION = "1.37.0"  # the schemas kubernetes-validate ships


def kubectl() -> str:
    """The kubectl installed with the test extras (.venv/bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl") or "kubectl"


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def crd_validator(kind: str):
    """A strict validator for a custom resource: its schema in deploy/k8s/schemas, whose embedded
    Kubernetes types resolve to kubernetes-validate's strict definitions."""
    import importlib.resources

    import jsonschema
    from referencing import Registry, Resource

    schema = yaml.safe_load((SCHEMAS / f"{kind.lower()}.yaml").read_text())
    defs_file = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
                 / f"v{K8S_VERSION}-local-strict" / "_definitions.json")
    definitions = Resource.from_contents(json.loads(defs_file.read_text()))
    registry = Registry().with_resources([(definitions.id(), definitions)])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) in a container's args, as the kubelet expands it from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def port_number(container: dict, port) -> int:
    """A probe's or monitor's port (a number, or the name of one of the container's ports)."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def serving_container(obj: dict) -> dict:
    """The container that runs the image: the Deployment's, or the ServingRuntime's."""
    spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
    (container,) = spec["containers"]
    return container
