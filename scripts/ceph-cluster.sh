#!/usr/bin/env bash
# A real Ceph cluster on loopback for sluice's tests: 1 mon, 1 mgr, N OSDs, no systemd, no
# containers, everything under one directory. Several clusters can run side by side.
#
#   scripts/ceph-cluster.sh install                  install Debian's ceph packages if missing
#   scripts/ceph-cluster.sh start [options]          start (or restart) a cluster; prints its conf path
#       --dir DIR            cluster directory (default: $SLUICE_CEPH_DIR or ./.ceph)
#       --osds N             number of OSDs (default 3; the pool gets size min(N,3), min_size 2)
#       --objectstore S      memstore (default; fast, RAM) or bluestore (sparse files; survives SIGKILL)
#       --osd-size BYTES     memstore capacity / bluestore file size per OSD (default 2 GiB)
#       --pool NAME          pool to create (default sluice)
#   scripts/ceph-cluster.sh stop [--dir DIR]         stop every daemon (SIGTERM, then SIGKILL after 30 s)
#   scripts/ceph-cluster.sh destroy [--dir DIR]      stop and remove the directory
#   scripts/ceph-cluster.sh status [--dir DIR]       ceph -s
#   scripts/ceph-cluster.sh conf [--dir DIR]         print the conf path
#   scripts/ceph-cluster.sh wait [--dir DIR]         wait until HEALTH_OK with every PG active+clean
#   scripts/ceph-cluster.sh kill-osd ID [--signal SIG] [--dir DIR]   kill one OSD (default SIGKILL)
#   scripts/ceph-cluster.sh start-osd ID [--dir DIR] restart one OSD
#
# Settings and pitfalls are explained in docs/operations.md ("A Ceph cluster for tests").
set -euo pipefail
unset CEPH_CONF CEPH_ARGS

cmd=${1:-}; shift || true
DIR=${SLUICE_CEPH_DIR:-./.ceph}
OSDS=3; STORE=memstore; OSD_SIZE=$((2 * 1024 * 1024 * 1024)); POOL=sluice; SIG=KILL; ID=
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --osds) OSDS=$2; shift 2 ;;
    --objectstore) STORE=$2; shift 2 ;;
    --osd-size) OSD_SIZE=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --signal) SIG=$2; shift 2 ;;
    [0-9]*) ID=$1; shift ;;
    *) echo "ceph-cluster.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
log() { echo "ceph-cluster: $*" >&2; }

install() {
  if command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v ceph-mgr >/dev/null \
     && [ -e /usr/include/rados/librados.h ]; then
    return 0
  fi
  log "installing Debian's ceph packages (about 20 s)"
  local cache; cache=$(mktemp -d)
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -o Dir::Cache::Archives="$cache" update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -o Dir::Cache::Archives="$cache" \
    install -y -q ceph-mon ceph-osd ceph-mgr ceph-common librados-dev >/dev/null
  rm -rf "$cache"
}

# A daemon we started is alive if its recorded pid still runs with our conf on its command line.
alive() {
  local pidf=$DIR/run/$1.pid
  [ -f "$pidf" ] || return 1
  local pid; pid=$(cat "$pidf")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-c $CONF"
}

spawn() { # name, command...
  local name=$1; shift
  setsid "$@" -c "$CONF" -f >>"$DIR/log/$name.stdout" 2>&1 &
  echo $! >"$DIR/run/$name.pid"
}

