#!/usr/bin/env bash
# What replication to a DR site costs, measured against qemu-nbd and against
# a tidemark site without DR, in one run, with the fio jobs in bench/jobs/.
#
#   ROUNDS=3 RUNTIME=20 SIZE=1g bench/run-replication.sh
#   TIDEMARK_BIN=/path/to/other/tidemark bench/run-replication.sh   # another build
#   JOBS=seqwrite CONFIGS="solo asyncshm" ROUNDS=1 bench/run-replication.sh   # a subset, no report
#
# Configurations (each measured run gets a fresh deployment, started for that
# run and stopped with SIGTERM after it; every configuration has its own port
# block):
#   qemu      qemu-nbd serving a raw 1 GiB file on the repo's disk
#   solo      tidemark primary alone (one site, no peers)
#   async     primary + 1 DR site, async mode, DR data on the repo's disk
#   asyncshm  primary + 1 DR site, async mode, DR data on tmpfs (/dev/shm)
#   sync      primary + 1 DR site, sync mode, DR data on the repo's disk
# Jobs: seqwrite (qemu solo async asyncshm), randwrite (solo async; the DR lag
# is sampled every 250 ms from the primary's /status), synclat (qemu sync).
# Every round runs a job once per configuration, rotating the order; before
# each run the script syncs and waits for dirty pages to drain. After
# each run against a deployment with a DR site the script waits until the DR
# reports lag_writes 0 before reading counters or stopping the sites. Link
# efficiency (async, seqwrite): link_sent_bytes delta / link_data_bytes delta
# and link_sent_bytes delta / bytes fio wrote.
# Results: bench/out/replication.md (fio json and samples in
# bench/out/replication/, site logs in bench/out/replication/logs/).
# Needs: fio (nbd engine), qemu-nbd, python3, and target/release/tidemark
# (built with cargo if missing).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-20}
SIZE=${SIZE:-1g}
VOL_SIZE=1G
LAG_TIMEOUT=${LAG_TIMEOUT:-300}   # seconds to wait for the DR to catch up

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
BENCH=$REPO/bench
OUT=$BENCH/out
RES=$OUT/replication
WORK=$OUT/work-replication
JSON=$RES/json
LOGS=$RES/logs
BIN=${TIDEMARK_BIN:-$REPO/target/release/tidemark}   # TIDEMARK_BIN: compare another build
CMDLINE="ROUNDS=$ROUNDS RUNTIME=$RUNTIME SIZE=$SIZE bench/run-replication.sh"

for tool in fio qemu-nbd python3 curl; do
    command -v "$tool" >/dev/null || { echo "run-replication.sh: $tool not found" >&2; exit 1; }
done

# --- binary ------------------------------------------------------------------
if [[ ! -x $BIN ]]; then
    echo "== building release binary"
    (cd "$REPO" && cargo build --release --quiet)
fi
if [[ -n ${TIDEMARK_BIN:-} ]]; then
    BIN_INFO="$(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC'), TIDEMARK_BIN=$BIN"
else
    BIN_INFO="$(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC'), HEAD $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
fi
echo "== using $BIN (built $BIN_INFO)"

# --- dirs ----------------------------------------------------------------------
SHM=/dev/shm
if [[ $(df --output=fstype "$SHM" | tail -1 | tr -d ' ') != tmpfs ]]; then
    echo "run-replication.sh: $SHM is not tmpfs" >&2; exit 1
fi
rm -rf "$WORK" "$RES"
mkdir -p "$WORK" "$JSON" "$LOGS"
# Others may rebuild target/release/tidemark during the run: use a private copy.
cp "$BIN" "$WORK/tidemark"
BIN=$WORK/tidemark
SHMWORK=$(mktemp -d "$SHM/tidemark-bench-repl.XXXXXX")
repo_dev=$(df --output=source "$REPO" | tail -1)
work_dev=$(df --output=source "$WORK" | tail -1)
if [[ "$repo_dev" != "$work_dev" ]]; then
    echo "run-replication.sh: work dir $WORK is on $work_dev, repo on $repo_dev" >&2; exit 1
fi
FS=$(df -T "$WORK" | awk 'NR==2 {print $2 " on " $1}')
SHMFS=$(df -T "$SHM" | awk 'NR==2 {print $2 " on " $7}')
echo "== work dir $WORK ($FS), DR tmpfs dir $SHMWORK ($SHMFS)"

