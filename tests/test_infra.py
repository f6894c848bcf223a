"""infra/ (team mode) without Docker: every file parses, and the files agree with each other and
with the repo (services, buckets, databases, env vars, schedule, lock, work pool)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from frugalflow.recipe_io import load_recipe

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
ONE_SHOT = {"secrets-check", "minio-init", "mlflow-accounts"}
SERVICES = {"postgres", "minio", "mlflow", "prefect-server", "worker"} | ONE_SHOT
LONG_RUNNING = SERVICES - ONE_SHOT


def load(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose():
    return load(INFRA / "docker-compose.yml")["services"]


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def test_every_yaml_and_json_under_infra_parses():
    files = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml")])
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "docker-compose.yml", "prefect.yaml", "k8s/configmap.yaml", "k8s/gpu-worker-job.yaml"}
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path
    for path in INFRA.rglob("*.json"):  # bucket policies and the k8s work pool's job template
        doc = json.loads(path.read_text())
        assert isinstance(doc, dict) and doc, path
        if path.parent.name == "minio":
            assert doc["Statement"], path


def test_shell_scripts_parse():
    for path in [*INFRA.rglob("*.sh")]:
        shell = "bash" if path.read_text().startswith("#!/bin/bash") else "sh"
        done = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_compose_services_images_and_dependencies(compose):
    assert set(compose) == SERVICES
    for name, svc in compose.items():
        image = svc.get("image", "")
        assert image and ":" in image.rsplit("/", 1)[-1], f"{name}: image without a tag"
        assert not image.endswith((":latest", ":main")), f"{name}: unpinned image {image}"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in compose, f"{name} depends on unknown service {dep}"
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}"
            if wanted == "service_healthy":
                assert "healthcheck" in compose[dep], f"{name} waits for {dep}, which has no healthcheck"
    for name in LONG_RUNNING:
        check = compose[name]["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL") and len(check) > 1, name
    assert compose["mlflow"]["build"]["dockerfile"] == "infra/mlflow.Dockerfile"
    assert compose["worker"]["build"] == compose["mlflow-accounts"]["build"]
    assert compose["worker"]["build"]["dockerfile"] == "infra/Dockerfile"
    for svc in compose.values():
        if "build" in svc:
            assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert "ports" not in compose["postgres"]  # the database stays on the compose network


def test_compose_pins_match_the_lock(compose):
    pins = lock_versions()
    assert compose["prefect-server"]["image"].split(":")[1].startswith(pins["prefect"] + "-python3.11")
    assert compose["mlflow"]["image"].endswith(":" + pins["mlflow"])
    mlflow_dockerfile = (INFRA / "mlflow.Dockerfile").read_text()
    assert "grep '^mlflow==' /tmp/requirements.lock" in mlflow_dockerfile
    assert "-c /tmp/requirements.lock" in mlflow_dockerfile


def test_mlflow_serves_artifacts_from_s3_on_postgres(compose):
    cmd = compose["mlflow"]["command"]
    assert cmd[:2] == ["mlflow", "server"]
    store = cmd[cmd.index("--backend-store-uri") + 1]
    assert store == "postgresql://mlflow@postgres:5432/mlflow"  # the password from PGPASSWORD, not the command line
    assert compose["mlflow"]["environment"]["PGPASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://frugalflow-mlflow/"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = compose["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]  # the worker's Host header
    # clients hold no bucket credentials: the worker's key is not the MLflow server's
    assert "MLFLOW_S3" not in json.dumps(compose["worker"]["environment"])
    assert compose["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_databases_and_buckets_are_created(compose):
    init_sql = (INFRA / "postgres" / "init-databases.sh").read_text()
    for db in ("mlflow", "prefect"):
        assert f"CREATE DATABASE {db} OWNER {db};" in init_sql
    mount = [v for v in compose["postgres"]["volumes"] if "init-databases.sh" in v][0]
    assert mount.split(":")[1].startswith("/docker-entrypoint-initdb.d/")
    url = compose["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith("@postgres:5432/prefect")

    init_minio = (INFRA / "minio" / "init-minio.sh").read_text()
    buckets = set(re.search(r"for bucket in ([^;]+);", init_minio).group(1).split())
    assert buckets == {"frugalflow-mlflow", "frugalflow-dvc", "frugalflow-models"}
    policies = {p.stem.removeprefix("policy-"): json.loads(p.read_text())
                for p in (INFRA / "minio").glob("policy-*.json")}
    assert set(policies) == set(re.findall(r'^create_user "\S+" "\S+" (\S+)$', init_minio, re.M))

    def reach(policy):
        return {r.split(":::")[1].split("/")[0] for s in policy["Statement"] for r in s["Resource"]}

    assert reach(policies["frugalflow-mlflow"]) == {"frugalflow-mlflow"}
    assert reach(policies["frugalflow-worker"]) == {"frugalflow-dvc", "frugalflow-models"}


def test_every_compose_variable_is_in_env_example():
    text = (INFRA / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    required = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):\?", text))
    example = env_example()
    assert required and required <= used
    assert used <= set(example), f"missing from .env.example: {sorted(used - set(example))}"
    assert all(example[k] for k in required)
    secrets = [k for k in example if k.endswith(("PASSWORD", "SECRET_KEY"))]
    assert secrets and all(example[k].startswith("change-me") for k in secrets)
    assert all(len(example[k]) >= 8 for k in secrets)  # MinIO's minimum


def test_worker_command_polls_the_gpu_pool_and_requests_a_gpu(compose):
    worker = compose["worker"]
    script = worker["command"][2].replace("$$", "$")
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    assert "prefect worker start --pool gpu --type process" in script
    assert "prefect gcl create" in script
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_prefect_deployment_matches_params_schedule():
    from prefect.cli.deploy._models import PrefectYamlModel

    recipe = load_recipe(ROOT / "params.yaml")
    raw = load(INFRA / "prefect.yaml")
    model = PrefectYamlModel.model_validate(raw)  # Prefect's own schema for prefect.yaml
    (deployment,) = [d for d in model.deployments if d.name == "nightly"]
    assert deployment.entrypoint == "flows/nightly.py:compression_flow"
    path, func = deployment.entrypoint.split(":")
    assert f"def {func}(" in (ROOT / path).read_text()
    (schedule,) = raw["deployments"][0]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (recipe.schedule.cron, recipe.schedule.timezone)
    assert deployment.work_pool.name == "gpu"
    assert deployment.concurrency_limit is None  # overlapping runs queue on the `gpu` slot, not per deployment
    # the deployment's overrides must be ones the flow accepts; the tracking server comes from
    # the worker's MLFLOW_TRACKING_URI, which the flow prefers over tracking.uri
    overrides = deployment.parameters["overrides"]
    load_recipe(ROOT / "params.yaml", overrides)
    compose = load(INFRA / "docker-compose.yml")
    assert compose["services"]["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the pull step reads the project folder from the worker's environment: the image's code folder in
    # compose and k8s, the checkout in local team mode
    pull = raw["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    team = load(INFRA / "team.yaml")["worker"]
    assert pull == "{{ $%s }}" % team["project_dir_var"]
    assert compose["services"]["worker"]["environment"][team["project_dir_var"]] == team["project_dir_image"]
    assert load(INFRA / "k8s" / "configmap.yaml")["data"][team["project_dir_var"]] == team["project_dir_image"]
    assert f"WORKDIR {team['project_dir_image']}" in (INFRA / "Dockerfile").read_text()


def test_dockerfile_installs_from_the_lock():
    lines = [ln.strip() for ln in (INFRA / "Dockerfile").read_text().splitlines()]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.11[.\d]*-slim", text, re.M)
    copy_lock = lines.index("COPY requirements.lock ./")
    install_lock = next(i for i, ln in enumerate(lines) if "pip install --no-deps -r requirements.lock" in ln)
    install_repo = next(i for i, ln in enumerate(lines) if "pip install --no-deps -e ." in ln)
    assert copy_lock < install_lock < install_repo
    assert "pip check" in text
    ignored = [ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert ".venv" in ignored and "infra/.env" in ignored and ".git" not in ignored


def test_k8s_gpu_job_and_configmap():
    cm = load(INFRA / "k8s" / "configmap.yaml")
    job = load(INFRA / "k8s" / "gpu-worker-job.yaml")
    assert cm["kind"] == "ConfigMap" and {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"} <= set(cm["data"])
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [cm["metadata"]["name"]]
    assert container["command"][:7] == ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    kustomization = load(INFRA / "k8s" / "kustomization.yaml")
    assert set(kustomization["resources"]) == {"configmap.yaml", "gpu-worker-job.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_k8s_kustomize_renders():
    done = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Job"]


# --------------------------------------------------------------------------- infra/team.yaml: the single source
@pytest.fixture(scope="module")
def team():
    return load(INFRA / "team.yaml")


def test_compose_takes_services_ports_and_buckets_from_team_yaml(team, compose):
    names = {team[s]["service"] for s in ("postgres", "s3", "mlflow", "prefect", "worker")}
    assert names <= set(compose)
    for key in ("s3", "mlflow", "prefect"):
        port = team[key]["port"]
        published = [p for p in compose[team[key]["service"]]["ports"] if p.endswith(f":{port}:{port}")]
        assert published, f"{team[key]['service']} does not publish {port}"
        check = json.dumps(compose[team[key]["service"]].get("healthcheck", {}))
        assert key == "s3" or f"127.0.0.1:{port}{team[key]['health']}" in check
    mlflow_cmd = compose["mlflow"]["command"]
    assert mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1] == f"s3://{team['s3']['buckets']['mlflow']}/"
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == str(team["mlflow"]["port"])
    assert compose["prefect-server"]["command"][-1] == str(team["prefect"]["port"])
    init_minio = (INFRA / "minio" / "init-minio.sh").read_text()
    assert set(re.search(r"for bucket in ([^;]+);", init_minio).group(1).split()) == set(team["s3"]["buckets"].values())
    # each S3 key reaches exactly the buckets team.yaml gives it (MinIO policies)
    policy_of = dict(re.findall(r'^create_user "\$(\w+)" "\$\w+" (\S+)$', init_minio, re.M))
    for key in team["s3"]["keys"].values():
        policy = json.loads((INFRA / "minio" / f"policy-{policy_of[key['access_key_var']]}.json").read_text())
        reach = {r.split(":::")[1].split("/")[0] for s in policy["Statement"] for r in s["Resource"]}
        assert reach == {team["s3"]["buckets"][b] for b in key["buckets"]}


def test_compose_takes_databases_and_variables_from_team_yaml(team, compose):
    pg = team["postgres"]
    host = f"@{pg['service']}:{pg['port']}/"
    mlflow_cmd = compose["mlflow"]["command"]
    store = mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1]
    prefect_url = compose["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    init_sql = (INFRA / "postgres" / "init-databases.sh").read_text()
    mlflow_password = compose["mlflow"]["environment"]["PGPASSWORD"]
    for db, url in (("mlflow", store), ("prefect", prefect_url)):
        var = pg["databases"][db]["password_var"]
        assert url.endswith(f"{host}{db}"), url
        assert f"//{db}:${{{var}:?" in url or (url.startswith(f"postgresql://{db}@") and var in mlflow_password), url
        assert f"CREATE ROLE {db} LOGIN" in init_sql and f"CREATE DATABASE {db} OWNER {db};" in init_sql
        assert var in json.dumps(compose["postgres"]["environment"])
    assert compose["postgres"]["environment"]["POSTGRES_USER"] == pg["admin_user"]
    # every variable team.yaml names is one compose reads from infra/.env, with a change-me secret
    from tasks.team.config import secret_vars

    example = env_example()
    text = (INFRA / "docker-compose.yml").read_text()
    for var in secret_vars(team):
        assert var in example and "${" + var in text, var
        if var.endswith(("PASSWORD", "SECRET_KEY")):
            assert example[var].startswith("change-me"), var


def test_worker_pool_limit_and_client_variables_agree_everywhere(team, compose):
    prefect_yaml = load(INFRA / "prefect.yaml")
    (deployment,) = [d for d in prefect_yaml["deployments"] if d["name"] == team["prefect"]["deployment"]["name"]]
    assert deployment["work_pool"]["name"] == team["prefect"]["work_pool"]["name"]
    assert f'@flow(name="{team["prefect"]["deployment"]["flow"]}"' in (ROOT / "flows" / "nightly.py").read_text()
    assert (ROOT / team["prefect"]["deployment"]["file"]).is_file()
    worker_env = compose["worker"]["environment"]
    gpu = team["prefect"]["gpu_limit"]
    assert worker_env[gpu["var"]] == gpu["name"]
    script = compose["worker"]["command"][2]
    assert f"--pool {team['prefect']['work_pool']['name']} --type {team['prefect']['work_pool']['type']}" in script
    configmap = load(INFRA / "k8s" / "configmap.yaml")["data"]
    job = load(INFRA / "k8s" / "gpu-worker-job.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][3:7] == ["--pool", team["prefect"]["work_pool"]["name"], "--type",
                                   team["prefect"]["work_pool"]["type"]]
    assert configmap[gpu["var"]] == gpu["name"]
    # the client variables: every one reaches the compose worker; the k8s ConfigMap has the addresses
    # (its keys come from a Secret); the ports in both are team.yaml's
    ports = {"mlflow_port": team["mlflow"]["port"], "prefect_port": team["prefect"]["port"],
             "s3_port": team["s3"]["port"]}
    from tasks.team.config import secret_vars

    secret = set(secret_vars(team))
    for var, template in team["client_env"].items():
        assert var in worker_env, var
        named = set(re.findall(r"\{(\w+)\}", template))
        if named & secret:  # a login or key: compose reads it from infra/.env, k8s from a Secret
            assert all("${" + v in worker_env[var] for v in named & secret), (var, worker_env[var])
            assert var not in configmap, var
        elif "{host}" in template:
            for where in (worker_env[var], configmap[var]):
                assert where.endswith(template.split("{host}")[1].format(**ports)), (var, where)
        elif "{FRUGALFLOW_S3" not in template:  # fixed values (the GPU limit, the DVC remote, the models
            # bucket) are the same for the local worker, the compose worker and the k8s worker
            fixed = template.format(gpu_limit=gpu["name"], member_user=team["mlflow"]["auth"]["accounts"]["member"]["user"],
                                    **{f"{b}_bucket": n for b, n in team["s3"]["buckets"].items()})
            assert worker_env[var] == fixed, (var, worker_env[var], fixed)
            if var != "MLFLOW_TRACKING_USERNAME":  # k8s: the login's name comes with its password (Secret)
                assert configmap[var] == fixed, (var, configmap[var], fixed)
    assert "MLFLOW_S3" not in json.dumps(team["client_env"])  # people never get the server's bucket key
    # the worker's runs push DVC data to the DVC bucket and publish models to the models bucket
    client = team["client_env"]
    assert client["FRUGALFLOW_MODELS_URI"] == "s3://{models_bucket}"
    assert client["FRUGALFLOW_DVC_REMOTE"] == "s3://{dvc_bucket}"  # a URL: works for any project's .dvc/config
    from dvc.config import Config

    remote = Config(str(ROOT / ".dvc"))["remote"]["team"]  # this repository's own name for it
    assert remote["url"] == f's3://{team["s3"]["buckets"]["dvc"]}'


def test_team_services_ask_for_logins_and_refuse_placeholder_secrets(team, compose):
    """Compose and k8s start the services with authentication on and refuse change-me secrets."""
    auth = team["mlflow"]["auth"]
    mlflow = compose["mlflow"]
    assert mlflow["command"][2:4] == ["--app-name", "basic-auth"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${" + auth["admin"]["password_var"] + ":?")
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${" + auth["flask_secret_var"] + ":?")
    ini = (INFRA / "mlflow-auth.ini").read_text()
    mount = [v for v in mlflow["volumes"] if v.startswith("./mlflow-auth.ini:")][0]
    assert mount.split(":")[1] == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"default_permission = {auth['default_permission']}" in ini and f"admin_username = {auth['admin']['user']}" in ini
    assert "password" not in ini.split("[mlflow]")[1].lower()  # no secret in the file
    prefect_login = compose["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect_login == f"{team['prefect']['auth']['user']}:${{{team['prefect']['auth']['password_var']}:?set " \
        f"{team['prefect']['auth']['password_var']} in infra/.env}}"
    worker = compose["worker"]["environment"]
    assert worker["PREFECT_API_AUTH_STRING"] == prefect_login
    assert worker["MLFLOW_TRACKING_USERNAME"] == auth["accounts"]["member"]["user"]
    server_only = [auth["admin"]["password_var"], auth["flask_secret_var"], "MLFLOW_DB_PASSWORD"]
    assert not any(v in json.dumps(worker) for v in server_only)
    accounts = compose["mlflow-accounts"]
    assert accounts["entrypoint"] == ["python", "-m", "tasks.team.accounts"]
    assert {a["password_var"] for a in auth["accounts"].values()} <= set(accounts["environment"])

    # every service waits for the secrets check, directly or through what it depends on
    def waits_for_check(name: str) -> bool:
        deps = compose[name].get("depends_on") or {}
        return "secrets-check" in deps or any(waits_for_check(d) for d in deps)

    assert all(waits_for_check(name) for name in SERVICES - {"secrets-check"})
    checked = set(compose["secrets-check"]["environment"])
    from tasks.team.config import secret_vars

    assert {v for v in secret_vars(team) if v.endswith(("PASSWORD", "SECRET_KEY"))} <= checked
    script = INFRA / "check-secrets.sh"
    example = env_example()
    done = subprocess.run(["sh", str(script)], env={**example, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 1 and all(f"{v}(placeholder)" in done.stderr for v in checked), done.stderr
    assert not any(example[v] in done.stderr for v in checked)  # names, never values
    fresh = {v: "x" * 24 for v in checked}
    done = subprocess.run(["sh", str(script)], env={**fresh, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    short = {**fresh, "PREFECT_AUTH_PASSWORD": "short"}
    done = subprocess.run(["sh", str(script)], env={**short, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 1 and "PREFECT_AUTH_PASSWORD(shorter than 16)" in done.stderr
    # the k8s worker: the logins from a required Secret, checked by an init container before it starts
    pod = load(INFRA / "k8s" / "gpu-worker-job.yaml")["spec"]["template"]["spec"]
    (check,) = pod["initContainers"]
    assert check["command"][:2] == ["sh", "/opt/frugalflow/infra/check-secrets.sh"]
    assert set(check["command"][2:]) == {"MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"}
    refs = {r["secretRef"]["name"]: r["secretRef"].get("optional", False) for r in pod["containers"][0]["envFrom"]
            if "secretRef" in r}
    assert refs["frugalflow-logins"] is False

