"""Servable files of registered versions: the flow exports each registered version as GGUF
(llama.cpp) and compressed-tensors (vLLM) and attaches both to the version's run under
`serving/`, naming them in the version's tags `serving.<format>`; `frugalflow export
models:/NAME@ALIAS` (or models:/NAME/VERSION) fetches them from the registry alone, exporting the
version's logged model directory where a file was not attached."""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from frugalflow.errors import BadInput
from frugalflow.export import FORMATS, export
from frugalflow.export.common import write_atomically
from tasks.registry import candidate_run_id

FOLDER = "serving"
NAMES = {"gguf": "model.gguf", "compressed-tensors": "compressed-tensors"}
TAG = "serving.{fmt}"
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def attach(client: MlflowClient, name: str, version: str, run_id: str, model_dir: str | Path, logger) -> dict:
    """Export model_dir in every format and log each as an artifact of run_id; {format: artifact path}.
    A format the model has no exact layout for is written dequantized where it can be (the
    exporter's fallback); where no file can be written, the version keeps its registration and
    the warning says why (a deploy step then exports the version's model itself)."""
    attached = {}
    for fmt in FORMATS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / NAMES[fmt]
            try:
                export(fmt, model_dir, out)
            except Exception as exc:  # noqa: BLE001 (the registration stands without serving files)
                logger.warning("version %s has no %s file: %s", version, fmt, exc)
                continue
            if out.is_dir():
                client.log_artifacts(run_id, str(out), f"{FOLDER}/{NAMES[fmt]}")
            else:
                client.log_artifact(run_id, str(out), FOLDER)
        attached[fmt] = f"{FOLDER}/{NAMES[fmt]}"
        client.set_model_version_tag(name, version, TAG.format(fmt=fmt), attached[fmt])
    logger.info("attached %s to %s version %s", ", ".join(attached) or "nothing", name, version)
    return attached


def resolve(client: MlflowClient, uri: str):
    """The model version a registry URI names (models:/NAME@ALIAS or models:/NAME/VERSION)."""
    match = REGISTRY_URI.match(uri)
    if not match:
        raise BadInput(f"{uri!r} is not a registry URI; allowed: models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as exc:
        raise BadInput(f"{uri}: the registry has no such version ({exc.message.splitlines()[0]})") from exc


def fetch(client: MlflowClient, uri: str, fmt: str, out: str | Path, *, float_type: str = "f16",
          require_exact: bool = False, overwrite: bool = False) -> dict:
    """Write the servable `fmt` file of the version `uri` names to `out`: the file attached to it
    when there is one and the options are those it was written with (the defaults), else an export
    of its logged model directory. A summary: format, path, bytes, version, and `attached` (True when downloaded)."""
    version = resolve(client, uri)
    out = Path(out)
    if out.exists() and not overwrite:  # before any download
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    attached, run_id = version.tags.get(TAG.format(fmt=fmt)), candidate_run_id(version)
    with tempfile.TemporaryDirectory() as tmp:
        if attached and (float_type, require_exact) == ("f16", False):
            got = Path(client.download_artifacts(run_id, attached, tmp))
            summary = {"format": fmt, "path": str(out), "attached": True}
        else:
            model_dir = Path(client.download_artifacts(run_id, "model", tmp))
            got = Path(tmp) / NAMES[fmt]
            summary = {**export(fmt, model_dir, got, float_type=float_type, require_exact=require_exact),
                       "path": str(out), "attached": False}
        write_atomically(out, lambda tmp: shutil.copytree(got, tmp, dirs_exist_ok=True) if got.is_dir()
                         else shutil.copyfile(got, tmp), is_dir=got.is_dir(), overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return {**summary, "bytes": size, "version": str(version.version), "name": version.name}
