"""infra/team.yaml read into a `Team`: ports, generated secrets, the env files, what clients get.

The env file (`<folder>/team.env`, mode 0600) is written on the first `team up` with fresh
secrets and the ports chosen, and read back by every later command: secrets are reused, never
regenerated, never printed. `client.env` beside it holds what a team member's shell needs
(addresses, the member logins to MLflow and Prefect, the worker's S3 key), never the MLflow server's
bucket key, its admin password or a database password; `reader.env` only the MLflow reader login.
"""
from __future__ import annotations

import os
import secrets as pysecrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC_FILE = REPO / "infra" / "team.yaml"
SERVICES = ("postgres", "s3", "mlflow", "prefect")  # the ones with a port, in start order
PORT_VARS = {s: f"TEAM_{s.upper()}_PORT" for s in SERVICES}


class TeamError(Exception):
    """A team-mode failure the CLI reports in one line; `exit_code` 4: a service, 2: bad input."""

    exit_code = 4


class TeamInputError(TeamError):
    exit_code = 2


def load_spec(path: Path = SPEC_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def secret_vars(spec: dict) -> list[str]:
    """Every variable of the spec that names a generated value (passwords, users, keys)."""
    pg, s3 = spec["postgres"], spec["s3"]
    names = [pg["admin_password_var"], *(d["password_var"] for d in pg["databases"].values()),
             s3["root_user_var"], s3["root_password_var"]]
    for key in s3["keys"].values():
        names += [key["access_key_var"], key["secret_key_var"]]
    auth = spec["mlflow"]["auth"]
    names += [auth["admin"]["password_var"], auth["flask_secret_var"],
              *(a["password_var"] for a in auth["accounts"].values()), spec["prefect"]["auth"]["password_var"]]
    return names


def generate(var: str) -> str:
    if var.endswith("ACCESS_KEY"):
        return "AK" + pysecrets.token_hex(9).upper()
    if var.endswith("_USER"):
        return "frugalflow-" + pysecrets.token_hex(3)
    return pysecrets.token_urlsafe(24).replace("-", "x").replace("_", "y")  # URL-safe in connection strings


def read_env(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip().removeprefix("export ").strip()] = value.strip()
    return values


def write_env(path: Path, values: dict[str, str], header: str) -> None:
    """Write atomically with mode 0600 from the start (the secret never sits in a readable file)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(header + "".join(f"{k}={v}\n" for k, v in values.items()))
    os.replace(tmp, path)


@dataclass
class Team:
    """One installation: the spec, where its state lives, its ports and secrets."""

    spec: dict
    home: Path
    project_dir: Path
    env: dict[str, str] = field(repr=False)

    @property
    def host(self) -> str:
        return self.spec["host"]

    def port(self, service: str) -> int:
        return int(self.env[PORT_VARS[service]])

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.port(service)}"

    @property
    def mlflow_uri(self) -> str:
        return self.url("mlflow")

    @property
    def prefect_api(self) -> str:
        return self.url("prefect") + "/api"

    @property
    def s3_endpoint(self) -> str:
        return self.url("s3")

    @property
    def buckets(self) -> dict[str, str]:
        return dict(self.spec["s3"]["buckets"])

    @property
    def secrets(self) -> dict[str, str]:
        """The generated secrets (passwords and secret keys) by variable name, for scans."""
        return {k: self.env[k] for k in secret_vars(self.spec) if k.endswith(("PASSWORD", "SECRET_KEY"))}

    def s3_key(self, client: str) -> tuple[str, str]:
        key = self.spec["s3"]["keys"][client]
        return self.env[key["access_key_var"]], self.env[key["secret_key_var"]]

    @property
    def s3_root(self) -> tuple[str, str]:
        s3 = self.spec["s3"]
        return self.env[s3["root_user_var"]], self.env[s3["root_password_var"]]

    @property
    def pg(self) -> dict:
        spec = self.spec["postgres"]
        return {"host": self.host, "port": self.port("postgres"), "admin_user": spec["admin_user"],
                "admin_password": self.env[spec["admin_password_var"]],
                **{db: {"user": db, "password": self.env[d["password_var"]], "dbname": db}
                   for db, d in spec["databases"].items()}}

    @property
    def work_pool(self) -> str:
        return self.spec["prefect"]["work_pool"]["name"]

    @property
    def gpu_limit(self) -> str:
        return self.spec["prefect"]["gpu_limit"]["name"]

    @property
    def mlflow_accounts(self) -> dict[str, tuple[str, str]]:
        """(user, password) by role: `admin` (servers only), `member`, `reader`."""
        auth = self.spec["mlflow"]["auth"]
        roles = {"admin": auth["admin"], **auth["accounts"]}
        return {role: (a["user"], self.env[a["password_var"]]) for role, a in roles.items()}

    @property
    def prefect_auth(self) -> str:
        """The Prefect server's API login, `user:password` (PREFECT_SERVER_API_AUTH_STRING)."""
        auth = self.spec["prefect"]["auth"]
        return f"{auth['user']}:{self.env[auth['password_var']]}"

    def _filled(self, section: str) -> dict[str, str]:
        fill = {"host": self.host, "gpu_limit": self.gpu_limit, "prefect_user": self.spec["prefect"]["auth"]["user"],
                **{f"{role}_user": user for role, (user, _) in self.mlflow_accounts.items()},
                **{f"{b}_bucket": name for b, name in self.spec["s3"]["buckets"].items()},
                **{f"{s}_port": self.port(s) for s in SERVICES}, **self.env}
        return {k: v.format(**fill) for k, v in self.spec[section].items()}

    def client_env(self) -> dict[str, str]:
        """A team member's (and the worker's) variables: addresses, member logins, the worker's S3 key."""
        return self._filled("client_env")

    def reader_env(self) -> dict[str, str]:
        """A read-only member's variables: the MLflow address and the reader login."""
        return self._filled("reader_env")

    @property
    def env_file(self) -> Path:
        return self.home / self.spec["env_file"]

    @property
    def client_env_file(self) -> Path:
        return self.home / self.spec["client_env_file"]

    @property
    def reader_env_file(self) -> Path:
        return self.home / self.spec["reader_env_file"]

    def logs(self) -> Path:
        path = self.home / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path


def default_home(project_dir: Path, spec: dict | None = None) -> Path:
    return project_dir / (spec or load_spec())["folder"]


def open_team(home: Path | None, project_dir: Path, ports: dict[str, int] | None = None,
              create: bool = True) -> Team:
    """The installation at `home`: its env file read back, or (create=True, first start) written
    with fresh secrets; `ports` override the stored or default ports (and are stored)."""
    spec = load_spec()
    home = Path(home or default_home(project_dir, spec)).resolve()
    unknown = set(ports or {}) - set(SERVICES)
    if unknown:
        raise TeamInputError(f"--port: unknown service {', '.join(sorted(unknown))}; services: {', '.join(SERVICES)}")
    env_path = home / spec["env_file"]
    env = read_env(env_path)
    if not env and not create:
        raise TeamInputError(f"no team installation at {home} ({env_path} missing): `frugalflow team up` creates it")
    changed = not env
    for var in secret_vars(spec):
        if not env.get(var):
            env[var], changed = generate(var), True
    for service in SERVICES:
        wanted = ((ports or {}).get(service) or env.get(PORT_VARS[service])
                  or spec[service].get("local_port", spec[service]["port"]))
        if env.get(PORT_VARS[service]) != str(wanted):
            env[PORT_VARS[service]], changed = str(wanted), True
    if changed:
        if not create:
            raise TeamInputError(f"{env_path} is incomplete: run `frugalflow team up`")
        home.mkdir(parents=True, exist_ok=True)
        write_env(env_path, env, "# frugalflow team mode: generated secrets and ports (keep private; never commit)\n")
    return Team(spec=spec, home=home, project_dir=Path(project_dir).resolve(), env=env)
