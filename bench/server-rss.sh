#!/usr/bin/env bash
# bench/server-rss.sh — memory of `snapcrypt-server serve` while it receives a backup over SSH.
#
#   bench/server-rss.sh CORPUS_DIR WORK_DIR
#
# CORPUS_DIR is what ../shared/bench/make_corpus.sh built (tree/ and big/). WORK_DIR is a directory on
# btrfs (created if missing): the server's area goes to WORK_DIR/area (deleted at the end unless
# KEEP_AREA=1; a leftover one from an earlier run is deleted at the start), results and logs to
# WORK_DIR/results.
#
# A throwaway sshd runs on 127.0.0.1 (own config, host key and authorized_keys in a temp directory) as
# the invoking user. The only key it accepts, a fresh passphrase-less client key, is forced to run
#   /usr/bin/time -a -o serve.csv node dist/src/programs/snapcrypt-server.js serve --area WORK_DIR/area
# so GNU time appends one line (wall, CPU, peak RSS) for every serve process. The client connects with
# plain ssh (no `snapcrypt setup` key: SNAPCRYPT_CONFIG_DIR is a fresh directory), the client key and
# a known_hosts file holding the sshd's host key (strict checking) given through SNAPCRYPT_SSH_OPTIONS.
#
# Steps: `snapcrypt init`, a first backup of the corpus (page cache dropped first when run as root),
# then NOCHANGE_RUNS (default 3) backups with nothing changed, all to ssh://USER@127.0.0.1:PORT/.
# MUTATE_CMD, when set, runs next (split on white space; e.g. "../shared/bench/mutate.sh COPY", with
# COPY a copy of the corpus given as CORPUS_DIR: it changes it), followed by one more backup, the step
# "mutated".
# Prints a markdown table: per step the client's wall time, CPU and peak RSS and the server's CPU and
# peak RSS; then the server's peak RSS over all serve processes. SERVE_NODE_ARGS and CLIENT_NODE_ARGS
# (split on white space) add node options to the server's and the client's command lines, for
# experiments (e.g. CLIENT_NODE_ARGS="--import /path/memsample.mjs"). The client runs with
# MALLOC_ARENA_MAX=2, as bin/snapcrypt runs it, unless the environment sets another. RESTORE_RUNS (default 0) adds
# that many full restores of the latest snapshot into WORK_DIR/restore (page cache dropped first),
# each by every client in RESTORE_CLIENTS (paths of snapcrypt.js of other builds, in turn, for an A/B;
# default this build's), recorded as step restore-<build directory>. Passphrase: SNAPCRYPT_PASSWORD
# (default "bench"), with the normal KDF. Run it as root, so that it can drop the page cache and delete
# the area's subvolumes. Needs: sshd, ssh, ssh-keygen, GNU time, btrfs-progs; dist/ built.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/sshd-lib.sh"
USAGE="usage: bench/server-rss.sh CORPUS_DIR WORK_DIR"
CORPUS=$(realpath "${1:?$USAGE}")
WORK=$(realpath -m "${2:?$USAGE}")
NOCHANGE_RUNS=${NOCHANGE_RUNS:-3}
SNAPCRYPT_ROOT=$HERE
. "$HERE/scripts/env.sh"
snapcrypt_find_node || { echo "no node >= 24: run ./install.sh" >&2; exit 1; }
NODE=$(realpath "$SNAPCRYPT_NODE")
SERVER_JS=$HERE/dist/src/programs/snapcrypt-server.js
CLIENT_JS=$HERE/dist/src/programs/snapcrypt.js
[ -f "$SERVER_JS" ] && [ -f "$CLIENT_JS" ] || { echo "dist/ is missing: run npx tsc -p ." >&2; exit 1; }
for dir in "$CORPUS/tree" "$CORPUS/big"; do [ -d "$dir" ] || { echo "$dir is missing" >&2; exit 1; }; done
case "$WORK" in *[[:space:]\"\\]*) echo "WORK_DIR must not contain white space, quotes or backslashes" >&2; exit 1 ;; esac

mkdir -p "$WORK"
[ "$(stat -f -c %T "$WORK")" = btrfs ] || { echo "$WORK is not on btrfs" >&2; exit 1; }
AREA=$WORK/area
OUT=$WORK/results
mkdir -p "$OUT"

delete_area() { # snapshots and current are subvolumes
  [ -e "$AREA" ] || return 0
  local sv
  for sv in "$AREA"/snapshots/* "$AREA/current"; do
    if [ -d "$sv" ] && [ "$(stat -c %i "$sv")" = 256 ]; then
      btrfs property set -ts "$sv" ro false > /dev/null 2>&1 || true
      btrfs subvolume delete "$sv" > /dev/null
    fi
  done
  rm -rf "$AREA"
}

# Everything that ends up in SNAPCRYPT_SSH_OPTIONS (split on white space) lives here: no spaces.
T=$(mktemp -d /tmp/snapcrypt-server-rss.XXXXXX)
SSHD_PID=
cleanup() {
  if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2> /dev/null || true; wait "$SSHD_PID" 2> /dev/null || true; fi
  rm -rf "$T"
  if [ "${KEEP_AREA:-0}" != 1 ]; then delete_area; fi
}
trap cleanup EXIT
delete_area

# --- the throwaway sshd ------------------------------------------------------------------------------
USER_NAME=$(id -un)
ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$T/host_key"
ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$T/client_key"
SERVE_CSV=$T/serve.csv
: > "$SERVE_CSV"
serve_cmd="/usr/bin/time -a -o $SERVE_CSV -f serve,%e,%U,%S,%M $NODE ${SERVE_NODE_ARGS:-} $SERVER_JS serve --area $AREA"
echo "restrict,command=\"$serve_cmd\" $(cat "$T/client_key.pub")" > "$T/authorized_keys"
chmod 600 "$T/authorized_keys"
PORT=$("$NODE" -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")
bench_sshd_start "$T" "$PORT" "$OUT/sshd.log" || exit 1

# --- the client ---------------------------------------------------------------------------------------
export SNAPCRYPT_PASSWORD=${SNAPCRYPT_PASSWORD:-bench}
export SNAPCRYPT_CACHE_DIR=$T/cache SNAPCRYPT_CONFIG_DIR=$T/config
export SNAPCRYPT_SSH_OPTIONS="-F /dev/null -i $T/client_key -o IdentitiesOnly=yes -o UserKnownHostsFile=$T/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
unset SNAPCRYPT_REPO SNAPCRYPT_TEST_WEAK_KDF
REPO="ssh://$USER_NAME@127.0.0.1:$PORT/"

CSV=$OUT/results.csv
echo "step,run,wall_s,user_s,sys_s,max_rss_kb,serve_processes,serve_wall_s,serve_user_s,serve_sys_s,serve_max_rss_kb" > "$CSV"

drop_caches() { sync; if [ "$(id -u)" = 0 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }

measure() { # step run snapcrypt-args...
  local step=$1 run=$2; shift 2
  : > "$SERVE_CSV"
  # the client's malloc as bin/snapcrypt sets it (node runs directly here, for CLIENT_NODE_ARGS)
  MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2} /usr/bin/time -f "%e,%U,%S,%M" -o "$T/client.time" "$NODE" ${CLIENT_NODE_ARGS:-} "$CLIENT_JS" "$@" > "$OUT/$step-$run.log" 2>&1 \
    || { echo "snapcrypt $1 failed:" >&2; cat "$OUT/$step-$run.log" "$T/client.time" >&2; exit 1; }
  # The serve process has exited when ssh has (sshd waits for it), so its line is written.
  local serve
  serve=$(awk -F, '$1=="serve" {n++; w+=$2; u+=$3; s+=$4; if ($5>m) m=$5} END {printf "%d,%.2f,%.2f,%.2f,%d", n, w, u, s, m}' "$SERVE_CSV")
  cat "$SERVE_CSV" >> "$OUT/serve-all.csv"
  echo "$step,$run,$(tail -n1 "$T/client.time"),$serve" >> "$CSV"
}

: > "$OUT/serve-all.csv"
measure init 1 init --repo "$REPO"
drop_caches
measure first 1 backup --repo "$REPO" "$CORPUS/tree" "$CORPUS/big"
for run in $(seq "$NOCHANGE_RUNS"); do
  measure nochange "$run" backup --repo "$REPO" "$CORPUS/tree" "$CORPUS/big"
done
if [ -n "${MUTATE_CMD:-}" ]; then
  $MUTATE_CMD > "$OUT/mutate.log"
  measure mutated 1 backup --repo "$REPO" "$CORPUS/tree" "$CORPUS/big"
fi
stored=$(du -sb "$AREA/current" | cut -f1)
# RESTORE_RUNS full restores of the latest snapshot, page cache dropped first, by each client of
# RESTORE_CLIENTS in turn (for an A/B of two builds; default: this one)
RESTORE_TARGET=$WORK/restore
for run in $(seq "${RESTORE_RUNS:-0}"); do
  for client in ${RESTORE_CLIENTS:-$CLIENT_JS}; do
    rm -rf "$RESTORE_TARGET"
    drop_caches
    CLIENT_JS=$client measure "restore-$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$client")")")")")" "$run" restore --repo "$REPO" latest --target "$RESTORE_TARGET"
  done
done
rm -rf "$RESTORE_TARGET"

echo "server-rss.sh $(date -u +%Y-%m-%dT%H:%MZ), node $("$NODE" --version), corpus $CORPUS, area $AREA, stored $((stored / 1048576)) MiB"
echo
echo "| step | wall (s) | client CPU (s) | client peak RSS (MiB) | server CPU (s) | server peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|---:|"
awk -F, 'NR > 1 {printf "| %s %s | %.2f | %.1f | %.0f | %.1f | %.1f |\n", $1, $2, $3, $4 + $5, $6 / 1024, $9 + $10, $11 / 1024}' "$CSV"
echo
awk -F, 'NR > 1 {n += $7; if ($11 > m) m = $11} END {printf "server peak RSS, max of %d serve processes: %d KiB = %.1f MiB\n", n, m, m / 1024}' "$CSV"
