#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 8) on a copy of its committed
# corpus, so CI never grows the corpus; fails on any crash. Usage: fuzz/smoke.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-8}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for target in $(cargo +nightly fuzz list); do
  mkdir -p "$work/$target"
  if [ -d "corpus/$target" ]; then cp -r "corpus/$target/." "$work/$target/"; fi
  echo "fuzz: $target for ${seconds}s"
  cargo +nightly fuzz run "$target" "$work/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|==[0-9]+==|SUMMARY|Done|INFO: seed corpus)" || true
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target failed (exit $status); artifacts in fuzz/artifacts/$target"
    exit 1
  fi
done
echo "fuzz: all targets ran clean"
