#!/usr/bin/env bash
# The portcullis benchmark, in one command: portcullis against Squid, tinyproxy and a direct
# connection, on loopback, in a private network namespace, with names resolved by a local
# dnsmasq. Writes benches/RESULTS.md (benches/RESULTS.quick.md with --quick).
#
#   benches/run.sh                 # the full benchmark (3 runs, medians; about 18 minutes)
#   benches/run.sh --quick         # a smoke test (1 short run; under 2 minutes once built)
#   benches/run.sh --runs 5 --duration 5 --idle 10000 --out /tmp/r.md
#
# Needs root (it installs Debian packages and creates namespaces); re-runs itself with sudo
# when started as another user. Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/benches/run.sh"

QUICK=0
RUNS=""
DURATION=""
WARMUP=""
IDLE=""
OUT=""
MICRO=1
DISK_LOGS=0
FIGURES=setup,bulk,idle,status,stream
PEERS=direct,squid,tinyproxy,portcullis,portcullis-nolog,floor
CONCURRENCY=1,16,64,256
STATUS_TUNNELS=0,1000,5000
STREAM_TUNNELS=300
STREAM_DURATION=""
STREAM_PRIME=320
GROWTH_TUNNELS=1000,2000,4000,8000,max
GROWTH_RULES=10,100,1000,10000
GROWTH_BURST=2000
usage() {
    sed -n '2,12p' "$SELF" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --quick          one short run of everything (smoke test)
  --runs N         repetitions, medians over them (default 3; quick 1)
  --duration S     seconds each figure is counted for (default 3; quick 1)
  --warmup S       seconds of load before counting (default 0.5; quick 0.2)
  --idle N         idle tunnels for the RSS figure (default 10000; quick 2000)
  --out FILE       report path (default benches/RESULTS.md; quick benches/RESULTS.quick.md)
  --no-micro       skip the criterion micro-benchmarks
  --disk-logs      keep the proxies' logs on disk instead of a private tmpfs
  --figures LIST   only some figure groups, e.g. idle (default setup,bulk,idle,status,stream;
                   status is portcullis' status page under load; stream is small frames
                   at a steady rate through long-lived tunnels; growth, not in the default,
                   is how portcullis' set-up CPU, latency and RSS grow with open tunnels
                   and with rules: --figures growth --peers portcullis --no-micro)
  --status-tunnels L  open tunnels at which the status page is measured (default 0,1000,5000)
  --stream-tunnels N  tunnels of the stream figure, 30 frames/s each (default 300)
  --stream-duration S seconds the stream figure counts for (default 10; quick 2)
  --stream-prime KIB  bytes each streaming tunnel carries first (default 320; 0: young tunnels)
  --growth-tunnels L  open tunnels of the growth figure (default 1000,2000,4000,8000,max;
                      max: as many as the open-file limits allow)
  --growth-rules L    rule counts of the growth figure (default 10,100,1000,10000)
  --growth-burst N    set-ups counted per burst of the growth figure (default 2000)
  --concurrency L  set-up concurrency levels (default 1,16,64,256)
  --peers LIST     only some peers, e.g. direct,portcullis (for investigating; default all)
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --idle) IDLE=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-micro) MICRO=0 ;;
        --disk-logs) DISK_LOGS=1 ;;
        --figures) FIGURES=$2; shift ;;
        --peers) PEERS=$2; shift ;;
        --concurrency) CONCURRENCY=$2; shift ;;
        --status-tunnels) STATUS_TUNNELS=$2; shift ;;
        --stream-tunnels) STREAM_TUNNELS=$2; shift ;;
        --stream-duration) STREAM_DURATION=$2; shift ;;
        --stream-prime) STREAM_PRIME=$2; shift ;;
        --growth-tunnels) GROWTH_TUNNELS=$2; shift ;;
        --growth-rules) GROWTH_RULES=$2; shift ;;
        --growth-burst) GROWTH_BURST=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
