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
BENCH=${CARGO_TARGET_DIR:-target}/release/examples/spool_bench

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ceph: $(ceph -c "$SLUICE_CEPH_CONF" version | cut -d' ' -f3), $(ceph -c "$SLUICE_CEPH_CONF" osd stat | cut -d, -f1), pool $POOL size $(ceph -c "$SLUICE_CEPH_CONF" osd pool get "$POOL" size | cut -d' ' -f2)"
rados_iops() { grep -E '^Average IOPS' | awk '{print $3}'; }
W=$(rados -c "$SLUICE_CEPH_CONF" -p "$POOL" bench "$SECONDS_BENCH" write -b 4096 -t 16 --no-cleanup 2>/dev/null | rados_iops)
R=$(rados -c "$SLUICE_CEPH_CONF" -p "$POOL" bench "$SECONDS_BENCH" seq -t 16 2>/dev/null | rados_iops)
rados -c "$SLUICE_CEPH_CONF" -p "$POOL" cleanup >/dev/null 2>&1 || true
LOCAL=$($BENCH local --messages "$MESSAGES" --dir "$(mktemp -d)/spool")
RADOS=$($BENCH rados --conf "$SLUICE_CEPH_CONF" --pool "$POOL" --messages "$MESSAGES")
# Each spool phase on its own (the example times enqueue, lease and complete separately),
# with its ratio to `rados bench write` of the same run.
python3 - "$W" "$R" "$RADOS" "$LOCAL" <<'PY'
import json, sys
w, r = float(sys.argv[1]), float(sys.argv[2])
rados, local = json.loads(sys.argv[3]), json.loads(sys.argv[4])
rows = [
    ("rados bench write 4 KiB, 16 in flight", w, None),
    ("rados bench seq read 4 KiB, 16 in flight", r, None),
    ("RADOS spool enqueue (4 KiB body, 64 callers)", rados["enqueue_per_s"], w),
    ("RADOS spool lease (4 workers, 256 per lease)", rados["lease_per_s"], w),
    ("RADOS spool complete (4 workers)", rados["complete_per_s"], w),
    ("local spool enqueue (fsync'd group commit)", local["enqueue_per_s"], None),
    ("local spool lease", local["lease_per_s"], None),
    ("local spool complete", local["complete_per_s"], None),
]
print(f"{rados['messages']} messages of {rados['body_bytes']} bytes")
print(f"{'measurement':<46} {'ops/s':>10}  {'x rados write':>13}")
for name, ops, base in rows:
    ratio = f"{ops / base:.2f}" if base else ""
    print(f"{name:<46} {ops:>10,.0f}  {ratio:>13}")
PY
