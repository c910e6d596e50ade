#!/usr/bin/env bash
# Makes the fixture of `dcache-bench sim --compress`: real preprocessed C and a real object,
# generated at bench time (not committed). DEST gets lua.i (every Lua 5.4 source file
# preprocessed with gcc -E, concatenated: about 2.5 MiB of what a client really uploads)
# and lua.o (lvm.c compiled with -O2 -g: what a server really sends back).
# usage: bench/wire-fixture.sh DEST
set -euo pipefail
dest="${1:?usage: bench/wire-fixture.sh DEST}"
here="$(cd "$(dirname "$0")" && pwd)"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
bash "$here/fetch-lua.sh" "$src" >/dev/null
mkdir -p "$dest"
: > "$dest/lua.i"
for f in "$src"/*.c; do
  gcc -E -DLUA_USE_LINUX -O2 "$f" >> "$dest/lua.i"
done
gcc -O2 -g -DLUA_USE_LINUX -c "$src/lvm.c" -o "$dest/lua.o"
ls -l "$dest/lua.i" "$dest/lua.o"
