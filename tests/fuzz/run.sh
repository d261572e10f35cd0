#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of shardgate's decoders:
#   frontend_decoder  client messages: shardgate's framing + Parse/Bind/Describe/Close/Query
#                     decoding, and pgwire's startup/SSL/cancel/password decoding
#   copy_framer       COPY FROM STDIN row framer (text, CSV, binary), chunking invariance
#   router            SQL analysis against a shard map, literal extraction, COPY grammar, memo
# Usage:
#   tests/fuzz/run.sh --short [SECS]        each target SECS seconds (default 60): CI (.ci/run)
#   tests/fuzz/run.sh --runs N [TARGET...]  each target N inputs (the long run)
#   tests/fuzz/run.sh --time SECS [TARGET...]
# Needs only stable Rust: cargo-fuzz's nightly flags are enabled with RUSTC_BOOTSTRAP=1.
# Installs cargo-fuzz when missing. The corpus (tests/fuzz/corpus/, not committed) is
# seeded by tests/fuzz/seeds.py from the SQL of tests/ and real client messages.
# A crash leaves its input in tests/fuzz/artifacts/<target>/ and fails the script.
# Per-target stats: tests/fuzz/logs/<target>.log; one summary line per target on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

mode="--short"; amount=60
if [ $# -gt 0 ]; then mode="$1"; shift; fi
case "$mode" in
    --short) if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then amount="$1"; shift; fi; limit="-max_total_time=$amount" ;;
    --time) amount="$1"; shift; limit="-max_total_time=$amount" ;;
    --runs) amount="$1"; shift; limit="-runs=$amount" ;;
    *) echo "usage: $0 --short [SECS] | --time SECS [TARGET...] | --runs N [TARGET...]" >&2; exit 2 ;;
esac
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frontend_decoder copy_framer router)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# -s none: no sanitizer (shardgate is safe Rust; ASan would cost ~2x the executions);
# -a: debug assertions and overflow checks on, so arithmetic overflow is a crash.
flags=(--fuzz-dir tests/fuzz -s none -a)
echo "fuzz: building ${targets[*]}" >&2
for t in "${targets[@]}"; do cargo fuzz build "${flags[@]}" "$t" >&2; done

python3 "$here/seeds.py" "$here/corpus" >&2
mkdir -p "$here/logs"
status=0
for t in "${targets[@]}"; do
    mkdir -p "$here/artifacts/$t"
    log="$here/logs/$t.log"
    echo "fuzz: $t ($mode $amount)" >&2
    start=$(date +%s)
    if cargo fuzz run "${flags[@]}" "$t" "$here/corpus/$t" -- "$limit" -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$here/artifacts/$t/" >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log and tests/fuzz/artifacts/$t/)"
        status=1
    fi
    secs=$(( $(date +%s) - start ))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1 || true)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1 || true)
    corpus=$(find "$here/corpus/$t" -type f | wc -l)
    echo "fuzz: $t: $result; ${runs:-?} executions in ${secs} s; ${cov:-cov ?}; corpus $corpus inputs"
    if [ "$result" != ok ]; then grep -m 5 -E -A1 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || true; fi
done
exit $status