# --- ports: one block of 40 per configuration ------------------------------------
read -r -a BASES < <(python3 - <<'PY'
import socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
import os
# Below the ephemeral range (32768+) and the test suite's ports (20000+).
bases, p = [], 12000 + (os.getpid() % 20) * 200
while len(bases) < 5:
    if all(free(q) for q in range(p, p + 40)):
        bases.append(p)
    p += 40
print(*bases)
PY
)
declare -A PORT_BASE=([qemu]=${BASES[0]} [solo]=${BASES[1]} [async]=${BASES[2]} [asyncshm]=${BASES[3]} [sync]=${BASES[4]})
echo "== port bases: qemu ${BASES[0]}, solo ${BASES[1]}, async ${BASES[2]}, asyncshm ${BASES[3]}, sync ${BASES[4]}"

# --- process management ------------------------------------------------------------
QPID= ; APID= ; BPID= ; SAMPLER= ; RUNDIR= ; RUNSHM=
STOP_FAILS=0

stop_counted() { # pid name: stop_pid, counting unclean exits for the report
    stop_pid "$1" "$2" || STOP_FAILS=$((STOP_FAILS + 1))
}

save_logs() { # tag
    [[ -n $RUNDIR ]] || return 0
    [[ -f $RUNDIR/a/site.log ]] && cp "$RUNDIR/a/site.log" "$LOGS/$1-a.log"
    [[ -f $RUNDIR/site/site.log ]] && cp "$RUNDIR/site/site.log" "$LOGS/$1-a.log"
    [[ -n $RUNSHM && -f $RUNSHM/b/site.log ]] && cp "$RUNSHM/b/site.log" "$LOGS/$1-b.log"
    [[ -f $RUNDIR/b/site.log ]] && cp "$RUNDIR/b/site.log" "$LOGS/$1-b.log"
    [[ -f $RUNDIR/qemu-nbd.log ]] && cp "$RUNDIR/qemu-nbd.log" "$LOGS/$1-qemu-nbd.log"
    return 0
}

stop_all() { # tag
    if [[ -n $SAMPLER ]]; then kill -TERM "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=; fi
    stop_counted "$QPID" qemu-nbd; QPID=
    stop_counted "$APID" "tidemark primary ($1)"; APID=     # primary first, then the DR
    stop_counted "$BPID" "tidemark DR ($1)"; BPID=
    save_logs "$1"
    [[ -n $RUNDIR ]] && rm -rf "$RUNDIR"
    [[ -n $RUNSHM ]] && rm -rf "$RUNSHM"
    RUNDIR= ; RUNSHM=
}

CUR_TAG=aborted
cleanup() {
    local rc=$?
    set +e
    stop_all "$CUR_TAG"
    rm -rf "$WORK" "$SHMWORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log_tail() {
    local f
    for f in "$RUNDIR"/a/site.log "$RUNDIR"/site/site.log "$RUNDIR"/b/site.log "${RUNSHM:-/nonexistent}"/b/site.log; do
        [[ -f $f ]] || continue
        echo "---- $f (tail) ----" >&2; tail -n 30 "$f" >&2
    done
}

# Replica state from the primary's /status: prints "state lag_writes lag_seconds sent data".
replica() { # api_port
    curl -sf --max-time 5 "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
r = json.load(sys.stdin)["groups"][0]["replicas"][0]
print(r["state"], r["lag_writes"], r["lag_seconds"], r["link_sent_bytes"], r["link_data_bytes"])'
}

wait_caught_up() { # api_port what
    local t0=$SECONDS st lw rest
    while :; do
        if read -r st lw rest < <(replica "$1" 2>/dev/null) && [[ $st == replicating && $lw == 0 ]]; then
            return 0
        fi
        if ((SECONDS - t0 > LAG_TIMEOUT)); then
            echo "run-replication.sh: DR not caught up after ${LAG_TIMEOUT}s ($2): ${st:-?} lag_writes ${lw:-?}" >&2
            log_tail; return 1
        fi
        sleep 0.1
    done
}

