"""Team mode on one machine, without Docker: `frugalflow team up | status | down`.

PostgreSQL (Debian's package, a cluster under `.team/`), an S3 server (moto, keys checked, on disk), the MLflow server
(artifacts proxied to S3), the Prefect server, the `gpu` work pool with its concurrency limit, a
worker and the nightly deployment, all on loopback, named by `infra/team.yaml`. It lives in
tasks/ because it talks to MLflow, Prefect, S3 and PostgreSQL, which the house rules keep here
(flows/cli.py only calls `stack.up/status/down`).

    config.py    infra/team.yaml, ports, generated secrets and the env files
    procs.py     starting, health-checking and stopping server processes
    postgres.py  initdb, pg_ctl, roles and databases
    s3.py        the S3 server's start, buckets and keys
    s3_server.py moto's S3 with keys checked and every object written to disk
    servers.py   the MLflow server, the Prefect server, work pool, limit, deployment, worker
    stack.py     up, status, down
"""
