#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 8) on a copy of its committed
# corpus, so CI never grows the corpus; fails on any crash, leak, timeout or OOM.
# Usage: fuzz/smoke.sh [SECONDS]
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
  # The log goes to a file and the exit status is taken directly: in a pipeline under
  # pipefail, a `|| true` would hide the fuzzer's failure.
  if ! cargo +nightly fuzz run "$target" "$work/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
      -dict="$PWD/dict" -print_final_stats=1 \
      >"$work/$target.log" 2>&1; then
    grep -E "panicked|==[0-9]+==|SUMMARY|Test unit written|ERROR" "$work/$target.log" | head -20 || true
    echo "fuzz: $target failed; artifacts in fuzz/artifacts/$target"
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^Done [0-9]+ runs" "$work/$target.log" || true
done
echo "fuzz: all targets ran clean"
