#!/usr/bin/env bash
# Set-up and entry point for developers and CI on a Debian/Ubuntu machine.
#   ./dev.sh demo     install what is missing, then run the demo (the main job)
#   ./dev.sh test     install what is missing, then run the test suite
#   ./dev.sh bench    install what is missing, then run the benchmarks (JSON)
#   ./dev.sh faults [--long] [pytest args]   the fault suite (pytest -m faults) and its table;
#                     --long: 30+ trials each (SIMAGENT_FAULT_TRIALS) and a fresh seed
#   ./dev.sh fleet [args]   the fleet simulation (100 agents, a broker restart; JSON + PNG),
#                     after installing its plot extra; under nice: it fills both cores
#   ./dev.sh cluster [pytest args]   the clustered-broker failover proof (pytest -m cluster);
#                     installs Debian's rabbitmq-server when missing (its system service stays off)
#   ./dev.sh setup    only install
# Debian packages are installed with apt-get when missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

# mosquitto: the broker the tests and the demo start; umockdev (+ its GObject bindings for
# the system python3): udev hot-plug tests; systemd: systemd-analyze; fakeroot: the .deb;
# modemmanager (+ dbus-daemon for its private bus, gcc/libc6-dev for a TIOCEXCL shim):
# ModemManager probing the fake modem (tests/fake/test_modemmanager.py).
DEB_PACKAGES=(mosquitto umockdev gir1.2-umockdev-1.0 python3-gi systemd openssl fakeroot
              modemmanager dbus-daemon gcc libc6-dev)

need_python() {
    if ! command -v python3 >/dev/null 2>&1; then
        DEB_MISSING+=(python3 python3-venv)
    elif ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "simagent needs Python >= 3.11 (found $(python3 -V))" >&2
        exit 1
    elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        DEB_MISSING+=(python3-venv)
    fi
}

install_debian_packages() {
    DEB_MISSING=()
    need_python
    for package in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || DEB_MISSING+=("$package")
    done
    [ ${#DEB_MISSING[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: ${DEB_MISSING[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${DEB_MISSING[@]}" >/dev/null
}

install_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # Reinstall only when the declared dependencies changed.
    local stamp=.venv/.simagent-installed
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

setup() {
    install_debian_packages
    install_venv
}

# The failover test starts its own RabbitMQ nodes (simagent_lab/rabbitcluster.py); a system
# broker that the package's postinst may have started is stopped and disabled.
install_rabbitmq() {
    dpkg-query -W -f='${Status}' rabbitmq-server 2>/dev/null | grep -q "install ok installed" && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: rabbitmq-server"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now rabbitmq-server.service >/dev/null 2>&1 || true
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec .venv/bin/simagent demo "$@" ;;
    test) setup; exec .venv/bin/python -m pytest "$@" ;;
    bench) setup; exec .venv/bin/python -m benchmarks --json "$@" ;;
    fleet)
        setup
        .venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[fleet]'
        exec nice -n 10 .venv/bin/python -m benchmarks.fleet "$@" ;;
    faults)
        setup
        if [ "${1:-}" = "--long" ]; then
            shift
            export SIMAGENT_FAULT_TRIALS=${SIMAGENT_FAULT_TRIALS:-30}
            export SIMAGENT_FAULT_SEED=${SIMAGENT_FAULT_SEED:-$RANDOM}
        fi
        report=$(mktemp /tmp/simagent-faults.XXXXXX)
        rc=0
        SIMAGENT_FAULT_REPORT=$report .venv/bin/python -m pytest -m faults "$@" || rc=$?
        [ -s "$report" ] && .venv/bin/python tests/fault_table.py "$report"
        rm -f "$report"
        exit $rc ;;
    cluster)
        setup
        install_rabbitmq
        exec .venv/bin/python -m pytest -m cluster -s tests/e2e/test_cluster_failover.py "$@" ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
