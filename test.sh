#!/usr/bin/env bash
# snapcrypt tests: the README's second command (and what CI runs).
#
#   ./test.sh
#
# Runs `npm test` (type-check + build + node --test) on Node.js >= 24 (found
# as in scripts/env.sh; run ./install.sh first) and exits with its status.
#
# btrfs: the btrfs tests use the directory in SNAPCRYPT_TEST_BTRFS.
#   - SNAPCRYPT_TEST_BTRFS=/some/btrfs/dir  use that (nothing is set up);
#   - SNAPCRYPT_TEST_BTRFS= (set but empty) run without btrfs (those tests skip);
#   - unset, as root: make (or reuse) a 3G btrfs loop filesystem from the
#     sparse image /var/tmp/snapcrypt-test-btrfs.img mounted at
#     /mnt/snapcrypt-test-btrfs, emptied first; it is left mounted afterwards.
#     A lock serializes concurrent ./test.sh runs on one machine.
#   - unset, not root: no btrfs (those tests skip).
set -euo pipefail

ROOT=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
cd "$ROOT"
SNAPCRYPT_ROOT=$ROOT
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"

BTRFS_IMG=/var/tmp/snapcrypt-test-btrfs.img
BTRFS_MNT=/mnt/snapcrypt-test-btrfs
BTRFS_SIZE=3G
BTRFS_LOCK=/var/tmp/snapcrypt-test-btrfs.lock
BTRFS_LOCK_WAIT=${SNAPCRYPT_TEST_BTRFS_LOCK_WAIT:-1800}

say() { printf '[test] %s\n' "$*"; }
die() {
	printf '[test] error: %s\n' "$*" >&2
	exit 1
}

if ! snapcrypt_use_node; then
	snapcrypt_no_node_message
	exit 1
fi
[[ -d node_modules ]] || die "node_modules/ is missing: run ./install.sh first"

# --- btrfs loop filesystem ----------------------------------------------------
mounted_fstype() { findmnt -n -o FSTYPE --mountpoint "$BTRFS_MNT" 2>/dev/null | head -n 1 || true; }

