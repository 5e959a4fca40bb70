#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every test.
# Used by .ci/run and by developers: `scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(fio libnbd-bin python3 python3-libnbd nbdkit fuse3 e2fsprogs qemu-utils util-linux mount openssl curl iproute2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
for t in fio nbdinfo nbdcopy nbdfuse nbdkit nbdsh qemu-io qemu-img mkfs.ext4 fsck.ext4 losetup mount fsfreeze openssl curl ss; do
  command -v "$t" >/dev/null || { echo "required tool $t is missing after install" >&2; exit 1; }
done

# Release build: the integration tests drive the real binary with real
# clients (qemu-io, nbdinfo, nbdcopy, fio, nbdfuse) and kill it with SIGKILL.
cargo build --release --locked
cargo test --release --locked -- --test-threads="${TEST_THREADS:-2}"
