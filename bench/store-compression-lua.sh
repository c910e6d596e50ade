#!/usr/bin/env bash
# Disk space of the wrapper's local cache (DCACHE_DIR) after a cold build of Lua, then
# the time of a warm rebuild served from it, for one dcache binary.
# usage: bench/store-compression-lua.sh LUA_DIR DCACHE_BINARY LABEL
#   LUA_DIR from bench/fetch-lua.sh; DCACHE_DIRECT=0 in the environment to take the
#   preprocessor path for every file (every compile then stores its result).
set -euo pipefail
lua="${1:?usage: store-compression-lua.sh LUA_DIR DCACHE_BINARY LABEL}"
bin="${2:?dcache binary}"
label="${3:?label}"
work=$(mktemp -d /tmp/lua-run-XXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$lua" "$work/src"
export DCACHE_DIR="$work/dcache"
cd "$work/src"
make -s -j2 CC="$bin gcc" >/dev/null 2>&1
on_disk=$(du -s --block-size=1 "$DCACHE_DIR/cache" | cut -f1)
apparent=$(du -s --apparent-size --block-size=1 "$DCACHE_DIR/cache" | cut -f1)
objs=$(cat ./*.o | wc -c)
make -s clean
start=$(date +%s.%N)
make -s -j2 CC="$bin gcc" >/dev/null 2>&1
end=$(date +%s.%N)
echo "$label: objects $objs bytes; cache on disk $on_disk bytes (apparent $apparent);" \
  "warm rebuild $(echo "$end - $start" | bc) s"
"$bin" --show-stats | grep -E 'hits|misses|entries|results size' | sed "s/^/  /"
