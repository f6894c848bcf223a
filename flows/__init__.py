"""Prefect flows and the CLI. Offline-friendly Prefect defaults are set before Prefect loads."""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from an offline box
os.environ.setdefault("DO_NOT_TRACK", "1")  # MLflow/DVC usage telemetry off as well
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow honours DO_NOT_TRACK only when it is "true"
