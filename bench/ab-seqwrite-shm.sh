#!/usr/bin/env bash
# Interleaved A/B of two tidemark builds on the tmpfs-DR seqwrite check: for
# each round, each build in turn runs
#   JOBS=seqwrite CONFIGS="solo asyncshm" ROUNDS=1 SIZE=$SIZE bench/run-replication.sh
# and one line is printed per run: seqwrite MiB/s of the primary alone, of
# the primary with a DR site on tmpfs, and their ratio (the issue 3 target is
# >= 0.85x). Both configurations of a line come from the same build and the
# same minute, which is what makes two builds comparable on a noisy machine.
#
#   bench/ab-seqwrite-shm.sh /path/to/old/tidemark /path/to/new/tidemark
#   ROUNDS=8 SIZE=1g bench/ab-seqwrite-shm.sh OLD NEW
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: bench/ab-seqwrite-shm.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
ROUNDS=${ROUNDS:-6}
SIZE=${SIZE:-1g}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JSON=$REPO/bench/out/replication/json
declare -A BINS=([old]=$1 [new]=$2)
for b in old new; do
    [[ -x ${BINS[$b]} ]] || { echo "ab-seqwrite-shm.sh: ${BINS[$b]} is not an executable" >&2; exit 2; }
done
mibs() {
    python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["bw_bytes"] / 2**20))' "$1"
}
declare -A SUM=([old]=0 [new]=0)
for ((i = 1; i <= ROUNDS; i++)); do
    for b in old new; do
        TIDEMARK_BIN=${BINS[$b]} JOBS=seqwrite CONFIGS="solo asyncshm" ROUNDS=1 SIZE=$SIZE \
            "$REPO/bench/run-replication.sh" >/dev/null
        solo=$(mibs "$JSON/seqwrite-solo-r1.json")
        shm=$(mibs "$JSON/seqwrite-asyncshm-r1.json")
        ratio=$(python3 -c "print(f'{$shm/$solo:.2f}')")
        SUM[$b]=$(python3 -c "print(${SUM[$b]} + $ratio)")
        echo "round $i $b: solo $solo MiB/s, tmpfs DR $shm MiB/s, ratio ${ratio}x"
    done
done
for b in old new; do
    echo "mean ratio $b: $(python3 -c "print(f'{${SUM[$b]}/$ROUNDS:.2f}')")x over $ROUNDS rounds"
done
