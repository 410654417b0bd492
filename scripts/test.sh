#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need (apt and
# pip packages), starts a Ceph cluster on loopback for the RADOS tests, runs every test, and
# stops the cluster again. `.ci/run` calls this. Extra arguments go to `cargo test`.
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

# Rust (Debian 12's own rustc is far older than the 1.95 the workspace needs) and a C
# toolchain for aws-lc-sys.
if ! command -v cargo >/dev/null; then
  apt_install ca-certificates curl build-essential pkg-config
  log "installing Rust 1.95 with rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal --default-toolchain 1.95
  # shellcheck source=/dev/null
  . "${CARGO_HOME:-$HOME/.cargo}/env"
fi

# Real peers: Postfix (smtp-source, smtp-sink, and the relay we benchmark against), swaks;
# Ceph (a real cluster for the RADOS spool) and librados-dev to build against it.
apt_install postfix swaks ceph-mon ceph-osd ceph-mgr ceph-common librados-dev

# Python for the interop tests: the official SendGrid client, an independent DKIM verifier,
# a DNS library for it, and PyNaCl, without which dkimpy cannot verify Ed25519 signatures.
# The tests run `python3` from PATH. When that python3 lacks the packages they go into a
# venv of our own, whose bin/ then comes first on PATH: Debian's python3 refuses
# `pip install` into the system (PEP 668, "externally-managed-environment").
PY_PACKAGES=(sendgrid dkimpy dnspython pynacl)
PY_CHECK='import sendgrid, dkim, dns, nacl'
if ! python3 -c "$PY_CHECK" 2>/dev/null; then
  # Debian splits venv (ensurepip) and pip out of python3.
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3 python3-venv python3-pip
  VENV=${SLUICE_TEST_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/sluice-test-venv}
  if ! "$VENV/bin/python3" -c "$PY_CHECK" 2>/dev/null; then
    log "installing ${PY_PACKAGES[*]} into a Python venv at $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python3" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
    "$VENV/bin/python3" -c "$PY_CHECK"
  fi
  export PATH="$VENV/bin:$PATH"
fi
log "python3 for the tests: $(command -v python3) ($(python3 --version 2>&1))"

CEPH_DIR=$(mktemp -d /tmp/sluice-ceph.XXXXXX)
cleanup() { scripts/ceph-cluster.sh destroy --dir "$CEPH_DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
log "starting a Ceph cluster in $CEPH_DIR"
SLUICE_CEPH_CONF=$(scripts/ceph-cluster.sh start --dir "$CEPH_DIR" --osds 3)
export SLUICE_CEPH_CONF SLUICE_CEPH_DIR=$CEPH_DIR SLUICE_CEPH_POOL=sluice

log "cargo test"
status=0
cargo test --workspace --features sluice/rados,sluice-spool/rados --no-fail-fast "$@" || status=$?

# What the tests measured (fault-test counts and timings, docs/operations.md), also when some
# failed: the reports written during this run.
reports=${CARGO_TARGET_DIR:-target}/test-reports
if [ -d "$reports" ]; then
  find "$reports" -name '*.md' -mmin -$((SECONDS / 60 + 1)) | sort | while read -r report; do
    log "report $report"
    cat "$report" >&2
  done
fi
exit $status