# --- starting one configuration ---------------------------------------------------------
URI= ; API=
start_cfg() { # cfg tag
    local cfg=$1 tag=$2 P=${PORT_BASE[$1]}
    RUNDIR=$WORK/$tag
    mkdir -p "$RUNDIR"
    case $cfg in
    qemu)
        truncate -s "$VOL_SIZE" "$RUNDIR/base.img"
        qemu-nbd -f raw -x vol0 -t -b 127.0.0.1 -p "$P" "$RUNDIR/base.img" >"$RUNDIR/qemu-nbd.log" 2>&1 &
        QPID=$!
        wait_port "$P" "$QPID" qemu-nbd || { cat "$RUNDIR/qemu-nbd.log" >&2; return 1; }
        URI=nbd://127.0.0.1:$P/vol0; API= ;;
    solo)
        mkdir -p "$RUNDIR/site"
        solo_site_toml "$RUNDIR/site/site.toml" "$P" "$((P + 10))" "$VOL_SIZE" vol0:cg0
        "$BIN" site --config "$RUNDIR/site/site.toml" >"$RUNDIR/site/site.log" 2>&1 &
        APID=$!
        wait_port "$P" "$APID" "tidemark ($tag)" || { log_tail; return 1; }
        URI=nbd://127.0.0.1:$P/vol0; API=$((P + 10)) ;;
    async | asyncshm | sync)
        local mode=async bdir
        [[ $cfg == sync ]] && mode=sync
        rmdir "$RUNDIR"   # tidemark init creates it
        "$BIN" init "$RUNDIR" --sites a,b --port-base "$P" --mode "$mode" >"$WORK/$tag.init.log" 2>&1 \
            || { cat "$WORK/$tag.init.log" >&2; return 1; }
        # The primary serves exactly one volume: vol0, 1 GiB, group cg0.
        python3 - "$RUNDIR/a/site.toml" <<'PY'
import sys
p = sys.argv[1]; cfg = open(p).read()
start = cfg.index("[[volume]]")
ends = [start + cfg[start:].find(m) for m in ("[[peer]]", "[tls]") if cfg[start:].find(m) >= 0]
end = min(ends) if ends else len(cfg)
vol = '[[volume]]\nname = "vol0"\nsize = "1GiB"\ngroup = "cg0"\n\n'
open(p, "w").write(cfg[:start] + vol + cfg[end:])
PY
        bdir=$RUNDIR/b
        if [[ $cfg == asyncshm ]]; then
            # The DR site's whole directory (config, certs, data_dir ".") on tmpfs.
            RUNSHM=$SHMWORK/$tag
            mkdir -p "$RUNSHM"
            mv "$RUNDIR/b" "$RUNSHM/b"
            bdir=$RUNSHM/b
            [[ $(df --output=fstype "$bdir" | tail -1 | tr -d ' ') == tmpfs ]] \
                || { echo "run-replication.sh: $bdir is not on tmpfs" >&2; return 1; }
        fi
        "$BIN" site --config "$bdir/site.toml" >"$bdir/site.log" 2>&1 &   # DR first
        BPID=$!
        wait_port "$((P + 1))" "$BPID" "tidemark DR ($tag)" || { log_tail; return 1; }
        "$BIN" site --config "$RUNDIR/a/site.toml" >"$RUNDIR/a/site.log" 2>&1 &
        APID=$!
        wait_port "$P" "$APID" "tidemark primary ($tag)" || { log_tail; return 1; }
        URI=nbd://127.0.0.1:$P/vol0; API=$((P + 10))
        wait_caught_up "$API" "$tag start" ;;
    esac
}

# Samples the DR's lag from the primary's /status every 250 ms, one line per
# sample: unix_time state lag_writes lag_seconds.
sampler() { # api_port outfile
    exec python3 - "$1" "$2" <<'PY'
import json, sys, time, urllib.request, signal
port, path = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with open(path, "w", buffering=1) as f:
    nxt = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                rep = json.load(r)["groups"][0]["replicas"][0]
            f.write(f"{time.time():.3f} {rep['state']} {rep['lag_writes']} {rep['lag_seconds']}\n")
        except Exception as e:
            f.write(f"{time.time():.3f} error - - {type(e).__name__}\n")
        nxt += 0.25
        time.sleep(max(0.0, nxt - time.monotonic()))
PY
}

