# The autotune image: the `autotune` command and nothing else. docker-compose.yml runs it as the
# worker service; on another node, `docker run` it against the same PostgreSQL and MLflow server.
#
#   docker build -t autotune .     # torch with CUDA, for GPU nodes
#   docker build -t autotune \
#     --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" .
#   docker run --rm autotune validate examples/quickstart.yaml
FROM python:3.12-slim-trixie

# PyPI's Linux wheel of torch carries its own CUDA libraries; the driver comes from the host
# (NVIDIA Container Toolkit), so the base image needs no CUDA. The CPU build above is much smaller.
ARG TORCH="torch==2.13.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, in a layer of its own: the largest download, and the one that changes least.
#    $TORCH is unquoted on purpose: it may carry --index-url.
RUN pip install $TORCH

# 2. the project with the storage drivers a cluster needs (psycopg 3 for PostgreSQL, redis);
#    torch is already there, so pip keeps it.
WORKDIR /opt/autotune
COPY pyproject.toml README.md ./
COPY autotune ./autotune
COPY search_spaces ./search_spaces
RUN pip install ".[postgres,redis]"

# 3. a user of its own: nothing the study runs needs root. runs/ is where a spec's relative
#    `output` lands; a named volume mounted there takes this owner.
RUN useradd --create-home --uid 1000 autotune \
    && mkdir -p /work/runs \
    && chown autotune:autotune /work /work/runs
COPY examples /work/examples
USER autotune
WORKDIR /work

ENTRYPOINT ["autotune"]
CMD ["--help"]
