#!/usr/bin/env bash
# Interleaved A/B of two tidemark builds writing two consistency groups at
# once: one site with vol0 in cg0 and vol1 in cg1 (1 GiB each, data on the
# repo's disk), and the same fio job run on both exports side by side. One
# line per run: the two jobs' IOPS added up (for seqwrite, 1 MiB writes, so
# also MiB/s), and how many NBD appends went to the blocking pool because
# every runtime worker but one was inside an append
# (tidemark_nbd_appends_off_worker_total; ARCHITECTURE.md "Never every
# worker inside an append"). A site with one busy group never meets that
# gate; this is where it costs, if anywhere.
#
#   bench/ab-two-groups.sh /path/to/old/tidemark /path/to/new/tidemark
#   ROUNDS=3 RUNTIME=8 JOB=randwrite bench/ab-two-groups.sh OLD NEW
#   JOB=seqwrite bench/ab-two-groups.sh OLD NEW
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: bench/ab-two-groups.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
JOB=${JOB:-randwrite}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
WORK=$REPO/bench/out/ab-two-groups
[[ -f $REPO/bench/jobs/$JOB.fio ]] || { echo "ab-two-groups.sh: no job bench/jobs/$JOB.fio" >&2; exit 2; }
ab_begin "$1" "$2"
declare -A SUM=([old]=0 [new]=0)
for ((r = 1; r <= ROUNDS; r++)); do
    for b in old new; do
        ab_site "$b" vol0:cg0 vol1:cg1
        sync
        sleep 1
        F=()
        for v in 0 1; do
            (URI=nbd://127.0.0.1:$NPORT/vol$v SIZE=1g RUNTIME=$RUNTIME fio --output-format=json "$REPO/bench/jobs/$JOB.fio" | grep -v '^fio: ' >"$WORK/fio$v.json") &
            F+=($!)
        done
        wait "${F[@]}"
        iops=$(python3 -c 'import json, sys; print(sum(round(json.load(open(f))["jobs"][0]["write"]["iops"]) for f in sys.argv[1:]))' "$WORK/fio0.json" "$WORK/fio1.json")
        off=$(curl -s "http://127.0.0.1:$APORT/metrics" | awk '/^tidemark_nbd_appends_off_worker_total/ {s += $2} END {print s + 0}')
        echo "round $r $b: $JOB IOPS (both groups) $iops, appends off worker $off"
        SUM[$b]=$((SUM[$b] + iops))
        stop_pid "$PID" "the $b site" || true
        PID=
    done
done
echo "$JOB IOPS (both groups): mean old $((SUM[old] / ROUNDS)), new $((SUM[new] / ROUNDS)), new/old $(python3 -c "print(f'{${SUM[new]}/max(${SUM[old]},1):.2f}')")x"
