#!/usr/bin/env bash
# Compare tidemark with qemu-nbd (the reference NBD server) on the same disk,
# using the fio jobs in bench/jobs/ (verbatim copies of /work/shared/bench/*.fio).
#
#   ROUNDS=3 RUNTIME=20 SIZE=1g bench/run.sh
#
# Both servers are started once and kept running through all jobs, so the
# region written by seqwrite is still there when randread runs. For each job
# (seqwrite, randwrite, randread, synclat) every round runs the job once
# against each server, alternating which server goes first. Figures are
# medians over rounds; ratios are tidemark / qemu-nbd. Results go to
# bench/out/results.md (raw fio json in bench/out/json/, site log in
# bench/out/site.log). Needs: cargo, fio (nbd engine), qemu-nbd, python3.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-20}
SIZE=${SIZE:-1g}
VOL_SIZE=1G            # both targets: a 1 GiB raw image / a 1 GiB volume
JOBS=(seqwrite randwrite randread synclat)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
BENCH=$REPO/bench
OUT=$BENCH/out
WORK=$OUT/work
JSON=$OUT/json
BIN=$REPO/target/release/tidemark
CMDLINE="ROUNDS=$ROUNDS RUNTIME=$RUNTIME SIZE=$SIZE bench/run.sh"

for tool in cargo fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found" >&2; exit 1; }
done

# --- build -----------------------------------------------------------------
echo "== building release binary"
(cd "$REPO" && cargo build --release --quiet)

# --- work dir on the repo's disk -------------------------------------------
rm -rf "$WORK" "$JSON"
mkdir -p "$WORK/qemu" "$WORK/site" "$JSON"
repo_dev=$(df --output=source "$REPO" | tail -1)
work_dev=$(df --output=source "$WORK" | tail -1)
if [[ "$repo_dev" != "$work_dev" ]]; then
    echo "run.sh: work dir $WORK is on $work_dev, repo on $repo_dev" >&2; exit 1
fi
FS=$(df -T "$WORK" | awk 'NR==2 {print $2 " on " $1}')
echo "== work dir $WORK ($FS)"

QPORT=${QPORT:-$(free_port)}
TPORT=${TPORT:-$(free_port)}
APORT=${APORT:-$(free_port)}
while [[ $TPORT == "$QPORT" ]]; do TPORT=$(free_port); done
while [[ $APORT == "$QPORT" || $APORT == "$TPORT" ]]; do APORT=$(free_port); done

QPID= ; TPID=
cleanup() {
    local rc=$?
    set +e
    stop_pid "$QPID" qemu-nbd
    stop_pid "$TPID" "tidemark site"
    [[ -f $WORK/site/site.log ]] && cp "$WORK/site/site.log" "$OUT/site.log"
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

site_log_tail() {
    echo "---- tidemark site log (tail) ----" >&2
    tail -n 40 "$WORK/site/site.log" >&2 || true
}

# --- start servers ---------------------------------------------------------
truncate -s "$VOL_SIZE" "$WORK/qemu/base.img"
qemu-nbd -f raw -x vol0 -t -b 127.0.0.1 -p "$QPORT" "$WORK/qemu/base.img" \
    >"$WORK/qemu/qemu-nbd.log" 2>&1 &
QPID=$!

solo_site_toml "$WORK/site/site.toml" "$TPORT" "$APORT" "$VOL_SIZE" vol0:cg0
"$BIN" site --config "$WORK/site/site.toml" >"$WORK/site/site.log" 2>&1 &
TPID=$!

wait_port "$QPORT" "$QPID" qemu-nbd || { cat "$WORK/qemu/qemu-nbd.log" >&2; exit 1; }
wait_port "$TPORT" "$TPID" tidemark || { site_log_tail; exit 1; }
QURI=nbd://127.0.0.1:$QPORT/vol0
TURI=nbd://127.0.0.1:$TPORT/vol0
echo "== qemu-nbd $QURI (pid $QPID), tidemark $TURI (pid $TPID)"

run_one() { # job target round
    local job=$1 target=$2 round=$3 uri
    [[ $target == qemu ]] && uri=$QURI || uri=$TURI
    local out=$JSON/$job-$target-r$round.json
    echo "   $job round $round: $target"
    if ! URI=$uri SIZE=$SIZE RUNTIME=$RUNTIME \
        fio --output-format=json --output="$out" "$BENCH/jobs/$job.fio" 2>"$out.err"; then
        echo "run.sh: fio $job against $target failed:" >&2
        cat "$out.err" >&2
        [[ $target == tidemark ]] && site_log_tail
        exit 1
    fi
    if ! kill -0 "$TPID" 2>/dev/null; then
        echo "run.sh: tidemark site died during $job ($target run)" >&2
        site_log_tail; exit 1
    fi
}

# --- run -------------------------------------------------------------------
n=0
for job in "${JOBS[@]}"; do
    echo "== $job"
    for ((r = 1; r <= ROUNDS; r++)); do
        if ((n % 2 == 0)); then run_one "$job" qemu "$r"; run_one "$job" tidemark "$r"
        else run_one "$job" tidemark "$r"; run_one "$job" qemu "$r"; fi
        n=$((n + 1))
    done
done

# --- report ----------------------------------------------------------------
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
MACHINE="$(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $FS, $(uname -r)"
python3 - "$JSON" "$ROUNDS" "$OUT/results.md" "$DATE" "$MACHINE" "$CMDLINE" <<'PY'
import json, statistics, sys
jdir, rounds, outpath, date, machine, cmd = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]

