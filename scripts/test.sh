#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need (apt and
# pip packages), starts what they need, runs every test, and cleans up. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "== $*" >&2; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local cache; cache=$(mktemp -d)
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 -o Dir::Cache::Archives="$cache" update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 -o Dir::Cache::Archives="$cache" install -y -q "${missing[@]}" >/dev/null
  rm -rf "$cache"
}

# Real peers: Postfix (smtp-source, smtp-sink, and the relay we benchmark against), swaks.
apt_install postfix swaks
# The official SendGrid client, an independent DKIM verifier, a DNS library for it.
python3 -c 'import sendgrid, dkim, dns' 2>/dev/null || {
  log "installing Python packages"
  python3 -m pip install -q --disable-pip-version-check sendgrid dkimpy dnspython
}

log "cargo test"
cargo test --workspace --no-fail-fast "$@"
