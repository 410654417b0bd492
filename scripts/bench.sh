#!/usr/bin/env bash
# The load benchmark (issue #6), one command:
#
#   scripts/bench.sh [--quick] [--no-ceph] [--no-postfix] [--no-docs] [-- <sluice-load bench options>]
#
# Builds release binaries of sluice and sluice-load, starts the mock ISPs and the test DNS,
# and measures in one run: the tools' own ceiling, sluice on the local spool (SMTP in, HTTP
# in with 1 and 10 messages per request, HTTP at half the maximum rate for the 202 latency),
# the same SMTP row with DKIM signing (RSA-2048, and RSA-2048 + Ed25519) next to
# `openssl speed rsa2048`, sluice on a Ceph spool as one process and as 2 edges + 2 MTAs (a
# throwaway cluster from scripts/ceph-cluster.sh; skipped with --quick unless --ceph, with
# --no-ceph, or when Ceph is not installed), and Postfix relaying the same SMTP workload to
# the same mock ISPs. The results replace the "Latest run" section of
# docs/benchmarks.md (unless --no-docs) and are printed; the JSON goes to
# $SLUICE_BENCH_DIR/bench.json when that is set.
#
# --quick: 5,000 messages per row instead of 50,000 and fewer rows (a few minutes).
# Only some rows: `-- --only local,dkim` (groups: tools, local, dkim, rados, postfix).
# Everything else: `sluice-load bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
ORIG_ARGS="$*"

log() { echo "== $*" >&2; }

QUICK=0; CEPH=auto; POSTFIX=1; DOCS=1; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --no-ceph) CEPH=no; shift ;;
    --ceph) CEPH=yes; shift ;;
    --no-postfix) POSTFIX=0; shift ;;
    --no-docs) DOCS=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "bench.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done
[ $QUICK = 1 ] && [ $CEPH = auto ] && CEPH=no

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

[ $POSTFIX = 1 ] && apt_install postfix
if [ $CEPH = auto ]; then
  if command -v ceph-mon >/dev/null && [ -e /usr/include/rados/librados.h ]; then CEPH=yes; else CEPH=no; fi
fi

FEATURES=()
[ $CEPH = yes ] && FEATURES=(--features sluice/rados)
log "building release binaries${FEATURES:+ (with the RADOS spool)}"
cargo build --release -q -p sluice -p sluice-load "${FEATURES[@]}"
TARGET=${CARGO_TARGET_DIR:-target}

WORK=${SLUICE_BENCH_DIR:-$(mktemp -d /tmp/sluice-bench.XXXXXX)}
mkdir -p "$WORK/bin"
# Copies: a shared target directory may be rebuilt by someone else during the run.
cp "$TARGET/release/sluice" "$TARGET/release/sluice-load" "$WORK/bin/"

CEPH_DIR=
cleanup() {
  if [ -n "$CEPH_DIR" ]; then scripts/ceph-cluster.sh destroy --dir "$CEPH_DIR" >/dev/null 2>&1 || true; fi
  if [ -z "${SLUICE_BENCH_DIR:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

ARGS=(--sluice "$WORK/bin/sluice" --work-dir "$WORK/run" --json "$WORK/bench.json")
ARGS+=(--command-line "scripts/bench.sh${ORIG_ARGS:+ $ORIG_ARGS}")
ARGS+=(--revision "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
[ $QUICK = 1 ] && ARGS+=(--quick)
[ $POSTFIX = 0 ] && ARGS+=(--no-postfix)
[ $DOCS = 1 ] && ARGS+=(--markdown docs/benchmarks.md)
if [ $CEPH = yes ]; then
  CEPH_DIR=$(mktemp -d /tmp/sluice-bench-ceph.XXXXXX)
  log "starting a Ceph cluster in $CEPH_DIR"
  CONF=$(scripts/ceph-cluster.sh start --dir "$CEPH_DIR" --osds 3)
  ARGS+=(--ceph-conf "$CONF")
fi

log "running the benchmark (work directory $WORK)"
"$WORK/bin/sluice-load" bench "${ARGS[@]}" "${EXTRA[@]}"
