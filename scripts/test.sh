#!/usr/bin/env bash
# Runs DeliverTrack's whole test suite: the one command for developers and CI.
#
#   ./scripts/test.sh            services up, fmt, clippy, nextest, doctests
#   ./scripts/test.sh --quick    skip fmt and clippy
#   ./scripts/test.sh -- FILTER  extra arguments go to `cargo nextest run`
#
# On a fresh machine it first makes sure that what the tests need is there:
# the local services (PostgreSQL, Redis, RabbitMQ on 127.0.0.1), started with
# the machine's own commands if they are down; cargo-nextest; the Debian
# packages listed in `install_packages`. Every step is idempotent: a second run
# finds everything in place and goes straight to the tests.
#
# Everything is built in one profile (dev/test): clippy's check, the test
# binaries and the doctests share the dependency graph and nothing is built in
# release.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    cat <<'EOF'
Usage: scripts/test.sh [options] [-- nextest arguments]

Options:
  --quick        skip `cargo fmt --check` and `cargo clippy`
  --ci           use the nextest `ci` profile (JUnit report in target/nextest/ci/junit.xml);
                 also chosen when the CI environment variable is set
  --no-start     check the services but do not start one that is down
  --services     only bring up the services (and packages), run no tests
  -h, --help     this text

Environment:
  SERVICE_TIMEOUT  seconds to wait for a service to answer after starting it (default 90)
  DATABASE_URL, REDIS_HOST, REDIS_PORT, RABBITMQ_URL
                   passed to the tests; default to the local services
EOF
}

quick=0
start_services=1
only_services=0
nextest_profile=default
if [[ -n "${CI:-}" ]]; then nextest_profile=ci; fi
nextest_args=()
while (($#)); do
    case "$1" in
        --quick) quick=1 ;;
        --ci) nextest_profile=ci ;;
        --no-start) start_services=0 ;;
        --services) only_services=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; nextest_args=("$@"); break ;;
        *) printf 'unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

SERVICE_TIMEOUT="${SERVICE_TIMEOUT:-90}"

if [[ -t 2 ]]; then bold=$'\033[1m' red=$'\033[31m' plain=$'\033[0m'; else bold='' red='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die() { printf '%serror:%s %s\n' "$red" "$plain" "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------

apt_updated=0

# need_apt PKG...: installs the Debian packages that are not installed yet.
need_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0
    info "installing Debian packages: ${missing[*]}"
    if ((!apt_updated)); then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# need_cargo_tool BINARY CRATE: installs a cargo subcommand from crates.io if absent.
need_cargo_tool() {
    local binary="$1" crate="$2"
    command -v "$binary" >/dev/null && return 0
    info "installing $crate (cargo install --locked)"
    cargo install --locked "$crate"
}

# need_component SUBCOMMAND COMPONENT: `cargo SUBCOMMAND` from a rustup component.
need_component() {
    local subcommand="$1" component="$2"
    cargo "$subcommand" --version >/dev/null 2>&1 && return 0
    info "installing the $component component"
    rustup component add "$component" ||
        die "cargo $subcommand is missing and rustup could not add $component"
}

install_packages() {
    step "Tools and packages"
    command -v cargo >/dev/null || die "cargo is not on PATH"
    need_cargo_tool cargo-nextest cargo-nextest
    if ((!quick)); then
        need_component fmt rustfmt
        need_component clippy clippy
    fi
    # Debian packages the tests need:
    need_apt prometheus # the dashboard test (tests/dashboards.rs) evaluates every panel
    need_apt chromium   # the map page in a browser (tests/demo.rs), under its CSP
    # schemathesis for tests/conformance.rs, in target/conformance-venv (kept between runs)
    need_apt python3-venv
    scripts/conformance.sh --install
    #   need_apt postgresql-15-postgis-3      (PostGIS geofence baseline)
    info "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
}

# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------

# Each service has a probe (succeeds when it answers) and a start command (the
# machine's own, see the README). `ensure_service NAME` starts it if the probe
# fails and waits, up to SERVICE_TIMEOUT seconds, until it answers.

tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

