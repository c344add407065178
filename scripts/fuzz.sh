#!/usr/bin/env bash
# Fuzzes the event contract's decoders with cargo-fuzz (libFuzzer) for a bounded time.
#
#   ./scripts/fuzz.sh                       every target, 60 s each
#   ./scripts/fuzz.sh 240                   every target, 240 s each
#   ./scripts/fuzz.sh 30 zone_geometry      one target
#
# Targets (fuzz/fuzz_targets/, checks in fuzz/oracle.rs):
#   decode_message   contract::decode_message on arbitrary bytes
#   zone_geometry    contract::decode_geometry on arbitrary JSON
#
# Installs cargo-fuzz if it is missing. The toolchain is stable, so the sanitizer flags
# are allowed with RUSTC_BOOTSTRAP=1. The corpus grows in fuzz/corpus/<target>/ (not
# kept in git), seeded by fuzz/seeds/<target>/ (the examples of docs/events.md) and
# fuzz/regressions/<target>/. A crash is copied into
# fuzz/regressions/<target>/, where `dataflow/tests/fuzz_regressions.rs` replays it on
# every test run, and the script exits 1. Each target's last line says how many inputs
# it ran and how fast.
#
# Environment:
#   FUZZ_SANITIZER   address (default) or none (faster, catches panics only)
#   FUZZ_MAX_LEN     the longest input tried, bytes (default 65536: giant polygons)
#   FUZZ_JOBS        parallel fuzzing processes per target (default 1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

all_targets=(decode_message zone_geometry)
seconds="${1:-60}"
if (($#)); then shift; fi
targets=("$@")
if ((${#targets[@]} == 0)); then targets=("${all_targets[@]}"); fi
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2; }
for target in "${targets[@]}"; do
    [[ " ${all_targets[*]} " == *" $target "* ]] ||
        { echo "unknown target: $target (known: ${all_targets[*]})" >&2; exit 2; }
done

if ! command -v cargo-fuzz >/dev/null; then
    echo "==> installing cargo-fuzz (cargo install --locked)" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
max_len="${FUZZ_MAX_LEN:-65536}"
jobs="${FUZZ_JOBS:-1}"

echo "==> building the fuzz targets (sanitizer: $sanitizer)" >&2
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer" "${targets[@]:0:1}" >&2
for target in "${targets[@]:1}"; do
    cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" >&2
done

failed=()
summary=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    seeds="fuzz/seeds/$target"
    regressions="fuzz/regressions/$target"
    artifacts="fuzz/artifacts/$target"
    mkdir -p "$corpus" "$regressions" "$artifacts"
    log="fuzz/artifacts/$target.log"
    echo "==> fuzzing $target for ${seconds}s" >&2
    parallel=()
    # libFuzzer sends a job's output to fuzz-N.log instead of stderr when -jobs is given.
    if ((jobs > 1)); then parallel=(-jobs="$jobs" -workers="$jobs"); fi
    status=0
    cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "$corpus" "$seeds" "$regressions" -- \
        -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" ${parallel[@]+"${parallel[@]}"} 2>&1 | tee "$log" >&2 ||
        status=$?
    # Keep every crash as a regression test input.
    found=0
    for artifact in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*; do
        [[ -e "$artifact" && ! -e "$regressions/${artifact##*/}" ]] || continue
        cp "$artifact" "$regressions/"
        echo "    kept $artifact in $regressions/" >&2
        found=$((found + 1))
    done
    if ((jobs > 1)); then cat fuzz-*.log >>"$log" && rm -f fuzz-*.log; fi
    runs=$(awk '/stat::number_of_executed_units/ { total += $2 } END { print total + 0 }' "$log")
    per_sec=$(awk '/stat::average_exec_per_sec/ { total += $2 } END { print total + 0 }' "$log")
    summary+=("$target: $runs runs in ${seconds}s, $per_sec runs/s, $found finding(s)")
    if ((status != 0 || found != 0)); then failed+=("$target"); fi
done

echo "==> summary" >&2
printf '    %s\n' "${summary[@]}" >&2
if ((${#failed[@]})); then
    echo "error: findings in: ${failed[*]} (inputs kept under fuzz/regressions/; commit them)" >&2
    exit 1
fi
