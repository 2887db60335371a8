# The MLflow tracking server of docker-compose.yml: the official image plus a PostgreSQL driver,
# which that image leaves out. Installed here, at build time, so nothing installs at start.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}

# psycopg 3, as the workers use; the compose file names it in the URL (postgresql+psycopg://)
RUN pip install --no-cache-dir "psycopg[binary]==3.3.9"
