#!/usr/bin/env bash
# An MLflow tracking server for a team: a database backend (many writers) and an artifact root.
#   scripts/mlflow_server.sh                          # sqlite in ./mlflow-server, port 5000, this host only
#   BACKEND=postgresql://mlflow:PASS@db-host:5432/mlflow ARTIFACTS=/shared/mlartifacts \
#     HOST=0.0.0.0 scripts/mlflow_server.sh          # the multi-user setup (PostgreSQL)
# Then point runs, sweeps and SLURM jobs at it: export MLFLOW_TRACKING_URI=http://<host>:5000
# (sbatch passes the environment to jobs; Ray workers inherit it from the sweep driver).
set -euo pipefail
DIR=${DIR:-$PWD/mlflow-server}
mkdir -p "$DIR"
BACKEND=${BACKEND:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "$(dirname "$0")/../.venv/bin/mlflow" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers "${WORKERS:-2}" ${ALLOWED_HOSTS:+--allowed-hosts "$ALLOWED_HOSTS"}
