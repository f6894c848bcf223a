#!/bin/sh
# Refuse to start team services with a placeholder (change-me...) or a short secret: docker-compose's
# secrets-check (every secret of infra/.env, the default list) and the k8s worker's init container
# (the variables it names). Prints variable names only, never values.
bad=""
vars="${*:-POSTGRES_PASSWORD MLFLOW_DB_PASSWORD PREFECT_DB_PASSWORD MINIO_ROOT_PASSWORD MLFLOW_S3_SECRET_KEY
  FRUGALFLOW_S3_SECRET_KEY MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SECRET_KEY MLFLOW_MEMBER_PASSWORD
  MLFLOW_READER_PASSWORD PREFECT_AUTH_PASSWORD}"
for var in $vars; do
  eval "value=\${$var:-}"
  case "$value" in
    *change-me*) bad="$bad $var(placeholder)" ;;
    *) [ "${#value}" -ge 16 ] || bad="$bad $var(shorter than 16)" ;;
  esac
done
if [ -n "$bad" ]; then
  echo "replace these secrets before starting the team services (infra/.env, or the k8s Secret):$bad" >&2
  echo "e.g. openssl rand -hex 24 for each" >&2
  exit 1
fi
echo "secrets-check: every secret set"
