#!/usr/bin/env bash
# Compress a licence text once (the default preset, balanced: 25% of the KV kept, refit, 3-bit, entropy-coded), inspect
# and verify the file, then answer from it.
set -euo pipefail
doc=${1:-"$(dirname "$0")/docs/apache-2.0.txt"}
out=${2:-/tmp/kvc-example.kvc}
kvc compress "$doc" -o "$out"
kvc inspect "$out"
kvc verify "$out"
kvc load "$out" --prompt "Who is the licensor?"
kvc load "$out" --prompt "What does the license say about patents?" --json
