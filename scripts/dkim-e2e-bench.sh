#!/usr/bin/env bash
# The cost of DKIM signing in the whole pipeline: Postfix's smtp-source → sluice (durable
# local spool) → Postfix's smtp-sink, once per mode, reporting msgs/s and msgs per
# CPU-second of the sluice process. A stop-gap until the load harness measures this row.
#
#   scripts/dkim-e2e-bench.sh SLUICE_BINARY MESSAGES MODE...     (MODE: none | rsa | dual)
#   e.g. scripts/dkim-e2e-bench.sh target/release/sluice 20000 none rsa dual
set -euo pipefail
B=$(realpath "$1"); N=$2; shift 2
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

run() {
  local mode=$1 w sink smtp admin http sinkpid pid
  w=$(mktemp -d /tmp/sluice-dkim-bench.XXXXXX)
  sink=$(free_port); smtp=$(free_port); admin=$(free_port); http=$(free_port)
  smtp-sink -u nobody 127.0.0.1:"$sink" 1024 > "$w/sink.out" 2>&1 &
  sinkpid=$!
  local dkim=""
  if [ "$mode" != none ]; then
    "$B" dkim keygen --domain dkim.test --selector rsa1 --out "$w/keys" > "$w/rsa.out"
    dkim=$(printf '[dkim]\nfallback = "platform"\nplatform_domain = "dkim.test"\n'; sed -n '/^\[\[dkim.keys\]\]/,$p' "$w/rsa.out")
    if [ "$mode" = dual ]; then
      "$B" dkim keygen --domain dkim.test --selector ed1 --ed25519 --out "$w/keys" > "$w/ed.out"
      dkim=$(printf '%s\n' "$dkim"; sed -n '/^\[\[dkim.keys\]\]/,$p' "$w/ed.out")
    fi
  fi
  cat > "$w/sluice.toml" <<CONF
data_dir = "$w/data"
[admin]
listen = "127.0.0.1:$admin"
[http]
listen = "127.0.0.1:$http"
[smtp]
listen = "127.0.0.1:$smtp"
hostname = "sluice.test"
[mta]
ehlo_hostname = "sluice.test"
smart_host = ["127.0.0.1:$sink"]
[mta.tls]
mode = "disabled"
$dkim
CONF
  SLUICE_LOG=warn "$B" serve --config "$w/sluice.toml" > "$w/sluice.out" 2>&1 &
  pid=$!
  for _ in $(seq 200); do grep -q 'ready' "$w/sluice.out" && break; sleep 0.1; done
  cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
  delivered() { curl -s "127.0.0.1:$admin/metrics" | awk '/^sluice_delivered_total/{print $2}' | head -1; }
  local c0 t0 t1 t2 c1
  c0=$(cpu); t0=$(date +%s.%N)
  smtp-source -m "$N" -s 20 -l 5300 -f sender@dkim.test -t rcpt@dest.test 127.0.0.1:"$smtp"
  t1=$(date +%s.%N)
  for _ in $(seq 12000); do [ "$(delivered)" = "$N" ] && break; sleep 0.05; done
  t2=$(date +%s.%N); c1=$(cpu)
  local sigs
  sigs=$(curl -s "127.0.0.1:$admin/metrics" | awk '/^sluice_dkim_signatures_total/{s+=$2} END{print s+0}')
  python3 -c '
import sys
mode, n, t0, t1, t2, c0, c1, tck = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:9])
cpu = (c1 - c0) / tck
print(f"{mode:5} {n} msgs: injected in {t1-t0:.1f} s, all delivered after {t2-t0:.1f} s = {n/(t2-t0):.0f} msgs/s; sluice CPU {cpu:.1f} s = {n/cpu:.0f} msgs per CPU-second; {sys.argv[9]} DKIM signatures")
' "$mode" "$N" "$t0" "$t1" "$t2" "$c0" "$c1" "$(getconf CLK_TCK)" "$sigs"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  kill "$sinkpid"; wait "$sinkpid" 2>/dev/null || true
  rm -rf "$w"
}

for mode in "$@"; do run "$mode"; done
