#!/usr/bin/env bash
# Spool throughput on the local backend and on RADOS, next to `rados bench` on the same
# cluster in the same run. Starts its own Ceph cluster unless SLUICE_CEPH_CONF is set.
#   scripts/bench-spool.sh [--messages N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=20000; SECONDS_BENCH=15
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) MESSAGES=$2; shift 2 ;;
    --seconds) SECONDS_BENCH=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
POOL=${SLUICE_CEPH_POOL:-sluice}
if [ -z "${SLUICE_CEPH_CONF:-}" ]; then
  CEPH_DIR=$(mktemp -d /tmp/sluice-bench-ceph.XXXXXX)
  trap 'scripts/ceph-cluster.sh destroy --dir "$CEPH_DIR" >/dev/null 2>&1 || true' EXIT
  SLUICE_CEPH_CONF=$(scripts/ceph-cluster.sh start --dir "$CEPH_DIR")
fi
cargo build --release -q -p sluice-spool --features rados --example spool_bench
BENCH=target/release/examples/spool_bench

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "ceph: $(ceph -c "$SLUICE_CEPH_CONF" version | cut -d' ' -f3), $(ceph -c "$SLUICE_CEPH_CONF" osd stat | cut -d, -f1), pool $POOL size $(ceph -c "$SLUICE_CEPH_CONF" osd pool get "$POOL" size | cut -d' ' -f2)"
rados_iops() { grep -E '^Average IOPS' | awk '{print $3}'; }
W=$(rados -c "$SLUICE_CEPH_CONF" -p "$POOL" bench "$SECONDS_BENCH" write -b 4096 -t 16 --no-cleanup 2>/dev/null | rados_iops)
R=$(rados -c "$SLUICE_CEPH_CONF" -p "$POOL" bench "$SECONDS_BENCH" seq -t 16 2>/dev/null | rados_iops)
rados -c "$SLUICE_CEPH_CONF" -p "$POOL" cleanup >/dev/null 2>&1 || true
LOCAL=$($BENCH local --messages "$MESSAGES" --dir "$(mktemp -d)/spool")
RADOS=$($BENCH rados --conf "$SLUICE_CEPH_CONF" --pool "$POOL" --messages "$MESSAGES")
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
printf '%-44s %10s\n' "measurement" "ops/s"
printf '%-44s %10s\n' "rados bench write 4 KiB, 16 in flight" "$W"
printf '%-44s %10s\n' "rados bench seq read 4 KiB, 16 in flight" "$R"
printf '%-44s %10s\n' "RADOS spool enqueue (4 KiB body, 64 callers)" "$(field "$RADOS" enqueue_per_s)"
printf '%-44s %10s\n' "RADOS spool lease + complete (4 workers)" "$(field "$RADOS" lease_complete_per_s)"
printf '%-44s %10s\n' "local spool enqueue (fsync'd group commit)" "$(field "$LOCAL" enqueue_per_s)"
printf '%-44s %10s\n' "local spool lease + complete" "$(field "$LOCAL" lease_complete_per_s)"
python3 - "$W" "$(field "$RADOS" enqueue_per_s)" "$(field "$RADOS" lease_complete_per_s)" <<'PY'
import sys
w, e, l = map(float, sys.argv[1:])
print(f"ratio enqueue / rados write: {e / w:.2f}; lease+complete / rados write: {l / w:.2f}")
PY
