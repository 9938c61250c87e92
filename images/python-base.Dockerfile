# The Python layer every job image builds on: Debian bookworm's own python3
# (3.11, the minor version the CPU torch wheel is built for) with venv and pip.
# Built by scripts/ensure-docker.sh from the locally imported base image,
# because no registry is reachable to pull one.
FROM runner-base:bookworm

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1