free_port() {
  local p=40000
  while (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null || (echo >/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null \
        || grep -qs "127.0.0.1:$p\]" /proc/self/net/tcp 2>/dev/null; do
    p=$((p + 2))
  done
  echo $p
}

write_conf() {
  local port=$1 fsid=$2 size=$3 min_size=$4
  cat >"$CONF" <<CONF
# Written by scripts/ceph-cluster.sh: a test cluster on loopback, every daemon on one host.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
mon initial members = a
# cephx as in production; the client.admin keyring sits next to this file.
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
# Replicated pools of size min(OSDs, 3), min_size 2: one OSD may die without stopping writes.
osd pool default size = $size
osd pool default min size = $min_size
# No PG autoscaler churn while tests run.
osd pool default pg autoscale mode = off
# One host: place replicas on different OSDs, not different hosts (else size 3 never fits).
osd crush chooseleaf type = 0
# Small OSDs would otherwise get a CRUSH weight near 0 and no data.
osd crush initial weight = 1
# All OSDs share one host, so count failure reports per OSD, not per host, and one is enough.
mon osd reporter subtree level = osd
mon osd min down reporters = 1
# In [global] because the mon reads the grace too: a hung OSD is marked down in about 7 s
# instead of about 22 s, and writes stall only that long.
osd heartbeat grace = 6
osd heartbeat interval = 2
# Allow --osds 1 (size 1) and pool removal by the tests, without health warnings for them.
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The mon warns about the free space of the whole host disk (a percentage), not of its own
# small store: without this, a big disk at 70 % used warns (MON_DISK_LOW). Readiness ignores
# these disk checks anyway (see ready below).
mon data avail warn = 2
# Below the critical level (5 % free by default) the mon refuses to start at all; the test
# cluster's stores are tiny (memstore OSDs live in RAM), so only a truly full disk matters.
mon data avail crit = 1
# Otherwise HEALTH_WARN AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED, and ready never comes.
auth allow insecure global id reclaim = false
# PG stats every second: HEALTH_OK (our readiness test) in about 8 s instead of about 14 s.
mgr stats period = 1
# Loopback only, IPv4.
ms bind ipv6 = false
public addr = 127.0.0.1
run dir = $DIR/run

# Admin sockets and log files only in the daemon sections: in [global] every client process
# (the tests, the rados CLI) would fight over client.admin.asok.
[mon]
mon data = $DIR/mon.\$id
keyring = $DIR/mon.keyring
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log

[mgr]
mgr data = $DIR/mgr.\$id
keyring = $DIR/mgr.\$id/keyring
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
# memstore (RAM, fast; loses its data on SIGKILL) or bluestore (a sparse file; survives it).
osd objectstore = $STORE
memstore device bytes = $OSD_SIZE
bluestore block path = $DIR/osd.\$id/block
bluestore block size = $OSD_SIZE
# A small fixed bluestore cache, so several test clusters fit in RAM.
bluestore cache autotune = false
bluestore cache size = 67108864
# Pacific's fast shutdown exits without unmounting, and memstore saves its data only at
# unmount: with it, stop + start came back with every PG unknown and all data gone.
osd fast shutdown = false
# memstore OSDs count as hdd, whose 5 s deletion sleep made removing a pool take minutes;
# recovery after an OSD restart should not wait either.
osd delete sleep hdd = 0
osd delete sleep ssd = 0
osd delete sleep hybrid = 0
osd recovery sleep hdd = 0
osd recovery sleep ssd = 0
osd recovery sleep hybrid = 0
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
CONF
}

ready() { # all PGs active+clean, all OSDs up, HEALTH_OK but for the host disk's free space
  local s; s=$(ceph -c "$CONF" status --format json 2>/dev/null) || return 1
  python3 - "$s" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
health = s["health"]["status"]
# MON_DISK_LOW/CRIT describe the host's disk (shared, often nearly full on CI machines), not
# the cluster: memstore OSDs live in RAM and the mon store is tiny.
if set(s["health"].get("checks", {})) <= {"MON_DISK_LOW", "MON_DISK_CRIT"}:
    health = "HEALTH_OK"
pgmap = s.get("pgmap", {})
total = pgmap.get("num_pgs", 0)
clean = sum(x["count"] for x in pgmap.get("pgs_by_state", []) if x["state_name"] == "active+clean")
pools = pgmap.get("num_pools", 0)
osdmap = s.get("osdmap", {})
osdmap = osdmap.get("osdmap", osdmap)
all_up = osdmap.get("num_osds", 0) > 0 and osdmap.get("num_up_osds") == osdmap.get("num_osds")
sys.exit(0 if health == "HEALTH_OK" and all_up and total > 0 and clean == total and pools > 0 else 1)
PY
}

wait_ready() {
  local deadline=$((SECONDS + ${SLUICE_CEPH_TIMEOUT:-180}))
  # Status alone can be stale right after a restart (the mon remembers OSDs as up), so a
  # replicated probe write must succeed too.
  until ready && timeout 10 rados -c "$CONF" -p "$POOL" put sluice-ready-probe /dev/null 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      log "cluster not ready after ${SLUICE_CEPH_TIMEOUT:-180} s:"; ceph -c "$CONF" status >&2 || true; exit 1
    fi
    sleep 0.5
  done
}

start_osd() {
  local i=$1
  alive "osd.$i" && return 0
  spawn "osd.$i" ceph-osd -i "$i"
}

start() {
  install
  mkdir -p "$DIR/run" "$DIR/log"
  if [ -f "$CONF" ] && [ -d "$DIR/mon.a" ]; then
    log "restarting the existing cluster in $DIR"
    alive mon.a || spawn mon.a ceph-mon -i a
    alive mgr.x || spawn mgr.x ceph-mgr -i x
    for d in "$DIR"/osd.*; do [ -d "$d" ] && start_osd "${d##*.}"; done
    wait_ready
    echo "$CONF"; return 0
  fi
  local size=$((OSDS < 3 ? OSDS : 3)) min_size=2
  [ "$size" -lt 2 ] && min_size=1
  local port; port=$(free_port)
  local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$port" "$fsid" "$size" "$min_size"
  ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" >/dev/null 2>&1
  spawn mon.a ceph-mon -i a
  mkdir -p "$DIR/mgr.x"
  ceph -c "$CONF" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$DIR/mgr.x/keyring" >/dev/null
  spawn mgr.x ceph-mgr -i x
  for i in $(seq 0 $((OSDS - 1))); do
    local uuid key
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    mkdir -p "$DIR/osd.$i"
    echo "{\"cephx_secret\": \"$key\"}" >"$DIR/osd.$i/new.json"
    ceph -c "$CONF" osd new "$uuid" -i "$DIR/osd.$i/new.json" >/dev/null
    ceph-authtool --create-keyring "$DIR/osd.$i/keyring" --name "osd.$i" --add-key "$key" >/dev/null
    ceph-osd -c "$CONF" -i "$i" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1
    start_osd "$i"
  done
  ceph -c "$CONF" osd pool create "$POOL" 16 16 replicated >/dev/null 2>&1
  ceph -c "$CONF" osd pool application enable "$POOL" rados >/dev/null 2>&1
  wait_ready
  log "ready: $OSDS OSDs ($STORE), pool $POOL size $size min_size $min_size"
  echo "$CONF"
}

stop() {
  [ -d "$DIR/run" ] || return 0
  local names=()
  for f in "$DIR"/run/osd.*.pid; do [ -e "$f" ] && names+=("$(basename "$f" .pid)"); done
  names+=(mgr.x mon.a)
  for n in "${names[@]}"; do
    alive "$n" && kill -TERM "$(cat "$DIR/run/$n.pid")" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 30))
  for n in "${names[@]}"; do
    while alive "$n"; do
      if [ $SECONDS -ge $deadline ]; then kill -KILL "$(cat "$DIR/run/$n.pid")" 2>/dev/null || true; break; fi
      sleep 0.2
    done
  done
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  destroy) stop; rm -rf "$DIR" ;;
  status) ceph -c "$CONF" -s ;;
  conf) echo "$CONF" ;;
  wait) wait_ready ;;
  kill-osd)
    [ -n "$ID" ] || { echo "kill-osd needs an OSD id" >&2; exit 2; }
    alive "osd.$ID" || { echo "osd.$ID is not running" >&2; exit 1; }
    kill "-$SIG" "$(cat "$DIR/run/osd.$ID.pid")" ;;
  start-osd)
    [ -n "$ID" ] || { echo "start-osd needs an OSD id" >&2; exit 2; }
    if [ "$SIG" = CONT ] || { alive "osd.$ID" && grep -q '^State:.*T' "/proc/$(cat "$DIR/run/osd.$ID.pid")/status"; }; then
      kill -CONT "$(cat "$DIR/run/osd.$ID.pid")"
    else
      start_osd "$ID"
    fi ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
