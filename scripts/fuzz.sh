#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: FUZZ_SECONDS each (default 30).
#
# Coverage-guided libFuzzer on the stable toolchain, without a sanitizer (safe Rust needs none
# to find panics, and ASan needs nightly). A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/: replay it with `cargo fuzz run --sanitizer none <target> FILE` and
# turn it into a unit test beside the code. FUZZ_BUILD=dev (default, a faster build) or release
# (more executions a second, for long runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECONDS:-30}
case "${FUZZ_BUILD:-dev}" in
dev) mode=--dev ;;
release) mode=--release ;;
*)
  echo "FUZZ_BUILD must be dev or release" >&2
  exit 2
  ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

# Every [[bin]] of the fuzz crate is a target.
mapfile -t targets < <(cargo fuzz list)
[ ${#targets[@]} -gt 0 ] || {
  echo "no fuzz targets found in fuzz/" >&2
  exit 1
}
cargo fuzz build --sanitizer none "$mode"
for target in "${targets[@]}"; do
  echo "== fuzz $target (${SECS} s)"
  # -max_len bounds one input (a large answer is many small reads to these parsers anyway);
  # -timeout catches an input that makes a parser loop.
  log=fuzz/artifacts/$target.log
  mkdir -p fuzz/artifacts
  if ! cargo fuzz run --sanitizer none "$mode" "$target" -- \
    -max_total_time="$SECS" -max_len=65536 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $target failed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' "$log" | tr '\n' ' '
  echo
done
echo "fuzzing: ${#targets[@]} targets, ${SECS} s each, no crash"
