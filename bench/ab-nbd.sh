#!/usr/bin/env bash
# Interleaved A/B of two tidemark builds on the four NBD jobs (no DR site):
# for each round, each build in turn gets a fresh one-volume site (vol0,
# 1 GiB, data on the repo's disk) and runs bench/jobs/ seqwrite (SIZE),
# randwrite, randread and synclat (RUNTIME seconds each) against it. One
# line per run; at the end the mean of each figure per build and the ratio
# of the means (NEW / OLD). Both builds run in the same minutes, which is
# what makes them comparable on a noisy machine (bench/run.sh compares with
# qemu-nbd instead).
#
#   bench/ab-nbd.sh /path/to/old/tidemark /path/to/new/tidemark
#   ROUNDS=4 RUNTIME=8 SIZE=1g bench/ab-nbd.sh OLD NEW
#
# synclat is fio's p50 write completion latency plus its p50 flush latency (µs).
#
# JOBLIST picks and orders the jobs (default "seqwrite randwrite randread
# synclat"). Two more read the volume with its log dropped from the page
# cache first (synced, then `dd iflag=nocache count=0` on every segment):
# coldseqread (1 MiB sequential reads, 16 in flight, over SIZE; MiB/s) and
# coldrandread (randread.fio for RUNTIME; IOPS). Both need seqwrite before
# them in the list, which writes the region they read:
#   JOBLIST="seqwrite coldseqread coldrandread" bench/ab-nbd.sh OLD NEW
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: bench/ab-nbd.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
ROUNDS=${ROUNDS:-4}
RUNTIME=${RUNTIME:-8}
SIZE=${SIZE:-1g}
JOBLIST=${JOBLIST:-seqwrite randwrite randread synclat}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
JOBS=$REPO/bench/jobs
WORK=$REPO/bench/out/ab-nbd
ab_begin "$1" "$2"
RESULTS=$WORK/results.txt
: >"$RESULTS"
for ((r = 1; r <= ROUNDS; r++)); do
    for b in old new; do
        ab_site "$b" vol0:cg0
        line="round $r $b:"
        for job in $JOBLIST; do
            sync
            sleep 1
            case $job in
                seqwrite | randwrite | randread | synclat) args=("$JOBS/$job.fio") ;;
                coldseqread) args=(--name=coldseqread --ioengine=nbd --uri="nbd://127.0.0.1:$NPORT/vol0" --rw=read --bs=1M --iodepth=16 --size="$SIZE") ;;
                coldrandread) args=("$JOBS/randread.fio") ;;
                *) echo "ab-nbd.sh: unknown job $job in JOBLIST" >&2; exit 2 ;;
            esac
            if [[ $job == cold* ]]; then
                for f in "$WORK"/site/groups/*/seg-*.tml; do
                    dd if="$f" iflag=nocache count=0 status=none
                done
            fi
            URI=nbd://127.0.0.1:$NPORT/vol0 SIZE=$SIZE RUNTIME=$RUNTIME \
                fio --output-format=json --output="$WORK/$job.json" "${args[@]}" >/dev/null 2>"$WORK/$job.err" \
                || { echo "ab-nbd.sh: fio $job against the $b build failed:" >&2; cat "$WORK/$job.err" >&2; exit 1; }
            v=$(python3 - "$WORK/$job.json" "$job" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
k = sys.argv[2]
if k == "seqwrite":
    print(round(j["write"]["bw_bytes"] / 2**20))
elif k == "randwrite":
    print(round(j["write"]["iops"]))
elif k in ("randread", "coldrandread"):
    print(round(j["read"]["iops"]))
elif k == "coldseqread":
    print(round(j["read"]["bw_bytes"] / 2**20))
else:
    p = "50.000000"
    print(round((j["write"]["clat_ns"]["percentile"][p] + j["sync"]["lat_ns"]["percentile"][p]) / 1000))
PY
)
            line="$line $job=$v"
        done
        stop_pid "$PID" "the $b site" || true
        PID=
        echo "$line" | tee -a "$RESULTS"
    done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    parts = line.split()
    build = parts[2].rstrip(":")
    for kv in parts[3:]:
        k, v = kv.split("=")
        runs.setdefault((build, k), []).append(int(v))
units = {"seqwrite": "MiB/s", "randwrite": "IOPS", "randread": "IOPS", "synclat": "µs p50", "coldseqread": "MiB/s", "coldrandread": "IOPS"}
for k, unit in units.items():
    if ("old", k) not in runs:
        continue
    old, new = statistics.mean(runs[("old", k)]), statistics.mean(runs[("new", k)])
    print(f"{k} ({unit}): mean old {old:,.0f}, new {new:,.0f}, new/old {new / old:.2f}x")
PY
