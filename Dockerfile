# The trainer image: `docker run IMAGE RESOLVED.json --out RUN_DIR` trains one run.
#
# The runner builds it per image family (images/catalog.yaml) and tags it with a
# hash of this file, pyproject.toml and the project sources, so it is rebuilt
# only when one of them changes. By hand:
#
#   docker build -t runner-trainer:cuda-ampere .
#   docker build -t runner-trainer:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Offline (no registry, no package index): put every wheel the install needs in
# .cache/wheels (`pip download` on a machine with the same Python), then
#   docker build --build-arg BASE_IMAGE=runner-python:bookworm --build-arg OFFLINE=1 .
# The runner does this by itself when a family's base image cannot be pulled
# (images/catalog.yaml: offline_base_image; docs/runs.md, Images).
#
# It builds with the classic builder (no BuildKit features), which is what the
# Docker SDK for Python drives.

ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.6-cudnn9-runtime

# --- dependencies: rebuilt only when pyproject.toml, the wheels or the build args change ----
FROM ${BASE_IMAGE} AS deps

ARG WHEELS=.cache/wheels
ARG OFFLINE=
ARG INDEX_URL=
ARG TORCH_INDEX_URL=
ARG EXTRA_PACKAGES=

# --system-site-packages keeps the base image's torch (the CUDA images ship it).
RUN python3 -m venv --system-site-packages /opt/runner

# The wheel directory may be absent: pyproject.toml makes the COPY valid either way.
COPY pyproject.toml ${WHEELS}* /build/wheels/

RUN set -eu; \
    pip="/opt/runner/bin/pip install --no-cache-dir --find-links /build/wheels"; \
    [ -z "$OFFLINE" ] || pip="$pip --no-index"; \
    [ -z "$INDEX_URL" ] || pip="$pip --index-url $INDEX_URL"; \
    # A family that takes torch from an index (CPU) takes a torch wheel in the build context
    # first; one that keeps its base image's CUDA torch never does (the wheel there is a CPU build).
    if [ -n "$TORCH_INDEX_URL" ]; then \
        if ls /build/wheels/torch-*.whl >/dev/null 2>&1; then \
            /opt/runner/bin/pip install --no-cache-dir --no-index --find-links /build/wheels torch; \
        else \
            $pip --index-url "$TORCH_INDEX_URL" torch; \
        fi; \
    fi; \
    /opt/runner/bin/python -c 'import tomllib; p = tomllib.load(open("/build/wheels/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["train"]))' \
        > /build/requirements.txt; \
    $pip "setuptools>=68" wheel -r /build/requirements.txt $EXTRA_PACKAGES

# --- the image: the dependency venv, then the sources as a thin layer ----------------------
FROM ${BASE_IMAGE}

ENV PATH=/opt/runner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/runner \
    HF_HOME=/home/runner/.cache/huggingface

RUN useradd --uid 1000 --user-group --create-home --home-dir /home/runner --shell /bin/sh runner \
 && chmod 0777 /home/runner  # the runner may start the container as the invoking user's uid

COPY --from=deps /opt/runner /opt/runner

# The trainer needs only the runner package; the TUI stays out of the image.
COPY pyproject.toml README.md /src/
COPY runner /src/runner
RUN /opt/runner/bin/pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src \
 && rm -rf /src

USER runner
WORKDIR /home/runner
ENTRYPOINT ["python", "-m", "runner.trainer"]
