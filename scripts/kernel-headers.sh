#!/usr/bin/env bash
# Make the running kernel's headers findable by bcc: /lib/modules/$(uname -r)/{build,source}.
#
# Used by scripts/setup.sh on a development host and, in the image, by the agent DaemonSet's
# init container on a Kubernetes node (the host's /lib/modules and /usr/src mounted at the same
# paths, so the links it makes are valid on the host and in the container alike).
#
# - /lib/modules/KREL/build a real directory (the distribution's headers for this kernel): used
#   as it is.
# - Otherwise build -> the newest Debian linux-headers-*-amd64 tree under /usr/src and
#   source -> its -common sibling (Debian splits the generated headers from include/linux;
#   bcc needs both). Existing links are repointed only if they point elsewhere; a real file
#   or directory is never replaced.
# - No such tree, but the kernel carries its own headers (CONFIG_IKHEADERS,
#   /sys/kernel/kheaders.tar.xz): nothing to link, bcc unpacks those itself.
# - None of these: exit 1 with what is missing (the agent cannot compile its programs).
#
# See scripts/setup.sh for when mismatched (older Debian) headers are safe for membrane.
set -euo pipefail

# sourced by scripts/setup.sh, which brings its own log and die
declare -F log >/dev/null || log() { printf 'kernel-headers: %s\n' "$*" >&2; }
declare -F die >/dev/null || die() { log "error: $*"; exit 1; }

newest_headers() { # newest_headers SRC
  local d best="" SRC=$1
  # sort -V picks e.g. 6.1.0-56 over 6.1.0-9; only trees with a -common sibling
  while IFS= read -r d; do
    [[ -d ${d%-amd64}-common ]] && best=$d
  done < <(compgen -G "$SRC/linux-headers-*-amd64" | sort -V || true)
  printf '%s' "$best"
}

ensure_link() { # ensure_link TARGET LINK: create/repoint a symlink, never clobber a real dir/file
  local target=$1 link=$2
  if [[ -L $link ]]; then
    [[ $(readlink -- "$link") == "$target" ]] && return 0
  elif [[ -e $link ]]; then
    log "keeping existing $link (not a symlink)"
    return 0
  fi
  ln -sfn -- "$target" "$link"
  log "linked $link -> $target"
}

link_kernel_headers() { # link_kernel_headers MODDIR SRC: /lib/modules/KREL, /usr/src
  local MODDIR=$1 SRC=$2
  if [[ -d $MODDIR/build && ! -L $MODDIR/build ]]; then
    log "$MODDIR/build is a real directory, leaving it alone"
  else
    local HDR_ARCH HDR_COMMON
    HDR_ARCH=$(newest_headers "$SRC")
    if [[ -z $HDR_ARCH ]]; then
      if [[ -e ${KHEADERS:-/sys/kernel/kheaders.tar.xz} ]]; then
        log "no headers tree; bcc will use the kernel's own (${KHEADERS:-/sys/kernel/kheaders.tar.xz})"
        return 0
      fi
      die "no $SRC/linux-headers-*-amd64 (+ -common) tree, no $MODDIR/build and no CONFIG_IKHEADERS; install the kernel's headers (linux-headers-amd64 on Debian)"
    fi
    HDR_COMMON=${HDR_ARCH%-amd64}-common
    mkdir -p "$MODDIR"
    ensure_link "$HDR_ARCH" "$MODDIR/build"
    ensure_link "$HDR_COMMON" "$MODDIR/source"
  fi
  [[ -f $MODDIR/build/include/generated/autoconf.h ]] \
    || die "kernel headers incomplete: $MODDIR/build/include/generated/autoconf.h missing"
  [[ -f $MODDIR/source/include/linux/kconfig.h || -f $MODDIR/build/include/linux/kconfig.h ]] \
    || die "kernel headers incomplete: include/linux/kconfig.h missing under $MODDIR/{source,build}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  link_kernel_headers "${MODULES_ROOT:-/lib/modules}/${KREL:-$(uname -r)}" "${HEADERS_ROOT:-/usr/src}"
fi
