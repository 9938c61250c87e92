#!/usr/bin/env bash
# Install what the SSH test hosts (tests/sshhosts.py) run on: OpenSSH's server,
# iproute2 for network namespaces and veth pairs, and rsync. Safe to run again.
set -euo pipefail

say() { echo "ensure-sshd: $*"; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v rsync >/dev/null || missing+=(rsync)

if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    say "apt-get update"
    apt-get update -q >/dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# sshd refuses to start without its privilege-separation directory, which systemd would create.
mkdir -p /run/sshd
