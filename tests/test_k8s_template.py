"""infra/k8s/gpu-work-pool.json, the GPU work pool's Kubernetes base job template, checked with
Prefect's own machinery: the server's WorkPoolCreate validator (what `prefect work-pool create
--base-job-template` sends the file through), the variables schema and its defaults as the server
checks them, and the Kubernetes worker's job configuration rendered from it. Also: the worker image
installs exactly the lock."""
from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.schema_tools.validation import ValidationError, is_valid_schema, validate
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "k8s" / "gpu-work-pool.json"


@pytest.fixture()
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


class NoServer:
    """The template names no block or Prefect variable, so rendering it must not ask a server."""

    def __getattr__(self, name):
        raise AssertionError(f"the template made Prefect call the API ({name})")


def render(template: dict, values: dict) -> KubernetesWorkerJobConfiguration:
    return asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=NoServer()))


def check(template: dict) -> KubernetesWorkerJobConfiguration:
    """What Prefect does with a base job template, from `work-pool create` to a flow run's Job."""
    WorkPoolCreate(name="gpu", type=KubernetesWorker.type, base_job_template=template)
    schema = template["variables"]
    is_valid_schema(schema, preprocess=False)
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    validate(defaults, schema, raise_on_error=True, ignore_required=True, preprocess=True,
             allow_none_with_default=True)
    return render(template, {})


def test_template_validates_and_renders_the_gpu_job(template):
    config = check(template)
    manifest = config.job_manifest
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "gpu-worker-job.yaml").read_text())
    worker = job["spec"]["template"]["spec"]["containers"][0]
    # the GPU request and limit, the image and the endpoints the standing worker Job uses
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == worker["resources"]["limits"]["memory"]
    assert container["image"] == worker["image"]
    assert container["envFrom"] == worker["envFrom"]  # endpoints, S3 key, the logins (required Secret)
    pod = manifest["spec"]["template"]["spec"]
    assert [c["command"] for c in pod["initContainers"]] == \
        [c["command"] for c in job["spec"]["template"]["spec"]["initContainers"]]  # placeholder secrets refused
    configmap = yaml.safe_load((ROOT / "infra" / "k8s" / "configmap.yaml").read_text())
    assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    assert manifest["spec"]["template"]["spec"]["tolerations"] == job["spec"]["template"]["spec"]["tolerations"]
    assert manifest["metadata"]["namespace"] == "frugalflow"
    # a deployment may ask for more cards: the variable reaches both request and limit
    more = render(template, {"gpu_count": 2})
    res = more.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 2


def test_template_starts_from_prefect_kubernetes_default(template):
    """Every variable and job-configuration key of the installed worker's default is still there."""
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(default["job_configuration"]) == set(template["job_configuration"])


def test_broken_templates_fail(template):
    undeclared = copy.deepcopy(template)
    del undeclared["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        check(undeclared)

    bad_default = copy.deepcopy(template)
    bad_default["variables"]["properties"]["gpu_count"]["default"] = "one"
    with pytest.raises(ValidationError):
        check(bad_default)

    bad_schema = copy.deepcopy(template)
    bad_schema["variables"]["properties"]["gpu_count"]["type"] = "card"
    with pytest.raises(ValueError, match="Invalid schema"):
        check(bad_schema)

    no_manifest = copy.deepcopy(template)
    del no_manifest["job_configuration"]["job_manifest"]
    with pytest.raises(Exception):
        check(no_manifest)


def test_worker_image_installs_from_the_lock():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    installs = re.findall(r"pip install[^\n&]*", dockerfile)
    lock_installs = [line for line in installs if "-r requirements.lock" in line]
    assert lock_installs and all("--no-deps" in line for line in lock_installs)
    # nothing else is installed with its dependencies unconstrained by the lock
    for line in installs:
        assert "--no-deps" in line or "-c requirements.lock" in line, line
    assert "pip check" in dockerfile
    lock = (ROOT / "requirements.lock").read_text()
    for pin in ("prefect-kubernetes==", "prefect-dask==", "distributed==", "dask=="):
        assert pin in lock
