# Helpers shared by the build benchmarks (compare-builds.sh, compare-projects.sh): sourced,
# not run. Each helper is small and has one job; the scripts keep their own flow.

# Installs the Debian packages whose commands are missing: need_commands CMD:PACKAGE...
need_commands() {
  local pkgs=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || pkgs+=("${pair#*:}")
  done
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "installing ${pkgs[*]}" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
}

# Builds the release binaries of dcache and sets $bin to their directory (honouring
# CARGO_TARGET_DIR, so a bench never clobbers another build's target directory).
# DCACHE_BIN=DIR uses the binaries already built there instead.
build_dcache() {
  local repo="$1"
  if [ -n "${DCACHE_BIN:-}" ]; then
    bin="$DCACHE_BIN"
    return 0
  fi
  cargo build -q --release -p dcache-examples --manifest-path "$repo/Cargo.toml"
  bin="${CARGO_TARGET_DIR:-$repo/target}/release"
}

# A TCP port free on loopback now (a race with other processes is possible but unlikely).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# $2 - $1 in seconds, three decimals.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", b - a }'; }

# The median of the numbers on stdin, one a line (the lower middle for an even count).
median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}'; }

# $1 / $2 with two decimals, or "-" when either is missing.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f\n", a / b }'; }

# Starts `dcache-server` on tcp://127.0.0.1:PORT with its own cache directory; waits until
# it listens (on its distcc listener too when one is among the extra arguments). Sets
# $server_pid. usage: start_dcache_server PORT CACHE_DIR JOBS LOG [EXTRA_ARGS...]
start_dcache_server() {
  local port="$1" cache="$2" jobs="$3" log="$4"
  shift 4
  local ready="listening on"
  case " $* " in *" --listen-distcc "*) ready="serving distcc clients" ;; esac
  "$bin/dcache-server" --listen "tcp://127.0.0.1:$port" --cache-dir "$cache" --jobs "$jobs" "$@" 2>"$log" &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q "$ready" "$log" 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "dcache-server did not start; its log:" >&2
  cat "$log" >&2
  return 1
}

# Stops the server start_dcache_server started, and waits for it.
stop_dcache_server() {
  if [ -n "${server_pid:-}" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
