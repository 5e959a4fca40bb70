# Shared by the bench scripts (sourced): free ports, a one-site config,
# waiting for a server to listen, stopping one. Messages name the script
# that sourced it.
BENCH_NAME=$(basename "$0")

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# free_ports N: N distinct free ports on one line.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*(s.getsockname()[1] for s in socks))
PY
}

# solo_site_toml FILE NBD_PORT API_PORT SIZE VOLUME:GROUP...
# A primary site "a" alone (no peers), its data in the config's directory,
# with these volumes, each SIZE.
solo_site_toml() {
    local file=$1 nport=$2 aport=$3 size=$4 vg
    shift 4
    {
        printf 'name = "a"\nrole = "primary"\ndata_dir = "."\n'
        printf 'nbd_listen = "127.0.0.1:%s"\napi_listen = "127.0.0.1:%s"\n' "$nport" "$aport"
        for vg in "$@"; do
            printf '[[volume]]\nname = "%s"\nsize = "%s"\ngroup = "%s"\n' "${vg%%:*}" "$size" "${vg#*:}"
        done
    } >"$file"
}

# wait_port PORT PID NAME: until something listens on PORT (at most 60 s);
# fails, saying so, if process PID exits first.
wait_port() {
    local i
    for ((i = 0; i < 600; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { echo "$BENCH_NAME: $3 exited during start" >&2; return 1; }
        sleep 0.1
    done
    echo "$BENCH_NAME: $3 did not listen on $1" >&2
    return 1
}

# stop_pid PID NAME: SIGTERM and wait; says so (and returns 1) if it does
# not exit cleanly. Nothing to do for an empty or gone PID.
stop_pid() {
    local pid=$1 name=$2 st=0
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid"
    wait "$pid" || st=$?
    if [[ $st -ne 0 ]]; then
        echo "$BENCH_NAME: $name exited with $st on SIGTERM" >&2
        return 1
    fi
}

# For the A/B scripts. ab_begin OLD NEW: BINS[old] and BINS[new], each
# checked to be an executable and made absolute (the site runs in its own
# directory); the site of the run in progress ($PID) stopped and
# $WORK/site removed on exit; $WORK made.
ab_begin() {
    declare -gA BINS=([old]=$1 [new]=$2)
    local b
    for b in old new; do
        [[ -x ${BINS[$b]} ]] || { echo "$BENCH_NAME: ${BINS[$b]} is not an executable" >&2; exit 2; }
        BINS[$b]=$(realpath "${BINS[$b]}")
    done
    PID=
    trap 'stop_pid "$PID" site || true; rm -rf "$WORK/site"' EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$WORK"
}

# ab_site BUILD VOLUME:GROUP...: a fresh one-site deployment in $WORK/site
# (volumes of 1G) run by BINS[BUILD]; sets NPORT, APORT and PID once it
# listens, or exits with its log.
ab_site() {
    local b=$1
    shift
    rm -rf "$WORK/site"
    mkdir -p "$WORK/site"
    read -r NPORT APORT < <(free_ports 2)
    solo_site_toml "$WORK/site/site.toml" "$NPORT" "$APORT" 1G "$@"
    (cd "$WORK/site" && exec "${BINS[$b]}" site --config site.toml >site.log 2>&1) &
    PID=$!
    wait_port "$NPORT" "$PID" "the $b site" || { cat "$WORK/site/site.log" >&2; exit 1; }
}
