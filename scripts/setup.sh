#!/usr/bin/env bash
# Installs whatever raft_kv's build and tests need and is missing, then builds and installs the
# extension into the system PostgreSQL 15. Idempotent: on a prepared machine it only rebuilds.
#
#   scripts/setup.sh            everything (packages, cargo-pgrx, pgrx init, build + install)
#   scripts/setup.sh --no-install   skip building/installing the extension
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.0
APT_PACKAGES="postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pkg-config gcc make procps openssl python3-psycopg"
export PATH="$HOME/.cargo/bin:$PATH"

say() { echo "==> $*"; }

sudo_if_needed() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # The server package would otherwise create and start a default cluster we do not use.
  sudo_if_needed mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" | sudo_if_needed tee /etc/postgresql-common/createcluster.d/raft_kv.conf >/dev/null
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
id postgres >/dev/null 2>&1 || { echo "the postgres system user is missing after installing postgresql-15" >&2; exit 1; }

command -v cargo >/dev/null || { echo "cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  say "installing cargo-pgrx $PGRX_VERSION (takes about 5 minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  say "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# The postgres user must be able to reach files the tests hand it (data dirs under /tmp are
# created by the tests themselves); nothing else is needed for it.

if [ "${1:-}" != "--no-install" ]; then
  say "building and installing raft_kv into PostgreSQL 15"
  if [ "$(id -u)" = 0 ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
  else
    cargo pgrx install --release --sudo --pg-config "$PG_CONFIG" >/dev/null
  fi
  # A full script of another version would let CREATE EXTENSION ... VERSION install a schema this
  # library does not match: keep only this version's (upgrade scripts, a--b.sql, stay).
  version=$(awk -F"'" '/^default_version/ { print $2 }' raft_kv.control)
  for f in "$($PG_CONFIG --sharedir)"/extension/raft_kv--*.sql; do
    case "$(basename "$f")" in
      "raft_kv--$version.sql" | raft_kv--*--*.sql) ;;
      raft_kv--*.sql) if [ "$(id -u)" = 0 ]; then rm -f "$f"; else sudo rm -f "$f"; fi ;;
    esac
  done
fi