# Checked here, before the build, rather than by the load generator after it.
for group in ${FIGURES//,/ }; do
    case "$group" in
        setup|bulk|idle|status|stream|growth) ;;
        *) echo "run.sh: unknown figure group $group (setup, bulk, idle, status, stream, growth)" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    RUNS=${RUNS:-1}; DURATION=${DURATION:-1}; WARMUP=${WARMUP:-0.2}; IDLE=${IDLE:-2000}
    STREAM_DURATION=${STREAM_DURATION:-2}
    OUT=${OUT:-$ROOT/benches/RESULTS.quick.md}
else
    RUNS=${RUNS:-3}; DURATION=${DURATION:-3}; WARMUP=${WARMUP:-0.5}; IDLE=${IDLE:-10000}
    STREAM_DURATION=${STREAM_DURATION:-10}
    OUT=${OUT:-$ROOT/benches/RESULTS.md}
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------------------------------------
# Inside the namespace (the script re-executes itself here; see the end of the file).
if [ "${PORTCULLIS_BENCH_INNER:-}" = 1 ]; then
    ip link set lo up
    # Loopback at tens of thousands of connections a second: wide port range, TIME_WAIT reuse,
    # deep accept queues. These are the namespace's own settings, not the machine's.
    echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range
    echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse
    echo 65535 > /proc/sys/net/core/somaxconn
    echo 65535 > /proc/sys/net/ipv4/tcp_max_syn_backlog
    # tinyproxy asks the C library; inside this mount namespace the C library asks dnsmasq.
    echo "nameserver 127.0.0.53" > "$BENCH_WORK/resolv.conf"
    mount --bind "$BENCH_WORK/resolv.conf" /etc/resolv.conf
    # Configs and logs on a tmpfs private to this namespace: tinyproxy fsync()s its log after
    # every line, and on a disk that alone costs milliseconds per tunnel; the figures should be
    # the proxies', not the disk's. (--disk-logs keeps them on disk to show that.)
    mkdir -p "$BENCH_WORK/run"
    if [ "$BENCH_DISK_LOGS" != 1 ]; then
        mount -t tmpfs -o size=8g,mode=755 portcullis-bench "$BENCH_WORK/run"
    fi
    set +e
    "$BENCH_EXE" run \
        --work "$BENCH_WORK/run" \
        --portcullis "$BENCH_PORTCULLIS" \
        --out "$OUT" \
        --runs "$RUNS" --duration "$DURATION" --warmup "$WARMUP" --idle "$IDLE" \
        --criterion "$BENCH_CRITERION" --criterion-since "$BENCH_SINCE" \
        --portcullis-version "$BENCH_VERSION" \
        --figures "$FIGURES" \
        --peers "$PEERS" --concurrency "$CONCURRENCY" --status-tunnels "$STATUS_TUNNELS" \
        --stream-tunnels "$STREAM_TUNNELS" --stream-duration "$STREAM_DURATION" \
        --stream-prime-kib "$STREAM_PRIME" \
        --growth-tunnels "$GROWTH_TUNNELS" --growth-rules "$GROWTH_RULES" \
        --growth-burst "$GROWTH_BURST" \
        --command "$BENCH_COMMAND" \
        $( [ "$QUICK" = 1 ] && echo --quick )
    status=$?
    if [ $status -ne 0 ]; then
        # The tmpfs goes with the namespace: keep what explains the failure.
        mkdir -p "$BENCH_WORK/failed"
        (cd "$BENCH_WORK/run" && find . -type f -size -20M -exec cp --parents {} "$BENCH_WORK/failed/" \;)
    fi
    exit $status
fi

# ---------------------------------------------------------------------------------------------
# Outside: root, packages, build, micro-benchmarks, then into the namespace.
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        echo "run.sh: needs root for apt-get and namespaces; re-running with sudo" >&2
        exec sudo -E "$SELF" "$@"
    fi
    echo "run.sh: run as root (apt-get, unshare)" >&2
    exit 1
