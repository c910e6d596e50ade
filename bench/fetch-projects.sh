#!/usr/bin/env bash
# Fetches the real C and C++ projects compare-projects.sh builds: crates.io packages that
# vendor upstream sources, by exact version, each checked against its sha256. The .crate
# files are kept in a cache directory, so a second run needs no network.
#
# usage: bench/fetch-projects.sh [CACHE_DIR]
#   CACHE_DIR  default: $DCACHE_BENCH_CACHE, else ~/.cache/dcache-bench/crates
# Prints one line per crate: NAME VERSION PATH.
set -euo pipefail

cache="${1:-${DCACHE_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcache-bench/crates}}"
mkdir -p "$cache"

# name version sha256 (the checksum crates.io's index gives for that version)
crates=(
  "bzip2-sys 0.1.13+1.0.8 225bff33b2141874fe80d71e07d6eec4f85c5c216453dd96388240f96e1acc14"
  "lz4-sys 1.11.1+lz4-1.10.0 6bd8c0d6c6ed0cd30b3652886bb8711dc4bb01d637a68105a3d5158039b418e6"
  "zstd-sys 2.0.15+zstd.1.5.7 eb81183ddd97d0c74cedf1d50d85c8d08c1b8b68ee863bdee9e706eedba1a237"
  "leveldb-sys 2.0.9 9dd94a4d0242a437e5e41a27c782b69a624469ca1c4d1e5cb3c337f74a8031d4"
)

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

for entry in "${crates[@]}"; do
  read -r name version sum <<<"$entry"
  file="$cache/$name-$version.crate"
  if [ -f "$file" ] && [ "$(sha_of "$file")" = "$sum" ]; then
    echo "$name $version $file"
    continue
  fi
  url="https://static.crates.io/crates/$name/$name-$version.crate"
  tmp="$file.part.$$"
  if ! curl -fsSL --retry 3 -o "$tmp" "$url"; then
    rm -f "$tmp"
    echo "fetch-projects: cannot download $url" >&2
    exit 1
  fi
  got="$(sha_of "$tmp")"
  if [ "$got" != "$sum" ]; then
    rm -f "$tmp"
    echo "fetch-projects: $url has sha256 $got, expected $sum" >&2
    exit 1
  fi
  mv "$tmp" "$file"
  echo "$name $version $file"
done