def load(job, target, r):
    with open(f"{jdir}/{job}-{target}-r{r}.json") as f:
        return json.load(f)["jobs"][0]

def pct(lat, p):
    return lat["percentile"][f"{p:.6f}"] / 1000.0  # ns -> us

def figures(job, target, r):
    j = load(job, target, r)
    if job == "seqwrite":
        return {"v": j["write"]["bw_bytes"] / 2**20}
    if job == "randwrite":
        return {"v": j["write"]["iops"]}
    if job == "randread":
        return {"v": j["read"]["iops"]}
    # synclat: each I/O is a 4 KiB write then a flush (fsync=1, iodepth=1).
    w, s = j["write"]["clat_ns"], j["sync"]["lat_ns"]
    return {"p50": pct(w, 50) + pct(s, 50), "p99": pct(w, 99) + pct(s, 99),
            "w50": pct(w, 50), "s50": pct(s, 50), "w99": pct(w, 99), "s99": pct(s, 99)}

rows = [  # label, job, key, unit, higher-is-better, target ratio
    ("seqwrite", "seqwrite", "v", "MiB/s", True, 0.9),
    ("randwrite", "randwrite", "v", "IOPS", True, 0.9),
    ("randread", "randread", "v", "IOPS", True, 0.8),
    ("synclat p50", "synclat", "p50", "µs", False, 1.25),
    ("synclat p99", "synclat", "p99", "µs", False, None),
]
med = {}
for job in ("seqwrite", "randwrite", "randread", "synclat"):
    for t in ("qemu", "tidemark"):
        per = [figures(job, t, r) for r in range(1, rounds + 1)]
        med[job, t] = {k: statistics.median(p[k] for p in per) for k in per[0]}
        med[job, t]["rounds"] = per

fmt = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"
lines = [f"Date: {date}  ", f"Machine: {machine}  ", f"Command: `{cmd}`", "",
         "| job | unit | qemu-nbd | tidemark | tidemark/qemu-nbd | target | result |",
         "|---|---|---:|---:|---:|---|---|"]
verdicts = []
for label, job, key, unit, higher, target in rows:
    q, t = med[job, "qemu"][key], med[job, "tidemark"][key]
    ratio = t / q if q else float("nan")
    if target is None:
        tgt, res = "—", "info"
    else:
        ok = ratio >= target if higher else ratio <= target
        tgt = f"{'≥' if higher else '≤'} {target}x"
        res = "PASS" if ok else "FAIL"
        verdicts.append(f"{res}: {label} tidemark/qemu-nbd = {ratio:.2f}x (target {tgt})")
    lines.append(f"| {label} | {unit} | {fmt(q)} | {fmt(t)} | {ratio:.2f}x | {tgt} | {res} |")
lines += ["", "Medians over rounds. Throughput ratios: higher is better; latency: lower is better.",
          "synclat latency = p(write completion latency) + p(flush latency), both from fio's",
          "json (`write.clat_ns`, `sync.lat_ns`), per round, then the median over rounds.", ""]
sq, st = med["synclat", "qemu"], med["synclat", "tidemark"]
lines.append("synclat parts (µs, median over rounds): "
             f"qemu-nbd write p50 {sq['w50']:.1f} + flush p50 {sq['s50']:.1f}, p99 {sq['w99']:.1f} + {sq['s99']:.1f}; "
             f"tidemark write p50 {st['w50']:.1f} + flush p50 {st['s50']:.1f}, p99 {st['w99']:.1f} + {st['s99']:.1f}")
lines += ["", "Per round (qemu-nbd / tidemark):", ""]
for label, job, key, unit, *_ in rows:
    pr = [f"{fmt(a[key])} / {fmt(b[key])}" for a, b in zip(med[job, "qemu"]["rounds"], med[job, "tidemark"]["rounds"])]
    lines.append(f"- {label} ({unit}): " + "; ".join(pr))
lines += [""] + [f"- {v}" for v in verdicts]
text = "\n".join(lines) + "\n"
open(outpath, "w").write(text)
print(text)
PY
echo "== results written to $OUT/results.md"
