#!/usr/bin/env bash
# Tests the API from outside against its own OpenAPI document: schemathesis (PyPI) reads
# GET /openapi.json of a running `delivertrack run` and sends what the document allows and
# what it forbids, with an admin, a customer and a courier token in turn, every check on:
# no server error, every answer conforming to the document (status,
# content type, headers, body), bad input refused, good input accepted, and 401 without a
# token. Any failure makes the script exit 1. (Every check is schemathesis's default; the
# exceptions in the config file would not apply under `--checks all`.)
#
#   ./scripts/conformance.sh --install      create target/conformance-venv (pinned schemathesis)
#   ./scripts/conformance.sh [SECONDS]      start `run` on the local services, test each
#                                           token for SECONDS (default 20), stop it
#   ./scripts/conformance.sh --url http://127.0.0.1:8080 [SECONDS]
#                                           test a running API (JWT_SECRET must be its secret)
#
# Exceptions that are not defects are in scripts/conformance/schemathesis.toml, each with
# its reason. Reports (JUnit, and the failing cases as cURL commands in the output) go to
# target/conformance/<role>/.
#
# Environment:
#   DELIVERTRACK_BIN  the binary (default: `cargo build`, then target/debug/delivertrack)
#   JWT_SECRET        the secret tokens are signed with (default: a random one given to `run`)
#   CONFORMANCE_VENV  the virtualenv (default: target/conformance-venv)
#   DATABASE_URL      the PostgreSQL server `run` creates its own database on
#                     (default postgres://postgres@127.0.0.1:5432/postgres)
#   RABBITMQ_URL, REDIS_HOST, REDIS_PORT    the other local services
#   DELIVERTRACK_EXCHANGE, DELIVERTRACK_QUEUE, DELIVERTRACK_DEAD_LETTER_EXCHANGE,
#   DELIVERTRACK_DEAD_LETTER_QUEUE, DELIVERTRACK_DERIVED_EXCHANGE
#                     RabbitMQ names for `run` (default: unique names of this run, whose
#                     queues are deleted afterwards when rabbitmqctl is at hand)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
venv="${CONFORMANCE_VENV:-target/conformance-venv}"
config="scripts/conformance/schemathesis.toml"

install() {
    if [[ -x "$venv/bin/st" ]] && [[ "$("$venv/bin/st" --version 2>/dev/null)" == *" $SCHEMATHESIS_VERSION" ]]; then
        return 0
    fi
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION in $venv" >&2
    command -v python3 >/dev/null || { echo "error: python3 is needed" >&2; exit 1; }
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
}

url=""
seconds=20
while (($#)); do
    case "$1" in
        --install) install; exit 0 ;;
        --url) url="${2:?--url needs a URL}"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *)
            [[ "$1" =~ ^[0-9]+$ ]] || { echo "usage: scripts/conformance.sh [--install] [--url URL] [SECONDS]" >&2; exit 2; }
            seconds="$1"
            ;;
    esac
    shift
done

[[ -x "$venv/bin/st" ]] || { echo "error: no schemathesis in $venv; run scripts/conformance.sh --install" >&2; exit 1; }

if [[ -z "${DELIVERTRACK_BIN:-}" ]]; then
    cargo build --quiet --bin delivertrack
    DELIVERTRACK_BIN=target/debug/delivertrack
fi

run_pid=""
work=""
cleanup() {
    if [[ -n "$run_pid" ]]; then
        kill -TERM "$run_pid" 2>/dev/null || true
        wait "$run_pid" 2>/dev/null || true
    fi
    if [[ -n "$work" ]]; then
        if command -v psql >/dev/null; then
            psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
        fi
        if [[ -n "$own_queues" ]] && command -v rabbitmqctl >/dev/null; then
            rabbitmqctl -q delete_queue "$DELIVERTRACK_QUEUE" >/dev/null 2>&1 || true
            rabbitmqctl -q delete_queue "$DELIVERTRACK_DEAD_LETTER_QUEUE" >/dev/null 2>&1 || true
        fi
        if command -v redis-cli >/dev/null; then
            redis-cli -h "${REDIS_HOST:-127.0.0.1}" -p "${REDIS_PORT:-6379}" --scan --pattern "conformance-$id:*" |
                xargs -r redis-cli -h "${REDIS_HOST:-127.0.0.1}" -p "${REDIS_PORT:-6379}" del >/dev/null 2>&1 || true
        fi
        rm -rf "$work"
    fi
}
trap cleanup EXIT

if [[ -z "$url" ]]; then
    id="$(date +%s)$$"
    export JWT_SECRET="${JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
    export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    database="delivertrack_conformance_$id"
    own_queues=""
    if [[ -z "${DELIVERTRACK_QUEUE:-}" ]]; then own_queues=1; fi
    export DELIVERTRACK_EXCHANGE="${DELIVERTRACK_EXCHANGE:-conformance-$id.events}"
    export DELIVERTRACK_QUEUE="${DELIVERTRACK_QUEUE:-conformance-$id.ingest}"
    export DELIVERTRACK_DEAD_LETTER_EXCHANGE="${DELIVERTRACK_DEAD_LETTER_EXCHANGE:-conformance-$id.dead}"
    export DELIVERTRACK_DEAD_LETTER_QUEUE="${DELIVERTRACK_DEAD_LETTER_QUEUE:-conformance-$id.dead}"
    export DELIVERTRACK_DERIVED_EXCHANGE="${DELIVERTRACK_DERIVED_EXCHANGE:-conformance-$id.derived}"
    work="$(mktemp -d)"
    # The database of its own: `run` creates it on the server of DATABASE_URL.
    run_database_url="${DATABASE_URL%/*}/$database"
    # Rate limits far above what the test sends: they are tested elsewhere, and a 429
    # here would only hide the operation behind it.
    DATABASE_URL="$run_database_url" "$DELIVERTRACK_BIN" run --listen 127.0.0.1:0 --no-mongo \
        --redis-prefix "conformance-$id:" --log-format json \
        --location-update-limit 100000/s --delivery-creation-limit 100000/s --rating-limit 100000/s \
        >"$work/stdout" 2>"$work/stderr" &
    run_pid=$!
    for _ in $(seq 600); do
        url="$(grep -o 'http://[0-9.:]*' "$work/stdout" | head -n1 || true)"
        [[ -n "$url" ]] && break
        kill -0 "$run_pid" 2>/dev/null || { cat "$work/stderr" >&2; echo "error: delivertrack run exited" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$url" ]] || { tail -n 20 "$work/stderr" >&2; echo "error: delivertrack run did not start" >&2; exit 1; }
fi
url="${url%/}"
[[ -n "${JWT_SECRET:-}" ]] || { echo "error: JWT_SECRET must be the secret of $url" >&2; exit 1; }

for _ in $(seq 300); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" == 200 ]] && break
    sleep 0.1
done

token() {
    "$DELIVERTRACK_BIN" token --role "$1" --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')" --jwt-expiry 1h
}

failed=()
for role in admin customer courier; do
    echo "==> schemathesis as $role for ${seconds}s against $url/openapi.json" >&2
    report="target/conformance/$role"
    mkdir -p "$report"
    if ! "$venv/bin/st" --config-file "$config" run "$url/openapi.json" \
        --max-time "$seconds" --workers 1 \
        --header "Authorization: Bearer $(token "$role")" \
        --report junit --report-dir "$report"; then
        failed+=("$role")
    fi
done

if ((${#failed[@]})); then
    echo "error: the API does not conform to its document (as: ${failed[*]}); see above" >&2
    exit 1
fi
echo "==> the API conforms to its document as admin, customer and courier" >&2
