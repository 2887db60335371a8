#!/usr/bin/env bash
# Times what a newcomer runs: `make demo` and `make test`, each in its own fresh clone (so each
# pays for its own installation), and checks the demo's outputs.
#
#   bash benchmarks/fresh_clone.sh            # prints a markdown table row per command
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run() {  # run NAME TARGET: clone, time `make TARGET`, print a table row
    local name="$1" target="$2"
    git clone --quiet "$repo" "$work/$name"
    local start end
    start=$(date +%s)
    (cd "$work/$name" && make "$target" > "$work/$name.log" 2>&1) || {
        tail -20 "$work/$name.log"; echo "make $target failed"; exit 1; }
    end=$(date +%s)
    echo "| make $target | $((end - start)) s | $(tail -1 "$work/$name.log" | tr -d '=' | xargs) |"
}

echo "| command | wall time (fresh clone, installation included) | last line |"
echo "| --- | --- | --- |"
run demo demo
# the demo must have written a recommendation and a snippet that builds and runs
out="$work/demo/runs/quickstart"
test -f "$out/recommended.yaml"
"$work/demo/.venv/bin/python" "$out/best_model.py" > /dev/null
run test test
