#!/usr/bin/env bash
# nopf on a fresh Debian/Ubuntu machine, in one command:
#   ./dev.sh run  [nopf-web options]   set up, then start the dashboard (http://127.0.0.1:8080)
#   ./dev.sh test [pytest options]     set up, then run ruff, mypy (Linux, Windows, macOS)
#                                      and the whole test suite
#   ./dev.sh bench [bench.suite options]  set up, then run the benchmark suite (docs/BENCHMARKS.md)
#   ./dev.sh nightly [pytest options]  100,000 fuzz cases per surface, then the hour-long soak
# Setup installs what is missing: Debian packages (apt-get, needs root), a venv in .venv,
# and the Python packages. Re-running is cheap: present things are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "dev.sh: error: $*" >&2; exit 1; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

setup() {
  local extra="$1"; shift
  apt_install "$@"
  local py="${PYTHON:-python3}"
  python_ok "$py" || die "need Python 3.11 or newer as python3 (or set PYTHON=...)"
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv 2>/dev/null || { apt_install python3-venv; "$py" -m venv .venv; }
  fi
  local stamp=".venv/.installed$extra"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".$extra"
    touch "$stamp"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  run)
    setup "" iproute2 python3
    exec .venv/bin/nopf-web "$@"
    ;;
  test)
    # nftables/iproute2/iptables/tcpdump: the namespace NAT lab; chromium: the browser test;
    # socat/openssh: the paths the benchmark suite compares against (its quick-mode test);
    # redis-server: the shared rendezvous' tests start their own (nopf-server --redis).
    setup "[test]" iproute2 nftables iptables tcpdump chromium python3 \
      socat openssh-server openssh-client redis-server
    .venv/bin/ruff check .
    .venv/bin/mypy
    # The package as Windows and macOS see it: their platform branches are checked too.
    .venv/bin/mypy --platform win32 nopf_web
    .venv/bin/mypy --platform darwin nopf_web
    exec .venv/bin/pytest -q -ra "$@"
    ;;
  bench)
    # The lab, plus socat and OpenSSH: relays the suite measures nopf against.
    setup "[bench]" iproute2 nftables iptables tcpdump socat openssh-server openssh-client \
      python3 redis-server
    # fowl, compared too, in its own venv (never in .venv). Optional: if it does not
    # install, the suite measures the rest and says why fowl is missing.
    if [ ! -x .venv-fowl/bin/fowl ]; then
      { python3 -m venv .venv-fowl && .venv-fowl/bin/pip install -q fowl \
          magic-wormhole-mailbox-server; } \
        || echo "dev.sh: fowl did not install; the suite will report it as not measured" >&2
    fi
    exec .venv/bin/python -m bench.suite "$@"
    ;;
  nightly)
    # The long runs CI has no time for: 100,000 fuzz cases per surface and the
    # hour-long soak (tests/e2e/test_soak.py with NOPF_SOAK_SECONDS).
    setup "[test]" iproute2 nftables iptables tcpdump python3
    NOPF_FUZZ_EXAMPLES="${NOPF_FUZZ_EXAMPLES:-100000}" .venv/bin/pytest -q -ra tests/fuzz "$@"
    exec env NOPF_SOAK_SECONDS="${NOPF_SOAK_SECONDS:-3600}" \
      .venv/bin/pytest -q -ra tests/e2e/test_soak.py "$@"
    ;;
  *)
    echo "usage: ./dev.sh run [nopf-web options] | ./dev.sh test [pytest options]" \
      "| ./dev.sh nightly | ./dev.sh bench [--quick] [--only NAME,...]" >&2
    exit 2
    ;;
esac
