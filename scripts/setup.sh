#!/usr/bin/env bash
# Prepare this machine for stddaq (Debian, as root): system packages, Redis and RabbitMQ
# running on 127.0.0.1, and the project's virtualenv in .venv (created or refreshed).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v pgrep >/dev/null || missing+=(procps)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v chromium >/dev/null || missing+=(chromium)          # the dashboard's browser tests
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

if ! port_open 6379; then
    echo "setup: starting redis-server"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
if ! port_open 5672; then
    echo "setup: starting rabbitmq-server"
    rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 120); do port_open 6379 && port_open 5672 && break; sleep 1; done
port_open 6379 || { echo "setup: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
port_open 5672 || { echo "setup: RabbitMQ does not answer on 127.0.0.1:5672" >&2; exit 1; }

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: stddaq needs Python >= 3.11, found $(python3 --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.stddaq-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "setup: installing stddaq and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v WARNING || true
    .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v WARNING || true
    .venv/bin/python -c 'import fastcore, numba, zmq, h5py' 
    echo "$stamp" > .venv/.stddaq-stamp
fi
