"""The S3 API of local team mode: moto's S3, made to check who asks and to keep what it was given.

    python -m tasks.team.s3_server --host 127.0.0.1 --port 9000 --data .team/s3 --spec KEYS_JSON_ENV

- Keys: every request must be signed with one of the access keys of infra/team.yaml (`s3.keys`,
  plus the root key), each allowed `s3:*` on its own buckets only (moto's IAM policy checks, on from
  the first request). Unsigned requests are refused before moto sees them. Presigned URLs (query
  signatures, which MLflow's server hands its clients for downloads; moto's own check reads only
  the Authorization header) are verified here: signature, expiry and the key's buckets.
- Durability: every bucket created and every object a successful PUT / POST / DELETE wrote or removed is written to (or
  removed from) `<data>/objects/<bucket>/<key>` with its metadata beside it in `<data>/meta/...`
  (written to a temporary file, then renamed) before the client gets its answer; on start every
  saved object is loaded back. A SIGKILL loses nothing that was acknowledged.

The keys come from the environment variable named by --spec (JSON: {name: [access, secret,
[bucket, ...] or "*"]}), never the command line. moto still holds every object in memory as well.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

ACCOUNT = "123456789012"  # moto's default account
MUTATING = ("PUT", "POST", "DELETE")


def policy(buckets: list[str] | str) -> dict:
    if buckets == "*":
        resources = ["arn:aws:s3:::*"]
    else:
        resources = [r for b in buckets for r in (f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*")]
    return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": resources}]}


_presigned = threading.local()  # set while moto serves a presigned request verified here


def install_keys(keys: dict[str, list]) -> None:
    """One IAM user per key, with exactly that access key and a policy reaching its buckets; then
    moto checks signatures and policies from the first request on (except for a presigned request
    this server verified itself)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.models import iam_backends

    check = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def unless_presigned(self, *args, **kwargs):
        if not getattr(_presigned, "verified", False):
            return check(self, *args, **kwargs)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = unless_presigned

    iam = iam_backends[ACCOUNT]["aws"]
    for name, (access, secret, buckets) in keys.items():
        iam.create_user(region_name="us-east-1", user_name=name, path="/")
        key = iam.create_access_key(user_name=name)
        key.access_key_id, key.secret_access_key = access, secret
        iam.put_user_policy(name, f"{name}-buckets", json.dumps(policy(buckets)))
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0


def s3():
    from moto.s3.models import s3_backends

    return s3_backends[ACCOUNT]["aws"]