fi

missing=()
command -v squid >/dev/null || missing+=(squid)
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v getconf >/dev/null || missing+=(libc-bin)
if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts packaged daemons on install; ours run in the namespace, theirs are not needed.
# (Left alone: they listen outside the namespace and do not affect it.)

cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "run.sh: building portcullis (release) and the load generator" >&2
cargo build --release --bin portcullis
EXE=$(cargo bench --bench proxybench --no-run --message-format=json \
    | grep -o '"executable":"[^"]*proxybench[^"]*"' | tail -n1 | cut -d'"' -f4)
if [ -z "$EXE" ] || [ ! -x "$EXE" ]; then
    cargo bench --bench proxybench --no-run   # show the error
    echo "run.sh: could not find the proxybench executable" >&2
    exit 1
fi
SINCE=$(date +%s)
if [ "$MICRO" = 1 ]; then
    echo "run.sh: criterion micro-benchmarks (cargo bench --bench matching)" >&2
    if [ "$QUICK" = 1 ]; then
        cargo bench --bench matching -- --warm-up-time 0.2 --measurement-time 0.5 --noplot
    else
        cargo bench --bench matching -- --noplot
    fi
fi

# Open files: 10,000 idle tunnels are 20,000+ sockets in the proxy. Raise the hard limit when
# the kernel lets us (it does not in every container), then the soft one to it.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "run.sh: open-file limit $(ulimit -n)" >&2

WORK=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
VERSION=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
COMMAND="benches/run.sh"
[ "$QUICK" = 1 ] && COMMAND="$COMMAND --quick"
[ "$DISK_LOGS" = 1 ] && COMMAND="$COMMAND --disk-logs"
# A report of some figures or peers says so (the report's header names the other settings).
[ "$FIGURES" != setup,bulk,idle,status,stream ] && COMMAND="$COMMAND --figures $FIGURES"
[ "$PEERS" != direct,squid,tinyproxy,portcullis,portcullis-nolog,floor ] && COMMAND="$COMMAND --peers $PEERS"
[ "$STREAM_PRIME" != 320 ] && COMMAND="$COMMAND --stream-prime $STREAM_PRIME"

echo "run.sh: running in a private loopback-only namespace; report: $OUT" >&2
set +e
env PORTCULLIS_BENCH_INNER=1 BENCH_WORK="$WORK" BENCH_EXE="$EXE" \
    BENCH_PORTCULLIS="$TARGET_DIR/release/portcullis" BENCH_CRITERION="$TARGET_DIR/criterion" \
    BENCH_SINCE="$SINCE" BENCH_VERSION="$VERSION" BENCH_COMMAND="$COMMAND" \
    BENCH_DISK_LOGS="$DISK_LOGS" \
    unshare --net --mount --pid --fork --mount-proc --propagation private \
    bash "$SELF" $( [ "$QUICK" = 1 ] && echo --quick ) --runs "$RUNS" --duration "$DURATION" \
        --warmup "$WARMUP" --idle "$IDLE" --out "$OUT" --figures "$FIGURES" --peers "$PEERS" \
        --concurrency "$CONCURRENCY" --status-tunnels "$STATUS_TUNNELS" \
        --stream-tunnels "$STREAM_TUNNELS" --stream-duration "$STREAM_DURATION" \
        --stream-prime "$STREAM_PRIME" --growth-tunnels "$GROWTH_TUNNELS" \
        --growth-rules "$GROWTH_RULES" --growth-burst "$GROWTH_BURST"
status=$?
set -e
if [ $status -ne 0 ]; then
    echo "run.sh: the benchmark failed (exit $status); configs and logs: $WORK/failed" >&2
    trap - EXIT
    exit $status
fi
echo "run.sh: wrote $OUT" >&2
