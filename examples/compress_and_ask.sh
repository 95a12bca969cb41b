#!/usr/bin/env bash
# Compress a licence text once (keeping 30% of its KV cache), inspect and verify the file, then answer from it.
set -euo pipefail
doc=${1:-"$(dirname "$0")/docs/apache-2.0.txt"}
out=${2:-/tmp/kvc-example.kvc}
kvc compress "$doc" -o "$out" --ratio 0.3
kvc inspect "$out"
kvc verify "$out"
kvc load "$out" --prompt "Who is the licensor?"
kvc load "$out" --prompt "What does the license say about patents?" --json