# Before each measured run: the previous run's data (up to 2 GiB written and
# then deleted with its directory) must not still be on its way to the disk,
# or its writeback lands on whichever configuration runs next.
settle() {
    local i dirty
    sync
    for ((i = 0; i < 300; i++)); do
        dirty=$(awk '/^(Dirty|Writeback):/ {s += $2} END {print s}' /proc/meminfo)
        ((dirty < 65536)) && return 0   # kB
        sleep 0.1
    done
    echo "run-replication.sh: ${dirty} kB still dirty or under writeback after 30 s" >&2
}

cpu_s() { # pid -> user + system CPU seconds so far
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f\n", ($14 + $15) / hz}' "/proc/$1/stat"
}

run_one() { # job cfg round
    local job=$1 cfg=$2 round=$3 tag=$1-$2-r$3
    local out=$JSON/$tag.json before after
    CUR_TAG=$tag
    echo "   $job round $round: $cfg"
    settle
    start_cfg "$cfg" "$tag" || exit 1
    if [[ $cfg == async && $job == seqwrite ]]; then
        before=$(replica "$API")
    fi
    if [[ $job == randwrite && $cfg != solo && $cfg != qemu ]]; then
        sampler "$API" "$RES/$tag.lag" >/dev/null 2>"$RES/$tag.lag.err" &
        SAMPLER=$!
    fi
    date +%s.%N >"$RES/$tag.fio-start"
    if ! URI=$URI SIZE=$SIZE RUNTIME=$RUNTIME \
        fio --output-format=json --output="$out" "$BENCH/jobs/$job.fio" 2>"$out.err"; then
        echo "run-replication.sh: fio $job against $cfg failed:" >&2
        cat "$out.err" >&2; log_tail; exit 1
    fi
    date +%s.%N >"$RES/$tag.fio-end"
    for p in $APID $BPID $QPID; do
        kill -0 "$p" 2>/dev/null || { echo "run-replication.sh: a server died during $tag" >&2; log_tail; exit 1; }
    done
    if [[ $cfg != qemu && $cfg != solo ]]; then
        wait_caught_up "$API" "$tag" || exit 1
        date +%s.%N >"$RES/$tag.caught-up"
    fi
    if [[ -n $SAMPLER ]]; then kill -TERM "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=; fi
    if [[ $job == seqwrite && $cfg != qemu ]]; then
        # CPU seconds (user + system) each site used, start to caught up.
        cpu_s "$APID" >"$RES/$tag.cpu-a"
        [[ -n $BPID ]] && cpu_s "$BPID" >"$RES/$tag.cpu-b"
    fi
    if [[ $cfg == async && $job == seqwrite ]]; then
        after=$(replica "$API")
        echo "$before" >"$RES/$tag.link"; echo "$after" >>"$RES/$tag.link"
        curl -sf "http://127.0.0.1:$API/metrics" | grep -E '^tidemark_(link_|replication_lag)' >"$RES/$tag.metrics" || true
    fi
    stop_all "$tag"
    CUR_TAG=aborted
}

