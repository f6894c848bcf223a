# MLflow tracking server image: mlflow and boto3 at the versions of requirements.lock (every
# dependency held to the lock with -c), Flask-WTF for the basic-auth app, plus the PostgreSQL
# driver, which the lock lacks.
# Build from the repo root: docker build -f infra/mlflow.Dockerfile -t frugalflow-mlflow:3.17.2 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.lock /tmp/requirements.lock
RUN pip install -c /tmp/requirements.lock \
        "$(grep '^mlflow==' /tmp/requirements.lock)" \
        "$(grep '^boto3==' /tmp/requirements.lock)" \
        "$(grep '^Flask-WTF==' /tmp/requirements.lock)" \
        psycopg2-binary==2.9.10 \
 && useradd --create-home --uid 1000 mlflow

USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
