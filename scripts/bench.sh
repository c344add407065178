#!/usr/bin/env bash
# Measures DeliverTrack on this machine with the load-testing harness: the figures of
# BENCHMARKS.md, each beside the baseline it is read against, from the same run.
#
#   ./scripts/bench.sh              everything (about 10 minutes), release build
#   ./scripts/bench.sh --quick      the same runs, small and short (a check of the script)
#   ./scripts/bench.sh --dev        use the dev build instead of building release
#   ./scripts/bench.sh --only NAMES measurements, comma-separated: baselines, max, max-prefetch,
#                                   half, batched, curve, http, trackers, track, analysts,
#                                   analysts-courier
#
# What it does:
#   1. brings the local services up (scripts/test.sh --services) and installs PostGIS
#      (Debian's postgresql-15-postgis-3) for the geofence baseline;
#   2. builds `delivertrack` and `load-tests` in release (unless --dev);
#   3. for each measurement, starts `delivertrack run` on a topology, database and Redis
#      prefix of its own (file descriptors raised to the hard limit), runs the scenario,
#      stops the service and removes what it created;
#   4. leaves every JSON report, PNG chart and service log in target/bench/<time>/ and
#      prints a summary table (also written to target/bench/<time>/summary.md).
#
# Environment: RABBITMQ_URL (default the local broker), BENCH_PORT (18180), BENCH_SERVICE
# (a prebuilt `delivertrack` binary to measure instead of the one built, e.g. an earlier
# commit's for a before-and-after in one session; the harness is still the one built),
# BENCH_OUT (target/bench/<time>), BENCH_PG=socket (the service reaches PostgreSQL over
# its Unix socket instead of TCP).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
quick=0
only=""
while (($#)); do
    case "$1" in
        --quick) quick=1 ;;
        --dev) profile=debug ;;
        --only) shift; only="${1:-}" ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) printf 'unknown option: %s\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
PORT="${BENCH_PORT:-18180}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${BENCH_OUT:-target/bench/$STAMP}"
SECRET="bench-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
ADMIN_URL="postgres://postgres@127.0.0.1:5432/postgres"
mkdir -p "$OUT"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- 1. services and PostGIS -------------------------------------------------------------
step "services"
./scripts/test.sh --services
if [[ ! -e /usr/share/postgresql/15/extension/postgis.control ]]; then
    step "installing PostGIS (postgresql-15-postgis-3)"
    apt-get install -y postgresql-15-postgis-3 >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y postgresql-15-postgis-3 >/dev/null; } \
        || die "PostGIS could not be installed"
fi

# --- 2. build ------------------------------------------------------------------------------
if [[ "$profile" == release ]]; then
    step "cargo build --release -p delivertrack -p delivertrack-load-tests"
    cargo build --release -p delivertrack -p delivertrack-load-tests
else
    cargo build -p delivertrack -p delivertrack-load-tests
fi
BIN="target/$profile"
SERVICE="${BENCH_SERVICE:-$BIN/delivertrack}"
[[ -x "$SERVICE" && -x "$BIN/load-tests" ]] || die "the binaries are missing ($SERVICE, $BIN/load-tests)"
[[ -n "${BENCH_SERVICE:-}" ]] && step "measuring the service $SERVICE"

# Both processes may hold as many sockets as the machine lets them.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- 3. one service per measurement --------------------------------------------------------
SERVICE_PID=""
NAME=""

start_service() {
    NAME="bench-$STAMP-$1"
    local db="${NAME//-/_}"
    db="${db,,}"
    if [[ "${BENCH_PG:-tcp}" == socket ]]; then
        # PostgreSQL over its Unix socket (no Nagle delays on small writes).
        DATABASE_URL_RUN="postgres://postgres@localhost/$db?host=/var/run/postgresql"
    else
        DATABASE_URL_RUN="postgres://postgres@127.0.0.1:5432/$db"
    fi
    "$SERVICE" run --listen "127.0.0.1:$PORT" --no-mongo \
        --exchange "$NAME.events" --queue "$NAME.ingest" \
        --dead-letter-exchange "$NAME.dead" --dead-letter-queue "$NAME.dead" \
        --derived-exchange "$NAME.derived" --database-url "$DATABASE_URL_RUN" \
        --redis-prefix "$NAME:" --jwt-secret "$SECRET" --epoch-max-ms "${EPOCH_MS:-50}" \
        ${PREFETCH:+--prefetch "$PREFETCH"} \
        >"$OUT/$1.service.out" 2>"$OUT/$1.service.log" &
    SERVICE_PID=$!
    for _ in $(seq 1 300); do
        if grep -q "is running on" "$OUT/$1.service.out" 2>/dev/null; then return 0; fi
        kill -0 "$SERVICE_PID" 2>/dev/null || die "the service did not start: see $OUT/$1.service.log"
        sleep 0.2
    done
    die "the service did not start within 60 s"
}