# Delete every subvolume and file under the (mounted, top-level) filesystem.
# Subvolumes are made writable first (a read-only parent blocks deleting a
# child) and deleted deepest first.
clean_btrfs() {
	local mnt=$1 p
	local -a subs
	mapfile -t subs < <(btrfs subvolume list "$mnt" |
		sed -E 's/^ID [0-9]+ gen [0-9]+ top level [0-9]+ path //' |
		awk -F/ '{ print NF "\t" $0 }' | sort -rn | cut -f 2-)
	for p in "${subs[@]}"; do
		btrfs property set -f -ts "$mnt/$p" ro false || true
	done
	for p in "${subs[@]}"; do
		btrfs subvolume delete "$mnt/$p" || true
	done
	if ((${#subs[@]} > 0)); then
		# Commit now (else the cleaner waits for the 30 s commit interval), then
		# wait until the space of the deleted subvolumes is freed.
		btrfs filesystem sync "$mnt" || true
		timeout 300 btrfs subvolume sync "$mnt" || true
	fi
	find "$mnt" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} + || true
	[[ -z $(btrfs subvolume list "$mnt") && -z $(ls -A "$mnt") ]]
}

# Explain why `mount -o loop` failed.
explain_mount_failure() {
	local err=$1
	echo "[test] 'mount -o loop $BTRFS_IMG $BTRFS_MNT' failed: $err" >&2
	[[ -e /dev/loop-control ]] ||
		echo "[test]   /dev/loop-control is missing: no loop device support here (container without /dev/loop*?)" >&2
	local free
	if free=$(losetup -f 2>&1); then
		echo "[test]   first free loop device: $free" >&2
	else
		echo "[test]   no free loop device: $free" >&2
	fi
	grep -qw btrfs /proc/filesystems ||
		echo "[test]   the kernel has no btrfs (not in /proc/filesystems; try: modprobe btrfs)" >&2
	local capeff
	capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status 2>/dev/null) || capeff=
	if [[ $capeff =~ ^[0-9a-fA-F]+$ ]] && (((16#$capeff >> 21 & 1) == 0)); then
		echo "[test]   this process lacks CAP_SYS_ADMIN (unprivileged container?)" >&2
	fi
	dmesg 2>/dev/null | tail -n 5 | sed 's/^/[test]   dmesg: /' >&2 || true
	echo "[test]   to run without btrfs tests: SNAPCRYPT_TEST_BTRFS= ./test.sh;" \
		"or point SNAPCRYPT_TEST_BTRFS at a directory on a btrfs filesystem" >&2
}

# Make a new, empty filesystem in a new sparse image and mount it.
fresh_btrfs() {
	local out dev
	# Detach loop devices still bound to the old image (not mounted).
	while read -r dev; do
		losetup -d "$dev" 2>/dev/null || true
	done < <(losetup -j "$BTRFS_IMG" 2>/dev/null | cut -d: -f1)
	rm -f "$BTRFS_IMG"
	mkdir -p "$(dirname "$BTRFS_IMG")" "$BTRFS_MNT"
	truncate -s "$BTRFS_SIZE" "$BTRFS_IMG"
	out=$(mkfs.btrfs -q -f -L snapcrypt-test "$BTRFS_IMG" 2>&1) || die "mkfs.btrfs $BTRFS_IMG failed: $out"
	if ! out=$(mount -o loop "$BTRFS_IMG" "$BTRFS_MNT" 2>&1); then
		explain_mount_failure "$out"
		exit 1
	fi
}

setup_btrfs() {
	local cmd fstype log
	for cmd in btrfs mkfs.btrfs mount umount losetup findmnt flock truncate; do
		command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found (btrfs-progs / util-linux): run ./install.sh first"
	done

	# One ./test.sh at a time may own the filesystem (it is emptied on start).
	exec 9>"$BTRFS_LOCK"
	if ! flock -n 9; then
		say "btrfs: another ./test.sh is using $BTRFS_MNT; waiting (up to ${BTRFS_LOCK_WAIT}s)"
		flock -w "$BTRFS_LOCK_WAIT" 9 || die "timed out waiting for the lock $BTRFS_LOCK"
	fi

	fstype=$(mounted_fstype)
	if [[ -z $fstype ]]; then
		fresh_btrfs
		say "btrfs: new $BTRFS_SIZE loop filesystem $BTRFS_IMG mounted at $BTRFS_MNT"
	elif [[ $fstype != btrfs ]]; then
		die "$BTRFS_MNT is mounted but is $fstype, not btrfs: unmount it or set SNAPCRYPT_TEST_BTRFS"
	else
		log=$(mktemp)
		if clean_btrfs "$BTRFS_MNT" >"$log" 2>&1; then
			say "btrfs: reusing $BTRFS_MNT (emptied)"
		else
			# Couldn't empty it (busy, immutable files...): start afresh.
			umount "$BTRFS_MNT" 2>>"$log" || umount -l "$BTRFS_MNT" 2>>"$log" ||
				{ cat "$log" >&2; die "cannot empty nor unmount $BTRFS_MNT"; }
			fresh_btrfs
			say "btrfs: $BTRFS_MNT could not be emptied; made a new $BTRFS_SIZE loop filesystem"
		fi
		rm -f "$log"
	fi
	export SNAPCRYPT_TEST_BTRFS=$BTRFS_MNT
}

if [[ -n ${SNAPCRYPT_TEST_BTRFS+set} ]]; then
	if [[ -n $SNAPCRYPT_TEST_BTRFS ]]; then
		say "btrfs: using SNAPCRYPT_TEST_BTRFS=$SNAPCRYPT_TEST_BTRFS"
	else
		say "btrfs: SNAPCRYPT_TEST_BTRFS is empty: btrfs tests will be skipped"
	fi
elif ((EUID != 0)); then
	say "btrfs: not root, so no loop filesystem: btrfs tests will be skipped (set SNAPCRYPT_TEST_BTRFS to a btrfs directory to run them)"
else
	setup_btrfs
fi

# --- tests ------------------------------------------------------------------------
say "npm test on node $(node --version) ($SNAPCRYPT_NODE)"
rc=0
# fd 9 (the lock) is not passed on: a process left behind by a test must not
# keep other ./test.sh runs waiting.
npm test 9>&- || rc=$?
exit "$rc"
