#!/usr/bin/env bash
# The databases of the Prefect and MLflow servers, each owned by a role of its own.
#
# Run by the postgres image on its first start (docker-compose.yml mounts this file into
# /docker-entrypoint-initdb.d) and by infra/local-stack against its own cluster. Running it again
# changes nothing but the two roles' passwords, which it sets from PREFECT_DB_PASSWORD and
# MLFLOW_DB_PASSWORD. It connects as POSTGRES_USER; libpq's PG* variables say where (the local
# socket when unset, as in the image).
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', name) FROM unnest(ARRAY['prefect', 'mlflow']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \gexec
ALTER ROLE prefect WITH LOGIN PASSWORD :'prefect_password';
ALTER ROLE mlflow WITH LOGIN PASSWORD :'mlflow_password';
SELECT format('CREATE DATABASE %I OWNER %I', name, name) FROM unnest(ARRAY['prefect', 'mlflow']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name) \gexec
SQL
