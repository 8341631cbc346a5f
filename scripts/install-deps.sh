#!/usr/bin/env bash
# Installs the system packages the build needs on a fresh Debian machine.
#
# Owns: the Debian packages below, and nothing else. Idempotent: installs only
# what `dpkg -s` reports missing, and runs `apt-get update` once, only when
# something must be installed. Uses sudo only when not already root.
#
# Who runs it: developers once per machine, and CI before `cargo` (the
# `storage` crate's `fdb` feature runs bindgen, which needs libclang).
#
# What it must not do: download anything outside Debian's package archive,
# or change the Rust toolchain.
set -euo pipefail

# libclang-dev: bindgen (foundationdb-sys, feature `fdb`) loads libclang.so to
# parse fdb_c.h. The `clang` driver is not needed: bindgen produced identical
# bindings without it (checked on Debian 12).
# make: tikv-jemalloc-sys builds jemalloc (the node's allocator) with its
# own configure script and make; present on these machines, listed so a
# leaner image still builds.
PACKAGES=(libclang-dev make)

# Installed and configured (a removed package can still be known to dpkg,
# with "Status: deinstall ok config-files").
installed() {
    local status
    status=$(dpkg -s "$1" 2>/dev/null) || return 1
    [[ $status == *"Status: install ok installed"* ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! installed "$pkg"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

echo "install-deps: installing ${missing[*]}" >&2
# Quiet on success; on failure show apt's full output.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: apt-get failed" >&2
    exit 1
fi
