#!/usr/bin/env bash
# Interleaved synclat A/B of two tidemark builds against qemu-nbd: for each
# round, each build in turn runs
#   JOBS=synclat CONFIGS="qemu sync" ROUNDS=1 RUNTIME=$RUNTIME bench/run-replication.sh
# and one line is printed per run: p50 write completion + p50 flush (µs) for
# qemu-nbd and for tidemark in sync mode, and their ratio.
#
#   bench/ab-synclat.sh /path/to/old/tidemark /path/to/new/tidemark
#   ROUNDS=8 RUNTIME=10 bench/ab-synclat.sh OLD NEW
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: bench/ab-synclat.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
ROUNDS=${ROUNDS:-4}
RUNTIME=${RUNTIME:-10}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JSON=$REPO/bench/out/replication/json
declare -A BINS=([old]=$1 [new]=$2)
for b in old new; do
    [[ -x ${BINS[$b]} ]] || { echo "ab-synclat.sh: ${BINS[$b]} is not an executable" >&2; exit 2; }
done
p50() {
    python3 - "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
w = j["write"]["clat_ns"]["percentile"]["50.000000"] / 1000
s = j["sync"]["lat_ns"]["percentile"]["50.000000"] / 1000
print(f"{w + s:.0f} {w:.0f} {s:.0f}")
PY
}
for ((i = 1; i <= ROUNDS; i++)); do
    for b in old new; do
        TIDEMARK_BIN=${BINS[$b]} JOBS=synclat CONFIGS="qemu sync" ROUNDS=1 RUNTIME=$RUNTIME \
            "$REPO/bench/run-replication.sh" >/dev/null
        read -r qt qw qs < <(p50 "$JSON/synclat-qemu-r1.json")
        read -r st sw ss < <(p50 "$JSON/synclat-sync-r1.json")
        echo "round $i $b: qemu-nbd $qt ($qw+$qs) µs, sync DR $st ($sw+$ss) µs, ratio $(python3 -c "print(f'{$st/$qt:.2f}')")x"
    done
done
