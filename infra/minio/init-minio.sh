#!/bin/sh
# One-shot MinIO setup (the minio-init service), safe to rerun on every `docker compose up`:
# the buckets, and one access key per client holding only the buckets it needs.
#   frugalflow-mlflow   MLflow's artifact store (only the MLflow server touches it)
#   frugalflow-dvc      DVC remote
#   frugalflow-models   published model directories (tasks.storage.publish_model)
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in frugalflow-mlflow frugalflow-dvc frugalflow-models; do
  mc mb --ignore-existing "local/$bucket"
done

# create_user KEY SECRET POLICY: add (or update) the user, then attach the policy. A rerun's
# attach fails when the policy is already attached; that is fine when the user shows it.
create_user() {
  mc admin policy create local "$3" "/init/policy-$3.json"
  mc admin user add local "$1" "$2"
  mc admin policy attach local "$3" --user "$1" || mc admin user info local "$1" | grep -q "$3"
}
create_user "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" frugalflow-mlflow
create_user "$FRUGALFLOW_S3_ACCESS_KEY" "$FRUGALFLOW_S3_SECRET_KEY" frugalflow-worker
echo "minio-init: buckets and access keys ready"