stop_service() {
    [[ -n "$SERVICE_PID" ]] || return 0
    kill -TERM "$SERVICE_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$SERVICE_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVICE_PID" 2>/dev/null || true
    wait "$SERVICE_PID" 2>/dev/null || true
    SERVICE_PID=""
    local db="${NAME//-/_}"
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS ${db,,} WITH (FORCE)" >/dev/null 2>&1 || true
    for q in "$NAME.ingest" "$NAME.dead"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
    # rabbitmqctl has no delete_exchange; the broker's own function does it.
    for x in "$NAME.events" "$NAME.dead" "$NAME.derived"; do
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"bench\">>)." >/dev/null 2>&1 || true
    done
    redis-cli --scan --pattern "$NAME:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap stop_service EXIT

harness() {
    local scenario=$1 name=$2
    shift 2
    step "load-tests $scenario ($name): $*"
    JWT_SECRET="$SECRET" RABBITMQ_URL="$RABBITMQ_URL" "$BIN/load-tests" "$scenario" \
        --target "http://127.0.0.1:$PORT" --exchange "$NAME.events" \
        --database-url "$DATABASE_URL_RUN" --server-pid "$SERVICE_PID" \
        --out "$OUT" --name "$name" "$@" | tee "$OUT/$name.txt"
}

# --only takes one name or several, comma-separated (`--only max,batched,curve`).
wants() { [[ -z "$only" || ",$only," == *",$1,"* ]]; }

if ((quick)); then
    D=5; BROKER=3; ZONES=2000; POINTS=10000; ROUNDS=1; COURIERS=200; TRACKERS=500; GQL=100
else
    D=30; BROKER=10; ZONES=20000; POINTS=100000; ROUNDS=5; COURIERS=2000; TRACKERS=19000; GQL=1000
fi

# Baselines that need the machine to themselves: broker ceiling (1 event per message),
# geofence (zone index against PostGIS).
if wants baselines; then
    start_service baselines
    harness baselines baselines --baselines broker,geofence --broker-seconds "$BROKER" \
        --geofence-zones "$ZONES" --geofence-points "$POINTS" --geofence-rounds "$ROUNDS"
    stop_service
fi

# The maximum sustained rate with every local sink, beside the broker ceiling measured
# with the same publisher and message shape: the fleet unpaced.
MAX_RATE=""
if wants max || wants half || wants curve; then
    start_service max
    harness fleet max --unpaced --couriers "$COURIERS" --duration "$D" --ramp-up 0 \
        --baselines broker --broker-seconds "$BROKER" --seed 101
    stop_service
    MAX_RATE="$(jq -r '.events.processed_per_s // 0' "$OUT/max.json")"
fi

# What bounds the maximum: the same with five times the prefetch (more events in flight,
# larger epochs). If the rate grows with it, the pipeline waits on its commit cycle.
if wants max-prefetch; then
    PREFETCH=50000 start_service max-prefetch
    harness fleet max-prefetch --unpaced --couriers "$COURIERS" --duration "$D" --ramp-up 0 \
        --seed 109
    stop_service
fi

# Publish → WebSocket at half that rate (fixes at 1/s per courier: couriers = rate / 2).
if wants half; then
    half_couriers="$(python3 -c "print(max(10, int(float('${MAX_RATE:-0}') / 2)))")"
    start_service half
    harness fleet half --couriers "$half_couriers" --duration "$D" --ramp-up 5 --seed 102
    stop_service
fi

# Publish → WebSocket against the rate, from 250 events/s up to the maximum (doubling, then
# 90 % of the maximum): where the knee is. One courier per event/s (a fix every second).
if wants curve; then
    rates="$(python3 -c "
m = float('${MAX_RATE:-0}') * 0.9
r, out = 250, []
while r < m:
    out.append(r); r *= 2
if m >= 250: out.append(int(m))
print(' '.join(str(x) for x in (out or [250])))")"
    ((quick)) && rates="25 50 100"
    for couriers in $rates; do
        start_service "curve-$couriers"
        harness fleet "curve-$couriers" --couriers "$couriers" --duration "$D" --ramp-up 5 \
            --seed "$((110 + couriers % 1000))"
        stop_service
    done
    curve_reports=("$OUT"/curve-*.json)
    [[ -e "$OUT/half.json" ]] && curve_reports+=("$OUT/half.json")
    "$BIN/load-tests" curve --out "$OUT" --name curve "${curve_reports[@]}" | tee "$OUT/curve.txt"
fi

# The same with arrays of 50 fixes per message (a gateway batching its couriers).
if wants batched; then
    start_service batched
    harness fleet batched --unpaced --batch 50 --couriers "$COURIERS" --duration "$D" \
        --ramp-up 0 --baselines broker --broker-seconds "$BROKER" --seed 103
    stop_service
fi

# Fixes through POST /locations with couriers' tokens.
if wants http; then
    start_service http
    # 1 fix/s: the per-courier limit (2/2s: one a second, the burst of two absorbs jitter).
    harness fleet http --via http --couriers "$COURIERS" --rate 1.0 --duration "$D" --ramp-up 5 --seed 104
    stop_service
fi

# Connections held: trackers on /ws/changes, memory read with all of them connected.
# Every /ws/changes client gets every epoch: a quiet fleet (20 couriers, a fix every 5 s)
# and epochs of up to a second keep the fan-out to about one message per client and
# second, so that what is measured is holding the connections.
if wants trackers; then
    EPOCH_MS=1000 start_service trackers
    harness trackers trackers --ws changes --trackers "$TRACKERS" --couriers 20 --rate 0.2 \
        --duration "$D" --ramp-up 1 --connect-rate 2000 --seed 105
    stop_service
fi

# Customers following their deliveries on /ws/track.
if wants track; then
    start_service track
    harness trackers track --ws track --trackers "$((TRACKERS / 4))" --couriers "$COURIERS" \
        --duration "$D" --ramp-up 5 --seed 106
    stop_service
fi

# GraphQL at 1k requests/s while ingesting, beside the SQL GROUP BY over delivery_events:
# the fleet's success rate (one row), then the heavier per-courier rates.
if wants analysts; then
    start_service analysts
    harness analysts analysts --analysts 20 --analyst-rate "$GQL" --couriers "$((COURIERS / 4))" \
        --duration "$D" --ramp-up 5 --metrics overall --baselines analytics \
        --analytics-requests 200 --seed 107
    stop_service
fi
if wants analysts-courier; then
    start_service analysts-courier
    harness analysts analysts-courier --analysts 10 --analyst-rate "$((GQL / 5))" \
        --couriers "$((COURIERS / 4))" --duration "$D" --ramp-up 5 --metrics courier \
        --baselines analytics --analytics-requests 200 --seed 108
    stop_service
fi

# --- 4. summary ----------------------------------------------------------------------------
step "summary ($OUT/summary.md)"
{
    printf '| run | offered ev/s | achieved ev/s | processed ev/s | ws p50 / p99 ms | graphql p50 / p99 ms | baseline |\n'
    printf '|---|---|---|---|---|---|---|\n'
    for f in "$OUT"/*.json; do
        jq -r --arg run "$(basename "$f" .json)" '
          def r: if . == null then "–" else (. * 10 | round / 10 | tostring) end;
          def lat(s): if (.latency[s].count // 0) > 0
              then "\(.latency[s].p50_ms | r) / \(.latency[s].p99_ms | r)" else "–" end;
          "| \($run) | \(.events.offered_per_s | r) | \(.events.achieved_per_s | r) | \(.events.processed_per_s | r) | \(lat("publish_to_websocket")) | \(lat("graphql_query")) | " +
          ([ (if .baselines.broker then "broker ceiling \(.baselines.broker.consumed_per_s | r) ev/s" else empty end),
             (if .baselines.geofence then "index \(.baselines.geofence.index.updates_per_s | r)/s, PostGIS \(.baselines.geofence.postgis_points_per_s | r)/s" else empty end),
             (if .baselines.analytics then "SQL GROUP BY p50 \(.baselines.analytics.sql.p50_ms | r) / p99 \(.baselines.analytics.sql.p99_ms | r) ms" else empty end),
             (if .websocket.trackers > 1 then "\(.websocket.held_connections) held, \(.websocket.kib_per_connection | r) KiB/conn" else empty end)
           ] | join("; ")) + " |"' "$f"
    done
    printf '\n| run | load average (start → end) | cores used while sending |\n|---|---|---|\n'
    for f in "$OUT"/*.json; do
        jq -r --arg run "$(basename "$f" .json)" '
          "| \($run) | \((.loadavg // [])[0] // "?") → \((.loadavg // [])[1] // "?") | " +
          ([(.cpu_cores // {}) | to_entries[] | "\(.key) \(.value * 100 | round / 100)"] | join(", ")) + " |"' "$f"
    done
    printf '\n| run | events per epoch | per epoch: decode / dataflow / record commit / ack wait ms | sink commits ms |\n|---|---|---|---|\n'
    for f in "$OUT"/*.json; do
        jq -r --arg run "$(basename "$f" .json)" '
          def r: if . == null then "–" else (. * 10 | round / 10 | tostring) end;
          select((.server.epochs // 0) > 0) |
          "| \($run) | \(.server.events_per_epoch | r) | " +
          "\(.server.stage_mean_ms.decode | r) / \(.server.stage_mean_ms.dataflow | r) / \(.server.stage_mean_ms.record_commit | r) / \(.server.stage_mean_ms.ack_wait | r) | " +
          ([(.server.sink_commit_mean_ms // {}) | to_entries[] | "\(.key) \(.value | r)"] | join(", ")) + " |"' "$f"
    done
} | tee "$OUT/summary.md"
