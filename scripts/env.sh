# shellcheck shell=sh
# Shared environment for snapcrypt's scripts: finds a Node.js >= 24.
#
# Sourced (POSIX sh) by install.sh, test.sh, .ci/run and bin/snapcrypt*.
# The caller sets SNAPCRYPT_ROOT to the repository root before sourcing.
#
# Node is looked for, in this order:
#   1. $SNAPCRYPT_NODE, if set by the caller's environment and >= 24;
#   2. the repo-local install made by install.sh: .tools/node_modules/.bin/node;
#   3. `node` on PATH, if its major version is >= 24.

: "${SNAPCRYPT_ROOT:?SNAPCRYPT_ROOT must be set before sourcing scripts/env.sh}"

SNAPCRYPT_MIN_NODE_MAJOR=24
SNAPCRYPT_TOOLS_DIR="$SNAPCRYPT_ROOT/.tools"
SNAPCRYPT_TOOLS_NODE="$SNAPCRYPT_TOOLS_DIR/node_modules/.bin/node"

# snapcrypt_node_major BIN: print BIN's major version; fail if BIN doesn't run.
snapcrypt_node_major() {
	_sc_v=$("$1" --version 2>/dev/null) || return 1
	_sc_v=${_sc_v#v}
	_sc_v=${_sc_v%%.*}
	case $_sc_v in '' | *[!0-9]*) return 1 ;; esac
	printf '%s\n' "$_sc_v"
}

# snapcrypt_node_ok BIN: succeed if BIN runs and is Node >= 24.
snapcrypt_node_ok() {
	_sc_m=$(snapcrypt_node_major "$1") || return 1
	[ "$_sc_m" -ge "$SNAPCRYPT_MIN_NODE_MAJOR" ]
}

# snapcrypt_find_node: set SNAPCRYPT_NODE to a usable node binary, or fail.
snapcrypt_find_node() {
	if [ -n "${SNAPCRYPT_NODE:-}" ] && snapcrypt_node_ok "$SNAPCRYPT_NODE"; then
		return 0
	fi
	if [ -x "$SNAPCRYPT_TOOLS_NODE" ] && snapcrypt_node_ok "$SNAPCRYPT_TOOLS_NODE"; then
		SNAPCRYPT_NODE=$SNAPCRYPT_TOOLS_NODE
		return 0
	fi
	_sc_n=$(command -v node 2>/dev/null) || _sc_n=
	if [ -n "$_sc_n" ] && snapcrypt_node_ok "$_sc_n"; then
		SNAPCRYPT_NODE=$_sc_n
		return 0
	fi
	SNAPCRYPT_NODE=
	return 1
}

# snapcrypt_use_node: find node and make it the first `node` on PATH (so that
# npm, npm scripts, tsc and `node --test` all run on it). Exports PATH and
# SNAPCRYPT_NODE.
snapcrypt_use_node() {
	snapcrypt_find_node || return 1
	_sc_n=$(command -v node 2>/dev/null) || _sc_n=
	if [ "$_sc_n" != "$SNAPCRYPT_NODE" ]; then
		PATH=$(dirname "$SNAPCRYPT_NODE"):$PATH
		export PATH
	fi
	export SNAPCRYPT_NODE
}

# snapcrypt_no_node_message: explain what to do when no node >= 24 is found.
snapcrypt_no_node_message() {
	_sc_n=$(command -v node 2>/dev/null) || _sc_n=
	if [ -n "$_sc_n" ]; then
		_sc_v=$("$_sc_n" --version 2>/dev/null) || _sc_v=unknown
		echo "snapcrypt: needs Node.js >= $SNAPCRYPT_MIN_NODE_MAJOR; found $_sc_n ($_sc_v) and no $SNAPCRYPT_TOOLS_NODE." >&2
	else
		echo "snapcrypt: needs Node.js >= $SNAPCRYPT_MIN_NODE_MAJOR; found none (no node on PATH, no $SNAPCRYPT_TOOLS_NODE)." >&2
	fi
	echo "snapcrypt: run $SNAPCRYPT_ROOT/install.sh to install one into $SNAPCRYPT_TOOLS_DIR." >&2
}
