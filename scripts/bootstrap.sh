#!/usr/bin/env bash
# Idempotent machine + virtualenv set-up for pgnotify_sync's tests and demo.
#
#  * openssh-server (the SSH-tunnel tests start a private sshd), openssl (the
#    TLS tests make their CA), the
#    PostgreSQL server binaries (the tests start a throwaway cluster) and
#    chromium + chromium-driver (the browser test of the web demo) are
#    installed with apt when missing - only as root; otherwise we say what is
#    missing and carry on, so the tests that need it report the problem.
#  * .venv in the repo root gets an editable install with the test and sse
#    extras; it is re-done only when setup.cfg / pyproject.toml change.
#
# Safe to run repeatedly and from any directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'bootstrap: %s\n' "$*"; }

APT_UPDATED=0
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        say "WARNING: missing $*; not root, so install it yourself: apt-get install $*"
        return 0
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_pg_server() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            return 0
        fi
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            return 0
        fi
    done
    return 1
}

# -- system packages ------------------------------------------------------------

if [ -x /usr/sbin/sshd ]; then
    say "sshd: ok"
else
    apt_install openssh-server
fi
if command -v openssl >/dev/null 2>&1; then say "openssl: ok"; else apt_install openssl; fi  # tests/test_tls.py
if ! command -v promtool >/dev/null 2>&1; then apt_install --no-install-recommends prometheus; else say "promtool: ok"; fi  # tests/test_contrib.py

if have_pg_server; then
    say "postgresql server binaries: ok"
else
    apt_install postgresql
fi

# The browser test drives Debian's chromium through chromedriver (no selenium).
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    say "chromium + chromedriver: ok"
else
    apt_install chromium chromium-driver
fi

# -- virtualenv ------------------------------------------------------------------

PYTHON=${PYTHON:-python3}

# A venv whose interpreter vanished (e.g. pyenv version removed) is rebuilt.
if [ -d .venv ] && ! .venv/bin/python -c '' >/dev/null 2>&1; then
    say "removing broken .venv"
    rm -rf .venv
fi
if [ ! -d .venv ]; then
    say "creating .venv with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
    "$PYTHON" -m venv .venv
fi

STAMP=".venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -e "$STAMP" ]; then
    say "python deps: up to date"
else
    say "pip install -e '.[test,sse]' (a minute on first run)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,sse]'
    rm -f .venv/.installed-*
    touch "$STAMP"
    say "python deps: installed"
fi