probe_postgres() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p 5432 -t 2
    else
        tcp_open 127.0.0.1 5432
    fi
}
start_postgres() {
    local version
    # shellcheck disable=SC2012 # version directories are plain numbers
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
    [[ -n "$version" ]] || die "PostgreSQL is not installed (no /etc/postgresql/<version>)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

probe_redis() {
    if command -v redis-cli >/dev/null; then
        [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]
    else
        tcp_open 127.0.0.1 6379
    fi
}
start_redis() {
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

# RabbitMQ opens its port before the broker is ready: send the AMQP 0-9-1
# protocol header and expect the first byte of a method frame (Connection.Start).
probe_rabbitmq() {
    # shellcheck disable=SC2016 # the inner script expands its own variables
    timeout 3 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/5672 || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        [[ "$(head -c 1 <&3 | od -An -tx1 | tr -d " \n")" == 01 ]]
    ' 2>/dev/null
}
start_rabbitmq() {
    as_root rabbitmq-server -detached
}

declare -A service_label=(
    [postgres]="PostgreSQL on 127.0.0.1:5432"
    [redis]="Redis on 127.0.0.1:6379"
    [rabbitmq]="RabbitMQ on 127.0.0.1:5672"
)
declare -A service_log=(
    [postgres]="/var/log/postgresql/"
    [redis]="/var/log/redis/ci.log"
    [rabbitmq]="/var/log/rabbitmq/"
)

ensure_service() {
    local name="$1" label="${service_label[$1]}"
    if "probe_$name"; then
        info "$label: up"
        return 0
    fi
    ((start_services)) || die "$label is not answering (and --no-start was given)"
    info "$label: down, starting it"
    # A start command may complain when the service is half-up already; the
    # probe below decides.
    "start_$name" >&2 || info "$label: the start command failed; waiting for it anyway"
    local waited=0
    until "probe_$name"; do
        if ((waited >= SERVICE_TIMEOUT)); then
            die "$label did not answer within ${SERVICE_TIMEOUT}s after starting it; see ${service_log[$name]}"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    info "$label: up after ${waited}s"
}

start_services_step() {
    step "Services"
    ensure_service postgres
    ensure_service redis
    ensure_service rabbitmq
}

# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------

# What the tests connect to, unless the caller says otherwise. `postgres` is a
# superuser (trust auth), so `#[sqlx::test]` can create its throwaway databases.
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
export REDIS_PORT="${REDIS_PORT:-6379}"
export RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
# The tools the tests need beyond the services (chromium, schemathesis) were installed
# above: a test that finds one missing fails instead of skipping.
export DELIVERTRACK_TEST_TOOLS="${DELIVERTRACK_TEST_TOOLS:-required}"
# A clean clone gains nothing from incremental compilation, whose caches would
# double the size of target/; developers keep their own setting.
if [[ $nextest_profile == ci ]]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

failed=()

# run_check NAME CMD...: runs one stage of the suite; a failure is recorded and
# the remaining stages still run, so one report shows everything that is wrong.
run_check() {
    local name="$1"
    shift
    step "$name: $*"
    local started=$SECONDS
    if "$@"; then
        info "$name passed in $((SECONDS - started))s"
    else
        info "$name FAILED after $((SECONDS - started))s"
        failed+=("$name")
    fi
}

# The debug build takes about 1.5 GB; a disk fuller than that shows up late and
# obscurely (the linker dies with SIGBUS), so say it plainly first.
disk_check() {
    local free_kb
    free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
    info "free disk space here: $((free_kb / 1024)) MB"
    if ((free_kb < 3 * 1024 * 1024)); then
        printf '%swarning:%s less than 3 GB free; the build may fail for want of disk\n' "$red" "$plain" >&2
    fi
}

main() {
    local started=$SECONDS
    disk_check
    install_packages
    start_services_step
    if ((only_services)); then return 0; fi

    if ((!quick)); then
        run_check fmt cargo fmt --all -- --check
        run_check clippy cargo clippy --workspace --all-targets -- -D warnings
    fi
    run_check tests cargo nextest run --workspace --profile "$nextest_profile" \
        ${nextest_args[@]+"${nextest_args[@]}"}
    # nextest does not run doctests.
    run_check doctests cargo test --workspace --doc

    step "Summary ($((SECONDS - started))s)"
    if ((${#failed[@]})); then
        die "failed: ${failed[*]}"
    fi
    info "all checks passed"
}

main
