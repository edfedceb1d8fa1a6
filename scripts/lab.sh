#!/usr/bin/env bash
# A lab on one machine: a controller and N sites, each site behind its own emulated satellite
# link (tiandi-satlink: TAP devices between network namespaces), all real binaries over real
# QUIC. Needs root and /dev/net/tun.
#
#   scripts/lab.sh [--sites N] [--relay] [--rate-mbit R] [--delay-ms D] [--loss-pct L]
#                  [--duration S] [--check] [--dir DIR] [--prefix P]
#
#   --relay      site 1 is the province's relay; the others take transfers through it
#   --duration   stop by itself after S seconds (default: run until Ctrl-C)
#   --check      wait until every site reports, print one summary line, stop (for tests)
#
# While it runs (prefix tds by default):
#   ip netns exec tds-ctl curl -s -H "Authorization: Bearer $(cat DIR/controller/read.token)" localhost:8080/api/sites
#   ip netns exec tds-ctl tiandi-controller --config DIR/controller.toml send FILE --to all
#   tiandi-satlink --prefix tds cut s2 ; tiandi-satlink --prefix tds restore s2
#   tiandi-satlink --prefix tds set s3 loss_pct=5 rate_mbit=2       # rain fade
# Binaries come from $TIANDI_BIN (default: target/release, built if missing).
set -euo pipefail

sites=3 relay=0 rate=10 delay=300 loss=0 duration=0 check=0 prefix=tds dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sites) sites=$2; shift 2 ;;
    --relay) relay=1; shift ;;
    --rate-mbit) rate=$2; shift 2 ;;
    --delay-ms) delay=$2; shift 2 ;;
    --loss-pct) loss=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --check) check=1; shift ;;
    --dir) dir=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "lab.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "lab.sh: needs root (network namespaces, TAP devices)" >&2; exit 1; }
[ -e /dev/net/tun ] || { echo "lab.sh: /dev/net/tun is missing" >&2; exit 1; }
case "$sites" in ''|*[!0-9]*) echo "lab.sh: --sites must be a number" >&2; exit 2 ;; esac
[ "$sites" -ge 1 ] && [ "$sites" -le 200 ] || { echo "lab.sh: --sites between 1 and 200" >&2; exit 2; }

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${TIANDI_BIN:-$top/target/release}
if [ ! -x "$bin/tiandi-controller" ] || [ ! -x "$bin/tiandi-agent" ] || [ ! -x "$bin/tiandi-satlink" ]; then
  [ -z "${TIANDI_BIN:-}" ] || { echo "lab.sh: no binaries in $bin" >&2; exit 1; }
  (cd "$top" && cargo build --release --locked --bins)
fi
dir=${dir:-$(mktemp -d /tmp/tiandi-lab.XXXXXX)}
mkdir -p "$dir"
net=10.199.0
ctl_ns=$prefix-ctl
pids=()

cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  "$bin/tiandi-satlink" --prefix "$prefix" down >/dev/null 2>&1 || true
  echo "lab: stopped; logs and data in $dir" >&2
}
trap cleanup EXIT INT TERM

echo "lab: $sites site(s) behind ${rate} Mbit/s, ${delay} ms one-way, ${loss} % loss links; data in $dir" >&2
"$bin/tiandi-satlink" --prefix "$prefix" up --sites "$sites" --net "$net" --rate-mbit "$rate" \
  --delay-ms "$delay" --loss-pct "$loss" >"$dir/satlink.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  ip netns list | grep -q "^$prefix-s$sites\b" && ip -n "$prefix-s$sites" addr show eth0 2>/dev/null | grep -q "inet " && break
  sleep 0.2
done
ip -n "$prefix-s$sites" addr show eth0 >/dev/null 2>&1 || { echo "lab: the emulator did not come up:" >&2; cat "$dir/satlink.log" >&2; exit 1; }

relays=""
[ "$relay" = 1 ] && relays=$'[relays]\n"LAB" = "lab-001"'
cat >"$dir/controller.toml" <<TOML
data_dir = "$dir/controller"
quic_listen = "$net.1:4433"
api_listen = "127.0.0.1:8080"
ops_listen = "127.0.0.1:9090"
profile = "geo"
$relays
TOML
ip netns exec "$ctl_ns" "$bin/tiandi-controller" --config "$dir/controller.toml" run >"$dir/controller.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  ip netns exec "$ctl_ns" curl -sf localhost:9090/health >/dev/null 2>&1 && break
  sleep 0.2
done

for i in $(seq 1 "$sites"); do
  site=$(printf 'lab-%03d' "$i")
  sd=$dir/$site
  mkdir -p "$sd"
  token=$(ip netns exec "$ctl_ns" "$bin/tiandi-controller" --config "$dir/controller.toml" enroll --site "$site" --province LAB)
  extra=""
  if [ "$relay" = 1 ]; then
    if [ "$i" = 1 ]; then extra=$(printf '[relay]\nlisten = "%s.11:4434"' "$net")
    else extra=$(printf '[via_relay]\naddress = "%s.11:4434"\nsite = "lab-001"' "$net"); fi
  fi
  cat >"$sd/agent.toml" <<TOML
controller = "$net.1:4433"
data_dir = "$sd/data"
profile = "geo"
interval_s = 10
$extra
TOML
  ip netns exec "$prefix-s$i" "$bin/tiandi-agent" --config "$sd/agent.toml" enroll --controller "$net.1:4433" --token "$token" >>"$sd/agent.log" 2>&1
  ip netns exec "$prefix-s$i" "$bin/tiandi-agent" --config "$sd/agent.toml" run >>"$sd/agent.log" 2>&1 &
  pids+=($!)
done

connected() {
  ip netns exec "$ctl_ns" curl -s localhost:9090/metrics | awk '/^tiandi_connections /{print int($2)}'
}
if [ "$check" = 1 ]; then
  for _ in $(seq 1 300); do
    [ "$(connected || echo 0)" -ge "$sites" ] 2>/dev/null && break
    sleep 0.5
  done
  summary=$(ip netns exec "$ctl_ns" curl -s -H "Authorization: Bearer $(cat "$dir/controller/read.token")" localhost:8080/api/summary || true)
  field() { printf '%s' "$summary" | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2; }
  echo "lab sites=$sites connected=$(field connected) reports_stored=$(field stored_distinct) relay=$relay"
  exit 0
fi
echo "lab: up. API: ip netns exec $ctl_ns curl -s -H \"Authorization: Bearer \$(cat $dir/controller/read.token)\" localhost:8080/api/sites ; controller config $dir/controller.toml" >&2
if [ "$duration" -gt 0 ]; then sleep "$duration"; else wait "${pids[0]}"; fi
