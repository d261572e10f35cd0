#!/bin/sh
# Router cost per statement on a cache hit (target < 5 us) and on a miss.
# Prints one line per statement; the test fails in release if a hit takes >= 5 us.
set -e
cd "$(dirname "$0")/.."
exec cargo test --release --test router_bench -- --ignored --nocapture
