#!/usr/bin/env bash
# Puts the Lua 5.4 sources (from the lua-src crate on crates.io) in DEST with a Makefile
# that honours CC and CFLAGS, as a real C project for compare-builds.sh.
# usage: bench/fetch-lua.sh DEST
set -euo pipefail
dest="${1:?usage: bench/fetch-lua.sh DEST}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src"
printf '[package]\nname = "fetch-lua"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nlua-src = "=547.1.0"\n' > "$tmp/Cargo.toml"
echo 'fn main() {}' > "$tmp/src/main.rs"
cargo fetch -q --manifest-path "$tmp/Cargo.toml"
lua="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/lua-src-547.1.0/lua-5.4.7 | head -1)"
mkdir -p "$dest"
cp "$lua"/*.c "$lua"/*.h "$dest/"
cat > "$dest/Makefile" <<'MK'
CC ?= cc
CFLAGS ?= -O2 -g -Wall -DLUA_USE_LINUX
SRCS = $(wildcard *.c)
OBJS = $(SRCS:.c=.o)

liblua.a: $(OBJS)
	ar rcs $@ $(OBJS)

%.o: %.c
	$(CC) $(CFLAGS) -MMD -c $< -o $@

clean:
	rm -f $(OBJS) $(OBJS:.o=.d) liblua.a

-include $(OBJS:.o=.d)
.PHONY: clean
MK
echo "Lua 5.4.7: $(ls "$dest"/*.c | wc -l) C files in $dest"
