#!/usr/bin/env bash
# lockgw developer entry point. Two commands, each installs what it needs on a fresh
# Debian 12 / Raspberry Pi OS machine with Python 3.11+:
#   ./dev.sh demo   simulated locks + gateway (+ broker when available), real unlocks, live events
#   ./dev.sh test   lint, type checks and the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

export UV_PYTHON_DOWNLOADS=never   # use the system Python; never fetch a toolchain
export UV_LINK_MODE=copy

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    # Install Debian packages that are missing; apt-get update only when needed.
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "dev.sh: installing ${missing[*]} (Debian packages)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

python_bin() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
           "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"; return 0
        fi
    done
    echo "dev.sh: Python 3.11 or newer is required" >&2; exit 2
}

ensure_uv() {
    if command -v uv >/dev/null 2>&1; then UV=$(command -v uv); return; fi
    if [ -x .tools/bin/uv ]; then UV=$PWD/.tools/bin/uv; return; fi
    local py; py=$(python_bin)
    if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    "$py" -m venv .tools
    .tools/bin/pip install -q 'uv>=0.5,<1'
    UV=$PWD/.tools/bin/uv
}

ensure_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then return; fi
    if command -v apt-get >/dev/null 2>&1; then apt_install mosquitto; fi
}

ensure_central() {
    # The receiver's tests start their own PostgreSQL and RabbitMQ in temp dirs (tests/fleetfix.py);
    # they need the binaries only, never the machine-wide services.
    command -v apt-get >/dev/null 2>&1 || return 0
    local want=()
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || want+=(postgresql)
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || want+=(rabbitmq-server)
    [ ${#want[@]} -eq 0 ] || apt_install "${want[@]}"
}

sync_env() {
    ensure_uv
    "$UV" sync --frozen --python "$(python_bin)" -q
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        ensure_mosquitto || true   # the demo runs without a broker and says so
        sync_env
        exec .venv/bin/lockgw demo "$@"
        ;;
    test)
        ensure_mosquitto
        ensure_central
        sync_env
        export UV   # tests/test_install.py builds a release bundle with it
        echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
        echo "== mypy --strict" && .venv/bin/mypy
        echo "== import-linter (layers, no cycles)"
        layers=$(.venv/bin/lint-imports --no-cache 2>&1) || { echo "$layers"; exit 1; }
        echo "$layers" | grep -E "^Contracts:"
        echo "== pytest"
        export PYTHONASYNCIODEBUG=${PYTHONASYNCIODEBUG:-1}
        exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