# --- run -------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A TARGETS=([seqwrite]="qemu solo async asyncshm" [randwrite]="solo async" [synclat]="qemu sync")
# JOBS / CONFIGS narrow a run (e.g. an A/B of two builds on one job); such a
# run prints each measurement and writes no report.
JOBS=${JOBS:-seqwrite randwrite synclat}
n=0
for job in $JOBS; do
    echo "== $job"
    read -r -a cfgs <<<"${TARGETS[$job]}"
    if [[ -n ${CONFIGS:-} ]]; then
        read -r -a cfgs < <(for c in "${cfgs[@]}"; do [[ " $CONFIGS " == *" $c "* ]] && printf '%s ' "$c"; done; echo)
    fi
    k=${#cfgs[@]}
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((i = 0; i < k; i++)); do
            run_one "$job" "${cfgs[$(((i + n) % k))]}" "$r"
        done
        n=$((n + 1))
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
if [[ $JOBS != "seqwrite randwrite synclat" || -n ${CONFIGS:-} ]]; then
    python3 - "$JSON" <<'PY'
import glob, json, os, sys
res = os.path.dirname(sys.argv[1])
for f in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    j = json.load(open(f))["jobs"][0]
    w = j["write"]
    tag = os.path.basename(f)[:-5]
    extra = ""
    gib = w["io_bytes"] / 2**30
    for side, name in (("a", "primary"), ("b", "DR")):
        p = f"{res}/{tag}.cpu-{side}"
        if os.path.exists(p) and gib:
            extra += f", {name} {float(open(p).read()) / gib:.2f} CPU s/GiB"
    if os.path.exists(f"{res}/{tag}.caught-up"):
        extra += f", caught up {float(open(f'{res}/{tag}.caught-up').read()) - float(open(f'{res}/{tag}.fio-end').read()):.2f} s after fio"
    print(f"{tag}: {w['bw_bytes'] / 2**20:.0f} MiB/s, {w['iops']:.0f} IOPS{extra}")
PY
    exit 0
fi

# --- report ------------------------------------------------------------------------
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
MACHINE="$(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $FS (DR tmpfs: $SHMFS), $(uname -r)"
OTHER=$(pgrep -fa 'tidemark.* site ' | grep -v -e "$WORK" -e "$SHMWORK" | grep -c . || true)
python3 - "$RES" "$ROUNDS" "$OUT/replication.md" "$DATE" "$MACHINE" "$CMDLINE" "$BIN_INFO" \
    "$LOAD_BEFORE" "$LOAD_AFTER" "$OTHER" "$STOP_FAILS" <<'PY'
import glob, json, os, re, statistics, sys
res, rounds, outpath, date, machine, cmd, bininfo, lb, la, other, stopfails = \
    sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
R = range(1, rounds + 1)
med = statistics.median

def job(name):
    with open(f"{res}/json/{name}.json") as f:
        return json.load(f)["jobs"][0]

def pct(lat, p):
    return lat["percentile"][f"{p:.6f}"] / 1000.0  # ns -> us

seq = {c: [job(f"seqwrite-{c}-r{r}")["write"]["bw_bytes"] / 2**20 for r in R]
       for c in ("qemu", "solo", "async", "asyncshm")}
rnd = {c: [job(f"randwrite-{c}-r{r}")["write"]["iops"] for r in R] for c in ("solo", "async")}
syn = {}
for c in ("qemu", "sync"):
    per = []
    for r in R:
        j = job(f"synclat-{c}-r{r}")
        w, s = j["write"]["clat_ns"], j["sync"]["lat_ns"]
        per.append((pct(w, 50) + pct(s, 50), pct(w, 50), pct(s, 50), pct(w, 99) + pct(s, 99)))
    syn[c] = per

# DR lag during randwrite (async): samples during fio, and during the drain after it.
lag_run, lag_drain, lag_w = [], [], []
for r in R:
    t0 = float(open(f"{res}/randwrite-async-r{r}.fio-start").read())
    t1 = float(open(f"{res}/randwrite-async-r{r}.fio-end").read())
    run = drain = 0.0; mw = 0; errs = 0
    for line in open(f"{res}/randwrite-async-r{r}.lag"):
        t, st, lw, ls = line.split()[:4]
        if st == "error":
            errs += 1; continue
        t, ls = float(t), float(ls)
        if t0 <= t <= t1:
            run = max(run, ls); mw = max(mw, int(lw))
        elif t > t1:
            drain = max(drain, ls)
    lag_run.append(run); lag_drain.append(drain); lag_w.append(mw)

# Link efficiency (async, seqwrite).
eff_data, eff_app, link = [], [], []
for r in R:
    b, a = [l.split() for l in open(f"{res}/seqwrite-async-r{r}.link").read().split("\n")[:2]]
    sent, data = int(a[3]) - int(b[3]), int(a[4]) - int(b[4])
    app = job(f"seqwrite-async-r{r}")["write"]["io_bytes"]
    link.append((sent, data, app))
    eff_data.append(sent / data if data else float("inf"))
    eff_app.append(sent / app)

# CPU per GiB written and catch-up time (seqwrite): what replication costs,
# apart from how the two CPUs happened to be shared during the run.
def cpu(tag, side):
    p = f"{res}/{tag}.cpu-{side}"
    return float(open(p).read()) if os.path.exists(p) else None
gib = {c: [job(f"seqwrite-{c}-r{r}")["write"]["io_bytes"] / 2**30 for r in R] for c in ("solo", "asyncshm")}
cpu_solo = [cpu(f"seqwrite-solo-r{r}", "a") / g for r, g in zip(R, gib["solo"])]
cpu_pa = [cpu(f"seqwrite-asyncshm-r{r}", "a") / g for r, g in zip(R, gib["asyncshm"])]
cpu_dr = [cpu(f"seqwrite-asyncshm-r{r}", "b") / g for r, g in zip(R, gib["asyncshm"])]
catch = [float(open(f"{res}/seqwrite-asyncshm-r{r}.caught-up").read()) - float(open(f"{res}/seqwrite-asyncshm-r{r}.fio-end").read()) for r in R]

f0 = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"
S = {c: med(v) for c, v in seq.items()}
RW = {c: med(v) for c, v in rnd.items()}
SY = {c: med(p[0] for p in v) for c, v in syn.items()}
SY99 = {c: med(p[3] for p in v) for c, v in syn.items()}
checks = [
    ("seqwrite async DR (same disk) / qemu-nbd", S["async"] / S["qemu"], ">=", 0.45, "x"),
    ("seqwrite async DR (tmpfs) / tidemark without DR", S["asyncshm"] / S["solo"], ">=", 0.85, "x"),
    ("max DR lag during randwrite (async, same disk)", max(med(lag_run), med(lag_drain)), "<", 1.0, " s"),
    ("synclat p50 sync mode / qemu-nbd", SY["sync"] / SY["qemu"], "<=", 2.5, "x"),
    ("link bytes sent / application bytes (async seqwrite)", max(med(eff_app), med(eff_data)), "<=", 1.10, "x"),
]
def ok(v, op, t):
    return v >= t if op == ">=" else v < t if op == "<" else v <= t
sym = {">=": "≥", "<": "<", "<=": "≤"}

L = [f"Date: {date}  ", f"Machine: {machine}  ", f"Binary: target/release/tidemark, built {bininfo}  ",
     f"Command: `{cmd}`  ",
     f"Load average before / after: {lb} / {la}; other `tidemark site` processes running at the end (e.g. a test suite): {other}",
     "",
     "| job | unit | qemu-nbd | tidemark, no DR | async DR same disk | async DR tmpfs | sync DR same disk |",
     "|---|---|---:|---:|---:|---:|---:|",
     f"| seqwrite | MiB/s | {f0(S['qemu'])} | {f0(S['solo'])} | {f0(S['async'])} | {f0(S['asyncshm'])} | — |",
     f"| randwrite | IOPS | — | {f0(RW['solo'])} | {f0(RW['async'])} | — | — |",
     f"| randwrite max DR lag (during fio / drain after) | s | — | — | {med(lag_run):.2f} / {med(lag_drain):.2f} | — | — |",
     f"| synclat p50 | µs | {f0(SY['qemu'])} | — | — | — | {f0(SY['sync'])} |",
     f"| synclat p99 (info) | µs | {f0(SY99['qemu'])} | — | — | — | {f0(SY99['sync'])} |",
     "",
     "| check | value | target | result |", "|---|---:|---|---|"]
verdicts = []
for name, v, op, t, unit in checks:
    r = "PASS" if ok(v, op, t) else "FAIL"
    L.append(f"| {name} | {v:.2f}{unit} | {sym[op]} {t}{unit} | {r} |")
    verdicts.append(f"{r}: {name} = {v:.2f}{unit} (target {sym[op]} {t}{unit})")
L += ["", "Medians over rounds. Each measured run uses a fresh deployment (started for the run,",
      "stopped with SIGTERM after it); after each run with a DR site the script waits for",
      "lag_writes 0 at the DR. Ratios: seqwrite async/qemu-nbd "
      f"{S['async']/S['qemu']:.2f}x, asyncshm/no-DR {S['asyncshm']/S['solo']:.2f}x, "
      f"async/no-DR {S['async']/S['solo']:.2f}x, no-DR/qemu-nbd {S['solo']/S['qemu']:.2f}x; "
      f"randwrite async/no-DR {RW['async']/RW['solo']:.2f}x.",
      "synclat = p50(write.clat_ns) + p50(sync.lat_ns) per round, as bench/run.sh.",
      "DR lag = max lag_seconds of groups[0].replicas[0] in the primary's /status, sampled every",
      "250 ms while fio ran and while the DR drained after it; the check uses the larger median.",
      "Link efficiency = link_sent_bytes delta / bytes fio wrote (seqwrite, async) and",
      "link_sent_bytes delta / link_data_bytes delta; the check uses the larger median.",
      "",
      "synclat parts (µs, median): qemu-nbd write p50 "
      f"{med(p[1] for p in syn['qemu']):.1f} + flush p50 {med(p[2] for p in syn['qemu']):.1f}; "
      f"sync DR write p50 {med(p[1] for p in syn['sync']):.1f} + flush p50 {med(p[2] for p in syn['sync']):.1f}",
      "",
      "seqwrite CPU per GiB written (user + system, site start to DR caught up, median): "
      f"no DR: primary {med(cpu_solo):.2f} s; async DR tmpfs: primary {med(cpu_pa):.2f} s + DR site {med(cpu_dr):.2f} s "
      f"(both sites share this machine's {os.cpu_count()} CPUs). The tmpfs DR caught up {med(catch):.2f} s after fio ended.",
      "", "Per round:", ""]
for c, lab in (("qemu", "qemu-nbd"), ("solo", "no DR"), ("async", "async DR"), ("asyncshm", "async DR tmpfs")):
    L.append(f"- seqwrite {lab} (MiB/s): " + "; ".join(f0(x) for x in seq[c]))
L.append("- seqwrite CPU s/GiB, no DR primary: " + "; ".join(f"{x:.2f}" for x in cpu_solo))
L.append("- seqwrite CPU s/GiB, async DR tmpfs primary + DR site: " + "; ".join(f"{a:.2f} + {b:.2f}" for a, b in zip(cpu_pa, cpu_dr)))
L.append("- seqwrite async DR tmpfs caught up after fio ended (s): " + "; ".join(f"{x:.2f}" for x in catch))
for c, lab in (("solo", "no DR"), ("async", "async DR")):
    L.append(f"- randwrite {lab} (IOPS): " + "; ".join(f0(x) for x in rnd[c]))
L.append("- randwrite async max DR lag during fio / drain (s), max lag_writes during fio: " +
         "; ".join(f"{a:.2f} / {b:.2f}, {w:,}" for a, b, w in zip(lag_run, lag_drain, lag_w)))
for c, lab in (("qemu", "qemu-nbd"), ("sync", "sync DR")):
    L.append(f"- synclat p50 {lab} (µs): " + "; ".join(f0(p[0]) for p in syn[c]))
L.append("- link (async seqwrite) sent / data / fio bytes: " +
         "; ".join(f"{s:,} / {d:,} / {a:,} ({s/a:.3f}x app, {e:.3f}x data)"
                   for (s, d, a), e in zip(link, eff_data)))

# Site logs: WARN / ERROR lines.
ansi = re.compile(r"\x1b\[[0-9;]*m")
bad, at_stop = [], 0
def stop_time(log):  # when the primary of this run got SIGTERM (ISO timestamps sort as text)
    a = re.sub(r"-b\.log$", "-a.log", log)
    if not os.path.exists(a):
        return None
    for line in open(a, errors="replace"):
        if "SIGTERM" in line:
            return ansi.sub("", line).split()[0]
    return None
for p in sorted(glob.glob(f"{res}/logs/*.log")):
    st = stop_time(p) if p.endswith("-b.log") else None
    for line in open(p, errors="replace"):
        line = ansi.sub("", line).rstrip()
        if re.search(r"\b(WARN|ERROR)\b", line):
            note = ""
            if st and line.split()[0] >= st:
                note = " [after the primary got SIGTERM]"; at_stop += 1
            bad.append(f"{os.path.basename(p)}: {line}{note}")
L += ["", f"Site logs: {len(bad)} WARN/ERROR lines ({at_stop} of them at the primary's shutdown)" + (":" if bad else ".")]
L += [f"    {b}" for b in bad[:20]]
if len(bad) > 20:
    L.append(f"    … {len(bad) - 20} more (bench/out/replication/logs/)")
if stopfails != "0":
    L.append(f"\n{stopfails} site/server processes did not exit cleanly on SIGTERM.")
L += [""] + [f"- {v}" for v in verdicts]
text = "\n".join(L) + "\n"
open(outpath, "w").write(text)
print(text)
PY
echo "== results written to $OUT/replication.md"
