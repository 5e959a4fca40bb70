#!/usr/bin/env bash
# What snapshot operations cost on a fully written 1 GiB volume (issue 4:
# create, restore and delete each < 100 ms; concurrent writes stalled < 50 ms).
#
#   ROUNDS=10 RUNTIME=20 bench/run-snapshots.sh
#
# One deployment (`tidemark up`, primary + 1 DR site, async, data on the
# repo's disk). vol0 is written in full (fio, 1 MiB sequential), then:
#   baseline  fio 4 KiB random writes at queue depth 1 for RUNTIME seconds
#   with-ops  the same fio job while, ROUNDS times, `snapshot create`,
#             `snapshot restore` and `snapshot delete` run through the CLI
#             (0.5 s apart); each op's wall time is measured around the CLI
#             process (so it includes process start, HTTP and the fsync of
#             the operation's record).
# The stall is the longest write completion latency fio saw during the
# with-ops run (and, for comparison, during the baseline run).
# Results: bench/out/snapshots.md (fio json in bench/out/snapshots/).
set -euo pipefail

ROUNDS=${ROUNDS:-10}
RUNTIME=${RUNTIME:-20}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$REPO/bench/out
RES=$OUT/snapshots
WORK=$OUT/work-snapshots
BIN=$REPO/target/release/tidemark
PORT=${PORT:-41800}
CMDLINE="ROUNDS=$ROUNDS RUNTIME=$RUNTIME bench/run-snapshots.sh"

for tool in fio python3 curl; do
    command -v "$tool" >/dev/null || { echo "run-snapshots.sh: $tool not found" >&2; exit 1; }
done
if [[ ! -x $BIN ]]; then (cd "$REPO" && cargo build --release --quiet); fi
rm -rf "$WORK" "$RES"; mkdir -p "$WORK" "$RES"

"$BIN" up --dir "$WORK/d" --port-base "$PORT" --dr-sites 1 --volume vol0=1GiB > "$RES/up.log" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    grep -q '"event":"ready"\|ready:' "$RES/up.log" 2>/dev/null && break
    sleep 0.1
done
URI="nbd://127.0.0.1:$PORT/vol0"
API="http://127.0.0.1:$((PORT + 10))"
tm() { "$BIN" --api "$API" "$@"; }

caught_up() {
    for _ in $(seq 1 1200); do
        if curl -sf "$API/status" | python3 -c 'import json,sys; g=json.load(sys.stdin)["groups"][0]; r=g["replicas"][0]; sys.exit(0 if r["lag_writes"]==0 and r["state"]=="replicating" else 1)'; then return 0; fi
        sleep 0.25
    done
    echo "DR did not catch up" >&2; return 1
}

echo "== filling vol0 (1 GiB)"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size=1g --output-format=json > "$RES/fill.json"
caught_up

job() {
    fio --name=w --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=1 --size=1g \
        --time_based --runtime="$RUNTIME" --output-format=json > "$1"
}

echo "== baseline: randwrite qd1, ${RUNTIME}s"
job "$RES/baseline.json"
caught_up

echo "== with-ops: randwrite qd1 while snapshot create/restore/delete run $ROUNDS times"
job "$RES/with-ops.json" &
FIO=$!
sleep 2
: > "$RES/ops.txt"
ms() { local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 )); }
for i in $(seq 1 "$ROUNDS"); do
    c=$(ms tm snapshot create vol0 "b$i"); sleep 0.5
    r=$(ms tm snapshot restore vol0 "b$i"); sleep 0.5
    d=$(ms tm snapshot delete vol0 "b$i"); sleep 0.5
    echo "$c $r $d" >> "$RES/ops.txt"
done
wait $FIO
caught_up

python3 - "$RES" "$CMDLINE" > "$OUT/snapshots.md" <<'PY'
import json, sys, statistics
res, cmdline = sys.argv[1], sys.argv[2]
def lat(p):
    t = open(p).read()
    w = json.loads(t[t.index("{"):])["jobs"][0]["write"]  # fio prints a line before the JSON
    return w["clat_ns"]["max"] / 1e6, w["clat_ns"]["percentile"].get("99.000000", 0) / 1e6, w["iops"]
ops = [list(map(int, l.split())) for l in open(f"{res}/ops.txt") if l.strip()]
names = ["create", "restore", "delete"]
bmax, b99, biops = lat(f"{res}/baseline.json")
omax, o99, oiops = lat(f"{res}/with-ops.json")
print(f"Command: `{cmdline}` — {len(ops)} rounds on a fully written 1 GiB volume, primary + 1 DR site (async), repo disk.\n")
print("| operation | median ms | max ms | limit |")
print("|---|---|---|---|")
for i, n in enumerate(names):
    v = [o[i] / 1000 for o in ops]
    print(f"| snapshot {n} (CLI wall time) | {statistics.median(v):.1f} | {max(v):.1f} | < 100 ms |")
print()
print("| fio randwrite 4k qd1 | max latency ms | p99 ms | IOPS |")
print("|---|---|---|---|")
print(f"| baseline | {bmax:.1f} | {b99:.2f} | {biops:.0f} |")
print(f"| during the operations | {omax:.1f} | {o99:.2f} | {oiops:.0f} |")
worst = max(max(o) for o in ops) / 1000
print()
print(f"Result: slowest operation {worst:.1f} ms (limit 100), longest write stall {omax:.1f} ms (limit 50): " +
      ("PASS" if worst < 100 and omax < 50 else "FAIL"))
PY
cat "$OUT/snapshots.md"