class Store:
    """Objects on disk, mirrored from moto after each write."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.Lock()

    def paths(self, bucket: str, key: str) -> tuple[Path, Path]:
        parts = Path(key).parts
        if not key or key.startswith("/") or ".." in parts or "." in parts:
            raise ValueError(f"object key {key!r} cannot be kept as a file")
        return self.root / "objects" / bucket / key, self.root / "meta" / bucket / (key + ".json")

    def sync(self, bucket: str, key: str) -> None:
        """Make the disk hold what moto holds for (bucket, key): the object, or nothing."""
        backend = s3()
        obj = None
        if bucket in backend.buckets:
            obj = backend.buckets[bucket].keys.get(key)
        data, meta = self.paths(bucket, key)
        with self.lock:
            if obj is None:
                data.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                return
            for path, content in ((data, obj.value), (meta, json.dumps({"metadata": dict(obj.metadata)}).encode())):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
                tmp.write_bytes(content)
                os.replace(tmp, path)

    def sync_bucket(self, bucket: str) -> None:
        """After a multi-object delete: drop what moto no longer has."""
        folder = self.root / "objects" / bucket
        if not folder.is_dir():
            return
        have = s3().buckets[bucket].keys if bucket in s3().buckets else {}
        for path in [p for p in folder.rglob("*") if p.is_file() and ".tmp" not in p.name]:
            key = path.relative_to(folder).as_posix()
            if key not in have:
                self.sync(bucket, key)

    def load(self) -> int:
        """Every saved object back into moto (buckets created as needed); the number loaded."""
        backend, count = s3(), 0
        objects = self.root / "objects"
        if not objects.is_dir():
            return 0
        for folder in sorted(p for p in objects.iterdir() if p.is_dir()):
            if folder.name not in backend.buckets:
                backend.create_bucket(folder.name, "us-east-1")
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".tmp" not in p.name):
                key = path.relative_to(folder).as_posix()
                obj = backend.put_object(folder.name, key, path.read_bytes())
                meta = self.paths(folder.name, key)[1]
                if meta.is_file():
                    obj.set_metadata(json.loads(meta.read_text())["metadata"], replace=True)
                count += 1
        return count


def presigned_refusal(environ: dict, keys: dict[str, list]) -> str | None:
    """Why a query-signed (presigned, SigV4) request is refused; None when its signature, expiry and
    bucket check out."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    path, _, query = raw.partition("?")
    params = [tuple(part.split("=", 1)) if "=" in part else (part, "") for part in query.split("&") if part]
    given = {unquote(k): unquote(v) for k, v in params}
    try:
        access, day, region, service, _ = given["X-Amz-Credential"].split("/")
        stamp, expires, signed = given["X-Amz-Date"], int(given["X-Amz-Expires"]), given["X-Amz-SignedHeaders"]
    except (KeyError, ValueError):
        return "incomplete query signature"
    key = next((k for k in keys.values() if k[0] == access), None)
    if key is None:
        return "unknown access key"
    at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    if not at - 900 <= time.time() <= at + expires:
        return "expired"
    bucket = unquote(path).lstrip("/").partition("/")[0]
    if key[2] != "*" and bucket not in key[2]:
        return "access denied"
    encode = lambda text: quote(text, safe="-_.~")  # noqa: E731 - AWS's URI encoding
    canonical_query = "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(given.items()) if k != "X-Amz-Signature")
    headers = {name: (environ.get("HTTP_" + name.upper().replace("-", "_")) or "").strip() for name in signed.split(";")}
    canonical = "\n".join([environ["REQUEST_METHOD"], path, canonical_query,
                           "".join(f"{n}:{v}\n" for n, v in headers.items()), signed, "UNSIGNED-PAYLOAD"])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    secret = ("AWS4" + key[1]).encode()
    for part in (day, region, service, "aws4_request"):
        secret = hmac.new(secret, part.encode(), hashlib.sha256).digest()
    wanted = hmac.new(secret, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(wanted, given.get("X-Amz-Signature", "")) else "signature does not match"


def bucket_and_key(environ: dict) -> tuple[str, str]:
    path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
    bucket, _, key = path.partition("/")
    return bucket, key


def refuse(start_response, status: str, code: str, message: str) -> list[bytes]:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            "</Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class Guarded:
    """WSGI around moto: unsigned requests refused, presigned ones verified; writes mirrored to disk
    before the answer."""

    def __init__(self, app, store: Store, keys: dict[str, list]):
        self.app, self.store, self.keys = app, store, keys

    def __call__(self, environ, start_response):
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        presigned = not environ.get("HTTP_AUTHORIZATION") and "X-Amz-Signature" in query
        if not environ.get("HTTP_AUTHORIZATION") and not presigned:
            return refuse(start_response, "403 Forbidden", "AccessDenied", "Anonymous requests are refused")
        if presigned:
            why = presigned_refusal(environ, self.keys)
            if why is not None:
                return refuse(start_response, "403 Forbidden", "AccessDenied", f"Presigned request refused: {why}")
            _presigned.verified = True
        try:
            return self.serve(environ, start_response, query)
        finally:
            _presigned.verified = False

    def serve(self, environ, start_response, query):
        if environ["REQUEST_METHOD"] not in MUTATING:
            return self.app(environ, start_response)
        answer: dict = {}

        def capture(status, headers, exc_info=None):
            answer.update(status=status, headers=headers)
            return lambda chunk: answer.setdefault("early", []).append(chunk)

        body = b"".join(self.app(environ, capture))
        body = b"".join(answer.get("early", [])) + body
        if answer["status"].startswith("2"):
            bucket, key = bucket_and_key(environ)
            try:
                if not key and environ["REQUEST_METHOD"] == "PUT":  # CreateBucket: kept even while empty
                    (self.store.root / "objects" / bucket).mkdir(parents=True, exist_ok=True)
                elif key and not ("partNumber" in query and "uploadId" in query):
                    if "uploadId" not in query or environ["REQUEST_METHOD"] == "POST":
                        self.store.sync(bucket, key)
                elif bucket and "delete" in query:
                    self.store.sync_bucket(bucket)
            except (OSError, ValueError) as exc:
                return refuse(start_response, "500 Internal Server Error", "InternalError",
                              f"the object could not be kept on disk: {exc}")
        start_response(answer["status"], answer["headers"])
        return [body]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", required=True, help="folder of the saved objects")
    parser.add_argument("--spec", required=True, help="environment variable holding the keys (JSON)")
    args = parser.parse_args(argv)
    keys = json.loads(os.environ.pop(args.spec))
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    install_keys(keys)
    store = Store(Path(args.data))
    print(f"s3 server: {store.load()} objects loaded from {store.root}", flush=True)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, Guarded(app, store, keys), threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
