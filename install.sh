#!/usr/bin/env bash
# snapcrypt installer: the README's first command.
#
#   ./install.sh
#
# On Debian 12 (as root, or with sudo): installs the system packages snapcrypt
# needs at run time and for its tests, Node.js 24 into ./.tools (unless `node`
# on PATH is already >= 24; fetched with npm, so Debian's npm package is added
# to the system packages when npm is missing), the npm dependencies, builds,
# checks the bin/snapcrypt wrappers and runs `bin/snapcrypt demo`.
# Prints one line per step; a failing step's full log is printed.
# Safe to run again.
set -euo pipefail

ROOT=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
cd "$ROOT"
SNAPCRYPT_ROOT=$ROOT
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"

APT_PACKAGES=(btrfs-progs openssh-server openssh-client rsync attr sudo time)
NODE_SPEC="node@$SNAPCRYPT_MIN_NODE_MAJOR"

LOG_DIR="$SNAPCRYPT_TOOLS_DIR/logs"
mkdir -p "$LOG_DIR"

say() { printf '[install] %s\n' "$*"; }

# step LOG LABEL CMD...: run CMD with its output in $LOG_DIR/LOG.log; print
# one line; on failure print the whole log and exit with CMD's status.
step() {
	local log="$LOG_DIR/$1.log" label=$2 rc=0
	shift 2
	printf '[install] %s ... ' "$label"
	"$@" >"$log" 2>&1 </dev/null || rc=$?
	if ((rc == 0)); then
		echo ok
		return 0
	fi
	echo "FAILED (exit $rc)"
	echo "----- $log -----" >&2
	cat "$log" >&2
	echo "----- end of $log -----" >&2
	exit "$rc"
}

# retry CMD...: run CMD up to 3 times, 15 s apart (the npm registry's answer
# can fail once, e.g. a TLS error from a proxy that is still starting).
retry() {
	local try
	for try in 1 2 3; do
		"$@" && return 0
		((try < 3)) || return 1
		echo "failed (try $try of 3): $*; retrying in 15s" >&2
		sleep 15
	done
}

# have_node: succeed if a Node.js >= 24 is already here (.tools from an
# earlier run, or `node` on PATH), so that section 2 installs nothing.
have_node() {
	local sys_node
	{ [[ -x $SNAPCRYPT_TOOLS_NODE ]] && snapcrypt_node_ok "$SNAPCRYPT_TOOLS_NODE"; } ||
		{ sys_node=$(command -v node 2>/dev/null) && snapcrypt_node_ok "$sys_node"; }
}

# --- 1. system packages ------------------------------------------------------
# Without a node >= 24, section 2 fetches one with npm: if npm is missing too,
# install Debian's npm (it brings its own older nodejs, enough to run npm).
if ! have_node && ! command -v npm >/dev/null 2>&1; then
	APT_PACKAGES+=(npm)
fi

missing_packages() {
	local p status
	for p in "${APT_PACKAGES[@]}"; do
		status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || status=
		[[ $status == "install ok installed" ]] || printf '%s\n' "$p"
	done
}

apt_install() {
	local -a sudo=()
	if ((EUID != 0)); then
		if ! command -v sudo >/dev/null 2>&1; then
			echo "not root and no sudo: install these as root: $*" >&2
			return 1
		fi
		# Non-interactive: credentials were cached by `sudo -v` below if needed.
		sudo=(sudo -n)
	fi
	# Wait (up to 10 min) for another apt/dpkg run to release its locks.
	local -a apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
	local try
	for try in 1 2 3 4 5; do
		"${apt[@]}" update && break
		((try < 5)) || return 1
		echo "apt-get update failed (try $try); retrying in 10s" >&2
		sleep 10
	done
	"${apt[@]}" install -y --no-install-recommends "$@"
}

