#!/usr/bin/env bash
# A warm build served from the shared Redis tier by a freshly started server with an
# empty local disk, beside the same warm build served by a fresh server from its own disk,
# in one run (issue #17's measure). One cold build through a first server fills both its
# disk and Redis; then, interleaved RUNS times: a new server on an empty cache directory
# (every hit comes from Redis, then is written back to its own tiers), and a new server on
# the first one's warm directory (every hit from disk). The client's DCACHE_DIR is the
# same warm one for both, so direct mode asks both servers for the same keys.
#
# usage: bench/shared-tier-build.sh DIR [JOBS] [RUNS]
#   DIR   the project (copied; e.g. bench/fetch-lua.sh /tmp/lua547)
#   JOBS  make -j (default: number of cores)
#   RUNS  repetitions per configuration (default 3)
set -euo pipefail
src_dir="$(cd "${1:?usage: bench/shared-tier-build.sh DIR [JOBS] [RUNS]}" && pwd)"
jobs="${2:-$(nproc)}"
runs="${3:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

. "$repo/bench/lib.sh"
need_commands redis-server:redis-server make:make
build_dcache "$repo"

work="$(mktemp -d)"
redis_pid=
cleanup() {
  stop_dcache_server
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cp -r "$src_dir" "$work/src"
proj="$work/src"

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
  --maxmemory 1gb --maxmemory-policy allkeys-lru >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
head -c 32 /dev/urandom | base64 >"$work/shared.key"
chmod 600 "$work/shared.key"
shared=(--shared "redis://127.0.0.1:$rport/0" --shared-key-file "$work/shared.key")

build() {
  make -s -C "$proj" clean >/dev/null 2>&1 || true
  local t0
  t0=$(now)
  env CC="$bin/dcache gcc" DCACHE_HOSTS="tcp://127.0.0.1:$port" DCACHE_DIR="$work/client" \
    DCACHE_FALLBACK=0 make -s -C "$proj" -j"$jobs" >/dev/null 2>>"$work/build.log"
  elapsed "$t0" "$(now)"
}

# Hits of each tier, from the server's STATS as `dcache --stats --json` prints them.
tier_hits() {
  DCACHE_HOSTS="tcp://127.0.0.1:$port" DCACHE_DIR="$work/client" "$bin/dcache" --stats --json |
    python3 -c 'import json,sys
d=json.load(sys.stdin)
def find(o, k):
    if isinstance(o, dict):
        for key, v in o.items():
            if key == k: return v
            r = find(v, k)
            if r is not None: return r
    elif isinstance(o, list):
        for v in o:
            r = find(v, k)
            if r is not None: return r
print(" ".join(f"{k}={find(d, k)}" for k in ("memory_hits","disk_hits","shared_hits","compiles")))'
}

port=$(free_port)
start_dcache_server "$port" "$work/warm-disk" "$jobs" "$work/server-cold.log" "${shared[@]}"
cold=$(build)
printf '%-34s %8.3f s\n' "cold (fills disk and Redis)" "$cold" >&2
stop_dcache_server

from_redis=()
from_disk=()
for i in $(seq "$runs"); do
  rm -rf "$work/empty"
  start_dcache_server "$port" "$work/empty" "$jobs" "$work/server-redis-$i.log" "${shared[@]}"
  from_redis+=("$(build)")
  echo "  run $i from Redis: $(tier_hits)" >&2
  stop_dcache_server
  start_dcache_server "$port" "$work/warm-disk" "$jobs" "$work/server-disk-$i.log" "${shared[@]}"
  from_disk+=("$(build)")
  echo "  run $i from disk:  $(tier_hits)" >&2
  stop_dcache_server
done
r=$(printf '%s\n' "${from_redis[@]}" | median)
d=$(printf '%s\n' "${from_disk[@]}" | median)
printf '\n%-52s %8s\n' "build (make -j$jobs, median of $runs)" seconds
printf '%-52s %8.3f\n' "cold, fresh server, fills its disk and Redis" "$cold"
printf '%-52s %8.3f\n' "warm, fresh server on an empty disk (from Redis)" "$r"
printf '%-52s %8.3f\n' "warm, fresh server on its own disk" "$d"
printf 'Redis / own disk: %s\n' "$(ratio "$r" "$d")"
