#!/usr/bin/env bash
# Make a Docker Engine and the local base images available, whatever state the
# machine is in: install and start dockerd if needed (no systemd), then build
# runner-base:bookworm with debootstrap (no registry is reachable to pull from)
# and runner-python:bookworm on top of it. Safe to run again; a run that finds
# everything in place takes about a second.
set -euo pipefail

BASE_IMAGE=runner-base:bookworm
PYTHON_IMAGE=runner-python:bookworm
DOCKERFILE="$(cd "$(dirname "$0")/.." && pwd)/images/python-base.Dockerfile"
DOCKERD_LOG=/var/log/dockerd.log
DOCKERD_START_TIMEOUT_S=60
LOCK=/tmp/runner-ensure-docker.lock

WORKDIR=""
trap '[ -z "$WORKDIR" ] || rm -rf "$WORKDIR"' EXIT

say() { echo "ensure-docker: $*"; }

# Run a noisy command with its output in a log; show the end of it only on failure.
quietly() {
  local log
  log=$(mktemp /tmp/runner-ensure-docker.XXXXXX.log)
  if "$@" >"$log" 2>&1; then
    rm -f "$log"
  else
    say "failed: $*; last lines of its output:" >&2
    tail -n 25 "$log" >&2
    rm -f "$log"
    exit 1
  fi
}

# apt-get install that refreshes the package lists only when it has to.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    say "apt-get update"
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends "$@"
  fi
}

# The Debian mirror this machine already uses, so debootstrap fetches from the same place.
debian_mirror() {
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri=$(awk '
      function flush() {
        if (!found && types ~ /(^| )deb( |$)/ && suites ~ /(^| )bookworm( |$)/ && uri != "") { print uri; found = 1 }
        types = ""; suites = ""; uri = ""
      }
      FNR == 1 || /^[[:space:]]*$/ { flush() }
      /^Types:/  { sub(/^Types:[[:space:]]*/, "");  types = $0 }
      /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
      /^URIs:/   { sub(/^URIs:[[:space:]]*/, "");   uri = $1 }
      END { flush() }
    ' /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

start_engine() {
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    say "installing docker.io"
    apt_install docker.io
  fi
  local pid=""
  [ -s /var/run/docker.pid ] && pid=$(cat /var/run/docker.pid)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "dockerd (pid $pid) is running; waiting for it to answer"
  else
    say "starting dockerd (log: $DOCKERD_LOG)"
    # 9>&-: the daemon outlives this script and must not hold its lock.
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    pid=$!
  fi
  local deadline=$((SECONDS + DOCKERD_START_TIMEOUT_S))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      say "dockerd exited or did not answer within ${DOCKERD_START_TIMEOUT_S}s; last lines of $DOCKERD_LOG:" >&2
      tail -n 20 "$DOCKERD_LOG" >&2
      exit 1
    fi
    sleep 0.5
  done
  say "engine is up"
}

build_base_image() {
  command -v debootstrap >/dev/null || { say "installing debootstrap"; apt_install debootstrap; }
  local mirror
  mirror=$(debian_mirror)
  WORKDIR=$(mktemp -d /var/tmp/runner-rootfs.XXXXXX)
  say "debootstrap bookworm from $mirror (about 30 s)"
  quietly debootstrap --variant=minbase bookworm "$WORKDIR/rootfs" "$mirror"
  rm -rf "$WORKDIR"/rootfs/var/cache/apt/archives/*.deb "$WORKDIR"/rootfs/var/lib/apt/lists/*
  say "importing $BASE_IMAGE"
  tar -C "$WORKDIR/rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORKDIR"
  WORKDIR=""
}

# The image carries the hash of its Dockerfile, so an edited Dockerfile is rebuilt.
build_python_image() {
  local sha current
  sha=$(sha256sum "$DOCKERFILE" | cut -d' ' -f1)
  current=$(docker image inspect -f '{{ index .Config.Labels "runner.dockerfile-sha256" }}' "$PYTHON_IMAGE" 2>/dev/null || true)
  [ "$current" = "$sha" ] && return 0
  say "building $PYTHON_IMAGE"
  # The legacy builder: this client has no buildx, and the daemon caches its layers just the same.
  DOCKER_BUILDKIT=0 quietly docker build --label "runner.dockerfile-sha256=$sha" \
    -t "$PYTHON_IMAGE" -f "$DOCKERFILE" "$(dirname "$DOCKERFILE")"
}

# One run at a time: two test runs must not both start dockerd or build the images.
exec 9>"$LOCK"
flock 9

docker info >/dev/null 2>&1 || start_engine
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || build_base_image
build_python_image
say "ready ($BASE_IMAGE, $PYTHON_IMAGE)"