mapfile -t MISSING < <(missing_packages)
if ((${#MISSING[@]} == 0)); then
	say "system packages: all present (${APT_PACKAGES[*]})"
else
	if ! command -v apt-get >/dev/null 2>&1; then
		echo "[install] apt-get not found: please install ${MISSING[*]} with your package manager" >&2
		exit 1
	fi
	if ((EUID != 0)) && [[ -t 0 ]]; then
		# sudo may prompt: don't hide the prompt behind the log redirection.
		sudo -v
	fi
	step apt "system packages: installing ${MISSING[*]}" apt_install "${MISSING[@]}"
fi

# --- 2. Node.js >= 24 ----------------------------------------------------------
# npm's `cafile` setting (e.g. a proxy's CA in /etc/npmrc) does not reach every
# TLS connection of an install: the `node` package's preinstall script starts
# another npm, and node's own fetches trust only NODE_EXTRA_CA_CERTS. Without
# it, an install behind such a proxy failed or took minutes of retries (6 s
# with it). Trust the same file npm was told to.
if [[ -z ${NODE_EXTRA_CA_CERTS:-} ]] && command -v npm >/dev/null 2>&1; then
	npm_cafile=$(npm config get cafile 2>/dev/null) || npm_cafile=
	if [[ -n $npm_cafile && $npm_cafile != null && $npm_cafile != undefined && -r $npm_cafile ]]; then
		export NODE_EXTRA_CA_CERTS=$npm_cafile
	fi
fi

install_tools_node() {
	command -v npm >/dev/null 2>&1 || {
		echo "npm not found on PATH: it is needed to fetch Node.js $SNAPCRYPT_MIN_NODE_MAJOR from the npm registry" >&2
		return 1
	}
	rm -rf "$SNAPCRYPT_TOOLS_DIR/node_modules" "$SNAPCRYPT_TOOLS_DIR/package-lock.json"
	[[ -f $SNAPCRYPT_TOOLS_DIR/package.json ]] ||
		printf '{\n  "private": true,\n  "description": "snapcrypt local toolchain (see install.sh)"\n}\n' >"$SNAPCRYPT_TOOLS_DIR/package.json"
	# The `node` package's preinstall script fetches node-linux-<arch> from
	# the registry, so scripts must run.
	retry npm install --prefix "$SNAPCRYPT_TOOLS_DIR" --ignore-scripts=false \
		--no-audit --no-fund --loglevel=warn "$NODE_SPEC"
	snapcrypt_node_ok "$SNAPCRYPT_TOOLS_NODE" || {
		echo "$SNAPCRYPT_TOOLS_NODE is not a working Node.js >= $SNAPCRYPT_MIN_NODE_MAJOR" >&2
		return 1
	}
}

# Reuse .tools (an earlier run) or a system node >= 24; else install into .tools.
if ! have_node; then
	step node "node: npm install --prefix .tools $NODE_SPEC" install_tools_node
fi
if ! snapcrypt_use_node; then
	snapcrypt_no_node_message
	exit 1
fi
say "node: using $SNAPCRYPT_NODE ($("$SNAPCRYPT_NODE" --version), npm $(npm --version))"

# --- 3. npm dependencies and build ---------------------------------------------
if [[ -f package-lock.json ]]; then
	step npm-ci "npm ci" retry npm ci --no-audit --no-fund
else
	step npm-install "npm install" retry npm install --no-audit --no-fund
fi
step build "npm run build" npm run build

# --- 4. wrappers -----------------------------------------------------------------
# bin/snapcrypt and bin/snapcrypt-server are committed POSIX sh scripts that
# find this node (scripts/env.sh); make sure they are executable (a copy may
# have dropped the bit) and that the programs they run were built.
check_wrappers() {
	local p
	for p in snapcrypt snapcrypt-server; do
		chmod +x "bin/$p"
		[[ -f dist/src/programs/$p.js ]] || {
			echo "dist/src/programs/$p.js was not built (is src/programs/$p.ts there?)" >&2
			return 1
		}
	done
	sh -c 'SNAPCRYPT_ROOT=$1; . "$1/scripts/env.sh"; snapcrypt_find_node && echo "wrappers use $SNAPCRYPT_NODE"' \
		sh "$ROOT"
}
step wrappers "wrappers: bin/snapcrypt, bin/snapcrypt-server" check_wrappers
# Under ssh (snapcrypt-server) PATH is minimal: warn if node would not be found.
if ! env -i PATH=/usr/local/bin:/usr/bin:/bin sh -c \
	'SNAPCRYPT_ROOT=$1; . "$1/scripts/env.sh"; snapcrypt_find_node' sh "$ROOT"; then
	say "note: under ssh's minimal PATH bin/snapcrypt-server will not find $SNAPCRYPT_NODE; for remote use put a node >= $SNAPCRYPT_MIN_NODE_MAJOR in /usr/local/bin or /usr/bin"
fi

# --- 5. demo -----------------------------------------------------------------------
say "demo: bin/snapcrypt demo"
bin/snapcrypt demo
say "done: run bin/snapcrypt --help, or ./test.sh for the tests"
