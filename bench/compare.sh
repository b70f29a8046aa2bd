#!/usr/bin/env bash
# bench/compare.sh — snapcrypt against restic, borg and rsync, all over SSH on loopback into btrfs.
#
#   bench/compare.sh CORPUS_DIR WORK_DIR
#
# CORPUS_DIR is what ../shared/bench/make_corpus.sh built (tree/, big/ and CORPUS_DIR.manifest next to
# it). WORK_DIR is a directory on btrfs (created if missing); everything the run writes goes there:
#   src/             a copy of the corpus (cp -a --reflink=auto; big/ before tree/, see the copy below),
#                    checked against the corpus manifest, mutated by mutate.sh half-way; the corpus
#                    itself is never written
#   sc-area/         snapcrypt's server area (current/ subvolume, snapshots/ read-only subvolumes)
#   restic-repo/     restic repository (sftp)
#   borg-repo/       borg repository (borg serve)
#   rsync/dst        rsync's target, a subvolume; rsync/snaps/STEP-RUN a read-only snapshot after each run
#   client/TOOL      each client's local state (snapcrypt cache + config, restic cache, BORG_BASE_DIR)
#   restore-TOOL/    restore targets (deleted before and after each restore)
#   results/         results.csv (every measured command), summary.csv, summary.md, logs, manifests
# Everything but results/ is deleted at the end unless KEEP=1 (and at the start if left over).
#
# The server: one throwaway sshd on 127.0.0.1 (random free port; own config, host key and
# authorized_keys in a temp directory), logging in as the invoking user (root). Each tool has its own
# passphrase-less client key whose authorized_keys line forces its server program, wrapped in
#   /usr/bin/time -a -o SERVER_CSV -f TOOL,%e,%U,%S,%M
# so GNU time appends one line (wall, CPU, peak RSS) for every server process:
#   snapcrypt  node dist/src/programs/snapcrypt-server.js serve --area WORK_DIR/sc-area
#   restic     /usr/lib/openssh/sftp-server                (restic -r sftp:..., sftp.command = our ssh)
#   borg       borg serve --restrict-to-path WORK_DIR/borg-repo   (BORG_RSH = our ssh)
#   rsync      a wrapper that runs $SSH_ORIGINAL_COMMAND under GNU time, but only a `rsync --server ...`
#              line without shell metacharacters. rsync's server side cannot be forced to one fixed
#              command line (its arguments depend on the client's options and direction), so the wrapper
#              trusts the client's line: acceptable for a throwaway benchmark key, not for a real server.
# Every client's ssh gets the same options, from a generated config file (-F, so no user or system
# config): this host key only (strict checking), its own key only, BatchMode, and the cipher
# preference snapcrypt's client uses by default
# (aes128-gcm, aes256-gcm, chacha20-poly1305; SSH_CIPHERS overrides it), so that no tool wins or loses
# by its ssh cipher alone (OpenSSH's default, chacha20, costs 35-70% more CPU per byte here).
#
# Tools and settings (passphrase "bench" for all three encrypted ones):
#   snapcrypt  `init` with its normal KDF; backup SRC/tree SRC/big. The client runs through
#              bin/snapcrypt, as installed (it sets MALLOC_ARENA_MAX=2), on the node it finds
#   restic     `init` defaults: restic 0.14 makes a repository of format version 2 ("stable"), whose
#              compression "auto" is zstd; backup SRC/tree SRC/big
#   borg       `init --encryption=repokey-blake2`, `create --compression lz4` (borg 1.2's default;
#              with --list --filter=AME, so that the log names every file it read again)
#   rsync      --archive --hard-links --xattrs --numeric-ids --delete --inplace --no-whole-file, then
#              `btrfs subvolume snapshot -r` of the target (timed with the rsync run: that is what
#              makes it a snapshot). --inplace: a changed file is rewritten in place, so the snapshots
#              keep sharing its unchanged extents (the default writes a whole new copy, 1 GiB for the
#              disk image); --no-whole-file: delta transfer (already the default over ssh, made
#              explicit); -H/-X/--numeric-ids: keep what the encrypted tools keep (hard links, xattrs,
#              numeric owners); no -z: compression only costs CPU on loopback. Unencrypted.
#
# Steps, interleaved: every tool's first step runs before any tool's next step, tools in $TOOLS order.
# Every measured command starts after a `sync` (what the steps before wrote is on the disk).
#   init                      not summarized
#   first                     first backup (page cache dropped before each tool's run)
#   nochange 1..N             backup with nothing changed (NOCHANGE_RUNS, default 3)
#   -- mutate.sh SRC 1 (one day of changes), then the manifest of the mutated SRC --
#   mutated                   backup after the change
#   restore-full              the latest snapshot into restore-TOOL/ (page cache dropped first), then
#                             benchlib.py verify against the mutated SRC's manifest: hard checks are
#                             every entry present and no extra one, type, size and sha256 of every file,
#                             symlink targets; modes, file mtimes and owners are compared too and
#                             reported as OK-META with counts when they differ
#   restore-one               one file from the FIRST snapshot; its sha256 is checked against the
#                             pristine corpus manifest. Default file (ONE_FILE, relative to the corpus):
#                             the first of the log files mutate.sh appends 1 MiB to, so that the first
#                             snapshot's version differs from the latest one (the check proves the old
#                             version came back)
#
# Per measured command (results.csv): the client's wall, user and sys seconds and peak RSS (GNU time:
# the largest single process among the client and the children it waited for, e.g. its ssh); the
# server's processes started during the step (count, user+sys seconds summed, peak RSS = the largest);
# "other" CPU seconds = all CPU time the machine spent during the step (/proc/stat, without idle and
# iowait) minus client and server, i.e. other workers' load plus kernel writeback; the 1-minute load at
# the start. After each backup step: stored_bytes = data extents under the tool's server directory as
# btrfs counts them, shared extents once (`btrfs filesystem du -s`: Exclusive + Set shared), so rsync's
# snapshots and snapcrypt's sealed snapshots cost what they really cost; apparent_bytes = `du -sb` of
# the repository (restic, borg), of snapcrypt's sc-area/current, of rsync's dst (one full tree);
# client_state_bytes = `du -sb` of client/TOOL.
#
# Environment: TOOLS (default "snapcrypt restic borg rsync"; a subset runs only those; ratios are
# against restic, so without restic they are left out), NOCHANGE_RUNS (3), ONE_FILE, KEEP=1,
# SSH_CIPHERS, BENCH_SHARED (default ../shared/bench next to the repository). Run as root (to drop the
# page cache, make and delete subvolumes). Needs: sshd, ssh, ssh-keygen, GNU time, btrfs-progs,
# python3, pgrep, and each chosen tool (dist/ built for snapcrypt).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/sshd-lib.sh"
USAGE="usage: bench/compare.sh CORPUS_DIR WORK_DIR"
die() { echo "compare.sh: $*" >&2; exit 1; }
[ $# = 2 ] || die "$USAGE"
CORPUS=$(realpath "$1")
WORK=$(realpath -m "$2")
TOOLS=${TOOLS:-snapcrypt restic borg rsync}
NOCHANGE_RUNS=${NOCHANGE_RUNS:-3}
BENCH_SHARED=${BENCH_SHARED:-$HERE/../shared/bench}
SSH_CIPHERS=${SSH_CIPHERS:-aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com}
export LC_ALL=C

# --- checks ---------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (drops the page cache, makes and deletes btrfs subvolumes)"
for t in $TOOLS; do
  case $t in snapcrypt | restic | borg | rsync) ;; *) die "unknown tool in TOOLS: $t" ;; esac
done
[ -n "${TOOLS// /}" ] || die "TOOLS is empty"
case $NOCHANGE_RUNS in '' | *[!0-9]* | 0) die "NOCHANGE_RUNS must be a positive number" ;; esac
has_tool() { case " $TOOLS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
need() { # program what-for
  command -v "$1" > /dev/null 2>&1 || [ -x "$1" ] || die "missing program: $1 (needed for $2)"
}
need /usr/bin/time "measuring (GNU time)"
need /usr/sbin/sshd "the throwaway SSH server"
need ssh "the clients"
need ssh-keygen "the throwaway keys"
need btrfs "snapshots and sizes (btrfs-progs)"
need python3 "benchlib.py"
need pgrep "waiting for the server processes"
has_tool restic && { need restic restic; need /usr/lib/openssh/sftp-server "restic's server side"; }
has_tool borg && need borg borg
has_tool rsync && need rsync rsync
if has_tool snapcrypt; then
  export SNAPCRYPT_ROOT=$HERE
  # shellcheck source=scripts/env.sh
  . "$HERE/scripts/env.sh"
  snapcrypt_find_node || die "missing program: node >= 24 (run ./install.sh)"
  NODE=$(realpath "$SNAPCRYPT_NODE")
  SERVER_JS=$HERE/dist/src/programs/snapcrypt-server.js
  CLIENT_JS=$HERE/dist/src/programs/snapcrypt.js
  if [ ! -f "$SERVER_JS" ] || [ ! -f "$CLIENT_JS" ]; then die "dist/ is missing: run npx tsc -p ."; fi
  # the client runs as users run it, through bin/snapcrypt (which sets MALLOC_ARENA_MAX), on this node
  SC_CLIENT=$HERE/bin/snapcrypt
  export SNAPCRYPT_NODE=$NODE
fi
BENCHLIB=$BENCH_SHARED/benchlib.py
MUTATE=$BENCH_SHARED/mutate.sh
if [ ! -f "$BENCHLIB" ] || [ ! -f "$MUTATE" ]; then die "no benchlib.py and mutate.sh in $BENCH_SHARED (set BENCH_SHARED)"; fi
SUMMARY_PY=$HERE/bench/compare_summary.py
[ -f "$SUMMARY_PY" ] || die "$SUMMARY_PY is missing"
for d in "$CORPUS/tree" "$CORPUS/big"; do [ -d "$d" ] || die "$d is missing (CORPUS_DIR is what make_corpus.sh built)"; done
CORPUS_MANIFEST=$CORPUS.manifest
[ -f "$CORPUS_MANIFEST" ] || die "$CORPUS_MANIFEST is missing (make_corpus.sh writes it)"
case "$WORK" in *[[:space:]\"\'\\\;\&\|\$\`\<\>\(\)\*\?]*) die "WORK_DIR must not contain white space, quotes or shell metacharacters" ;; esac
case "$WORK/" in "$CORPUS"/*) die "WORK_DIR must not be inside the corpus" ;; esac
mkdir -p "$WORK"
[ "$(stat -f -c %T "$WORK")" = btrfs ] || die "$WORK is not on btrfs"

SRC=$WORK/src
SC_AREA=$WORK/sc-area
RESTIC_REPO_DIR=$WORK/restic-repo
BORG_REPO_DIR=$WORK/borg-repo
RSYNC_DIR=$WORK/rsync
CLIENT=$WORK/client
OUT=$WORK/results
LOGS=$OUT/logs
CSV=$OUT/results.csv

# --- cleanup ---------------------------------------------------------------------------------------------
delete_subvolumes_under() { # dir: delete every subvolume below dir (deepest first), then the dir
  local dir=$1 sv svs
  [ -e "$dir" ] || return 0
  # the top directory of a subvolume is inode 256, and no other directory is
  mapfile -t svs < <(find "$dir" -depth -type d -inum 256 2> /dev/null || true)
  for sv in "${svs[@]}"; do
    btrfs property set -ts "$sv" ro false > /dev/null 2>&1 || true
    btrfs subvolume delete "$sv" > /dev/null
  done
  rm -rf "$dir"
}
delete_work() {
  local d
  for d in "$SC_AREA" "$RSYNC_DIR"; do delete_subvolumes_under "$d"; done
  for d in "$SRC" "$RESTIC_REPO_DIR" "$BORG_REPO_DIR" "$CLIENT" "$WORK"/restore-*; do
    [ -e "$d" ] && rm -rf "$d"
  done
  return 0
}

T=$(mktemp -d /tmp/snapcrypt-compare.XXXXXX)
SSHD_PID=
cleanup() {
  local rc=$?
  if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2> /dev/null || true; wait "$SSHD_PID" 2> /dev/null || true; fi
  rm -rf "$T"
  if [ "${KEEP:-0}" != 1 ]; then delete_work || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
delete_work
rm -rf "$OUT"
mkdir -p "$OUT" "$LOGS" "$CLIENT"

# --- disk space --------------------------------------------------------------------------------------------
corpus_bytes=$(du -scb "$CORPUS/tree" "$CORPUS/big" | tail -n1 | cut -f1)
# src + one restore at a time + rsync's full copy + about half the corpus per encrypted tool, + 10%
need_bytes=$((corpus_bytes * 2))
has_tool rsync && need_bytes=$((need_bytes + corpus_bytes))
for t in snapcrypt restic borg; do has_tool $t && need_bytes=$((need_bytes + corpus_bytes / 2)); done
need_bytes=$((need_bytes + need_bytes / 10))
avail=$(df -B1 --output=avail "$WORK" | tail -n1 | tr -d ' ')
[ "$avail" -ge "$need_bytes" ] || die "$WORK has $((avail >> 20)) MiB free, the run needs about $((need_bytes >> 20)) MiB"

# --- environment --------------------------------------------------------------------------------------------
disk_of() { # where WORK lives: the file system, its device, and the backing file of a loop device
  local src fstype back bsrc bfs
  read -r src fstype < <(findmnt -n -o SOURCE,FSTYPE --target "$WORK")
  case $src in
    /dev/loop*)
      back=$(losetup -n -O BACK-FILE "$src" 2> /dev/null | sed 's/ *$//')
      read -r bsrc bfs < <(findmnt -n -o SOURCE,FSTYPE --target "$back")
      echo "$fstype on $src, a loop file $back ($(du -h --apparent-size "$back" | cut -f1) apparent) on $bfs $bsrc" ;;
    *) echo "$fstype on $src" ;;
  esac
}
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "disk: $(disk_of)"
  echo "corpus: $CORPUS ($(awk '{printf "%.0f MiB", $1 / 1048576}' <<< "$corpus_bytes"), manifest sha256 $(sha256sum "$CORPUS_MANIFEST" | cut -c1-16)...)"
  if has_tool snapcrypt; then
    rev=$(git -C "$HERE" rev-parse --short HEAD 2> /dev/null || echo unknown)
    git -C "$HERE" diff --quiet HEAD -- src 2> /dev/null || rev="$rev+dirty src"
    echo "snapcrypt: $rev, node $("$NODE" --version)"
  fi
  has_tool restic && echo "restic: $(restic version | head -n1)"
  has_tool borg && echo "borg: $(borg --version)"
  has_tool rsync && echo "rsync: $(rsync --version | head -n1 | sed 's/  */ /g')"
  echo "ssh: $(ssh -V 2>&1), ciphers $SSH_CIPHERS"
  echo "tools: $TOOLS; no-change runs: $NOCHANGE_RUNS"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# --- the copy of the corpus ----------------------------------------------------------------------------------
step_msg() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)] $*"; }
step_msg "copying the corpus to $SRC"
mkdir -p "$SRC"
# big/ first: borg never keeps the file with the newest ctime in its files cache (race protection, see
# its FAQ), so that file is read again by every backup; copied last, that would be the 1 GiB image
cp -a --reflink=auto "$CORPUS/big" "$SRC/"
cp -a --reflink=auto "$CORPUS/tree" "$SRC/"
step_msg "checking the copy against $CORPUS_MANIFEST"
python3 "$BENCHLIB" verify "$SRC" "$CORPUS_MANIFEST" | tee "$OUT/verify-src.txt"
grep -q '^VERIFY OK' "$OUT/verify-src.txt" || die "the copy of the corpus differs from its manifest"

# --- the throwaway sshd ----------------------------------------------------------------------------------------
USER_NAME=$(id -un)
SERVER_CSV=$T/server.csv
: > "$SERVER_CSV"
ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$T/host_key"
timed() { echo "/usr/bin/time -a -o $SERVER_CSV -f $1,%e,%U,%S,%M"; }
cat > "$T/rsync-wrap" << 'EOF'
#!/bin/sh
# forced command of the rsync key: runs only "rsync --server ..." lines without shell metacharacters
NL='
'
case "$SSH_ORIGINAL_COMMAND" in
  *[\;\&\|\$\`\<\>\(\)\{\}\\\"\']* | *"$NL"*) echo "rsync-wrap: refused: $SSH_ORIGINAL_COMMAND" >&2; exit 1 ;;
  "rsync --server "*) ;;
  *) echo "rsync-wrap: refused: $SSH_ORIGINAL_COMMAND" >&2; exit 1 ;;
esac
exec @TIMED@ /bin/sh -c "$SSH_ORIGINAL_COMMAND"
EOF
sed -i "s|@TIMED@|$(timed rsync)|" "$T/rsync-wrap"
chmod 755 "$T/rsync-wrap"
: > "$T/authorized_keys"
for t in $TOOLS; do
  ssh-keygen -q -t ed25519 -N '' -C "bench-$t" -f "$T/key-$t"
  case $t in
    snapcrypt) cmd="$(timed snapcrypt) $NODE $SERVER_JS serve --area $SC_AREA" ;;
    restic) cmd="$(timed restic) /usr/lib/openssh/sftp-server" ;;
    borg) cmd="$(timed borg) env BORG_BASE_DIR=$T/borg-server borg serve --restrict-to-path $BORG_REPO_DIR" ;;
    rsync) cmd="$T/rsync-wrap" ;;
  esac
  echo "restrict,command=\"$cmd\" $(cat "$T/key-$t.pub")" >> "$T/authorized_keys"
done
chmod 600 "$T/authorized_keys"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# (Subsystem: needed for the subsystem request to be accepted at all; the forced command replaces it)
bench_sshd_start "$T" "$PORT" "$OUT/sshd.log" "MaxStartups 50
Subsystem sftp /usr/lib/openssh/sftp-server" || die "sshd did not start (see $OUT/sshd.log)"
# Each client's ssh reads only its own config file (restic splits -o values on commas, so the cipher
# list cannot be given on its command line).
for t in $TOOLS; do
  cat > "$T/ssh_config-$t" << EOF
Host *
  IdentityFile $T/key-$t
  IdentitiesOnly yes
  UserKnownHostsFile $T/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  Ciphers $SSH_CIPHERS
EOF
done
ssh_opts() { echo "-F $T/ssh_config-$1"; } # tool

# --- the clients --------------------------------------------------------------------------------------------
unset SNAPCRYPT_REPO SNAPCRYPT_TEST_WEAK_KDF RESTIC_REPOSITORY BORG_REPO
export SNAPCRYPT_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export SNAPCRYPT_CACHE_DIR=$CLIENT/snapcrypt/cache SNAPCRYPT_CONFIG_DIR=$CLIENT/snapcrypt/config
export SNAPCRYPT_SSH_OPTIONS
SNAPCRYPT_SSH_OPTIONS=$(ssh_opts snapcrypt)
SC_REPO="ssh://$USER_NAME@127.0.0.1:$PORT/"
RESTIC_ARGS=(-r "sftp:$USER_NAME@127.0.0.1:$RESTIC_REPO_DIR" -o "sftp.command=ssh $(ssh_opts restic) -p $PORT $USER_NAME@127.0.0.1 -s sftp" --cache-dir "$CLIENT/restic")
export BORG_BASE_DIR=$CLIENT/borg BORG_RSH
BORG_RSH="ssh $(ssh_opts borg)"
BORG_URL="ssh://$USER_NAME@127.0.0.1:$PORT$BORG_REPO_DIR"
RSYNC_OPTS=(--archive --hard-links --xattrs --numeric-ids --delete --inplace --no-whole-file -e "ssh $(ssh_opts rsync) -p $PORT")
RSYNC_REMOTE=$USER_NAME@127.0.0.1
mkdir -p "$SNAPCRYPT_CACHE_DIR" "$SNAPCRYPT_CONFIG_DIR" "$CLIENT/restic" "$BORG_BASE_DIR"
cat > "$T/rsync-backup" << EOF
#!/bin/sh
# rsync backup = rsync into the target + a read-only snapshot of it named \$1
set -e
rsync $(printf '%q ' "${RSYNC_OPTS[@]}") $SRC/ $RSYNC_REMOTE:$RSYNC_DIR/dst/
btrfs subvolume snapshot -r $RSYNC_DIR/dst $RSYNC_DIR/snaps/"\$1" > /dev/null
EOF
chmod 755 "$T/rsync-backup"

# --- measuring --------------------------------------------------------------------------------------------------
echo "tool,step,run,rc,wall_s,user_s,sys_s,max_rss_kb,server_procs,server_user_s,server_sys_s,server_max_rss_kb,other_cpu_s,load1,stored_bytes,apparent_bytes,client_state_bytes,verify" > "$CSV"
FAILED=0
CLK_TCK=$(getconf CLK_TCK)
cpu_busy() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
wait_server() { # until sshd has no session process left (each server process has written its line)
  local _
  for _ in $(seq 200); do
    pgrep -P "$SSHD_PID" > /dev/null || return 0
    sleep 0.05
  done
  echo "warning: sshd sessions still running after 10 s" >&2
}
LAST_ROW=
measure() { # [-C DIR] tool step run command...: run it under GNU time, append a row to $CSV
  local cwd=.
  if [ "$1" = -C ]; then cwd=$2; shift 2; fi
  local tool=$1 step=$2 run=$3 rc=0 lines busy0 busy1 load log
  shift 3
  log=$LOGS/$tool-$step-$run.log
  wait_server
  # what the steps before wrote goes to the disk first: the source and every tool's repository share
  # one file system here, and a tool whose commit flushes it (snapcrypt's sync -f and btrfs snapshot)
  # would otherwise pay for the others' writeback. Before this, snapcrypt's first run with no change,
  # right after rsync's first backup wrote 2.3 GiB, took 1.4-2.6 s against 0.79-1.23 s for the next
  # two (compare-13 to -16); the same backup with 2 GB of other data not yet written: 2.2 and 6.8 s,
  # after a sync 0.81-0.87 s
  sync
  lines=$(wc -l < "$SERVER_CSV")
  load=$(cut -d' ' -f1 /proc/loadavg)
  busy0=$(cpu_busy)
  (cd "$cwd" && exec /usr/bin/time -f "%e,%U,%S,%M" -o "$T/client.time" "$@") > "$log" 2>&1 || rc=$?
  wait_server
  busy1=$(cpu_busy)
  local client server
  client=$(tail -n1 "$T/client.time")
  server=$(tail -n +"$((lines + 1))" "$SERVER_CSV" | awk -F, -v t="$tool" '$1 == t {n++; u += $3; s += $4; if ($5 > m) m = $5} END {printf "%d,%.2f,%.2f,%d", n, u, s, m}')
  local other
  other=$(awk -F, -v c="$client" -v s="$server" -v b0="$busy0" -v b1="$busy1" -v hz="$CLK_TCK" 'BEGIN {
    split(c, a, ","); split(s, b, ","); printf "%.2f", (b1 - b0) / hz - a[2] - a[3] - b[2] - b[3] }')
  LAST_ROW="$tool,$step,$run,$rc,$client,$server,$other,$load"
  step_msg "$tool $step $run: rc $rc, wall $(cut -d, -f1 <<< "$client") s"
  if [ "$rc" != 0 ]; then
    FAILED=1
    echo "warning: $tool $step $run failed (exit status $rc); the end of $log:" >&2
    tail -n 5 "$log" >&2
  fi
  return 0
}
row() { # stored apparent client_state verify: finish the last measured row
  echo "$LAST_ROW,$1,$2,$3,$4" >> "$CSV"
}
server_dir() {
  case $1 in snapcrypt) echo "$SC_AREA" ;; restic) echo "$RESTIC_REPO_DIR" ;; borg) echo "$BORG_REPO_DIR" ;; rsync) echo "$RSYNC_DIR" ;; esac
}
sizes() { # tool: "stored,apparent,client_state" after a backup
  local tool=$1 dir apparent stored state=0
  dir=$(server_dir "$tool")
  sync
  stored=$(btrfs filesystem du -s --raw "$dir" | awk 'NR == 2 {printf "%.0f", $2 + $3}')
  case $tool in
    snapcrypt) apparent=$(du -sb "$SC_AREA/current" | cut -f1) ;;
    rsync) apparent=$(du -sb "$RSYNC_DIR/dst" | cut -f1) ;;
    *) apparent=$(du -sb "$dir" | cut -f1) ;;
  esac
  [ "$tool" = rsync ] || state=$(du -sb "$CLIENT/$tool" | cut -f1)
  echo "$stored,$apparent,$state"
}

backup_row() { # "stored,apparent,client_state" (from sizes): finish the last measured row, no verify column
  echo "$LAST_ROW,$1," >> "$CSV"
}
backup() { # tool step run
  local tool=$1 step=$2 run=$3
  case $tool in
    snapcrypt) measure snapcrypt "$step" "$run" "$SC_CLIENT" backup --repo "$SC_REPO" "$SRC/tree" "$SRC/big" ;;
    restic) measure restic "$step" "$run" restic "${RESTIC_ARGS[@]}" backup "$SRC/tree" "$SRC/big" ;;
    borg) measure borg "$step" "$run" borg create --compression lz4 --list --filter=AME "$BORG_URL::$step-$run" "$SRC/tree" "$SRC/big" ;;
    rsync) measure rsync "$step" "$run" "$T/rsync-backup" "$step-$run" ;;
  esac
  backup_row "$(sizes "$tool")"
}

# --- init ------------------------------------------------------------------------------------------------------
step_msg "init"
for t in $TOOLS; do
  case $t in
    snapcrypt) measure snapcrypt init 1 "$SC_CLIENT" init --repo "$SC_REPO" ;;
    restic) measure restic init 1 restic "${RESTIC_ARGS[@]}" init ;;
    borg) measure borg init 1 borg init --encryption=repokey-blake2 "$BORG_URL" ;;
    rsync)
      mkdir -p "$RSYNC_DIR/snaps"
      btrfs subvolume create "$RSYNC_DIR/dst" > /dev/null
      measure rsync init 1 true ;;
  esac
  row "" "" "" ""
  [ "$(tail -n1 "$CSV" | cut -d, -f4)" = 0 ] || die "$t init failed (see $LOGS/$t-init-1.log)"
done

# --- backups ------------------------------------------------------------------------------------------------------
for t in $TOOLS; do drop_caches; backup "$t" first 1; done
for run in $(seq "$NOCHANGE_RUNS"); do
  for t in $TOOLS; do backup "$t" nochange "$run"; done
done
step_msg "mutating $SRC"
"$MUTATE" "$SRC" 1 "$OUT/mutate-log.json" | tee "$OUT/mutate.txt"
python3 "$BENCHLIB" manifest "$SRC" "$OUT/mutated.manifest" | tee -a "$OUT/mutate.txt"
for t in $TOOLS; do backup "$t" mutated 1; done

# --- restores ------------------------------------------------------------------------------------------------------
first_id() { # tool: the first snapshot's ID (snapcrypt, restic)
  case $1 in
    snapcrypt) "$SC_CLIENT" snapshots --repo "$SC_REPO" --json |
      python3 -c 'import json, sys; s = [json.loads(l) for l in sys.stdin if l.strip()]; s = sorted((x for x in s if x.get("type") == "snapshot"), key=lambda x: x["time"]); print(s[0]["id"])' ;;
    restic) restic "${RESTIC_ARGS[@]}" snapshots --json |
      python3 -c 'import json, sys; s = sorted(json.load(sys.stdin), key=lambda x: x["time"]); print(s[0]["short_id"])' ;;
  esac
}
for t in $TOOLS; do
  r=$WORK/restore-$t
  rm -rf "$r"
  mkdir -p "$r"
  drop_caches
  case $t in
    snapcrypt) measure snapcrypt restore-full 1 "$SC_CLIENT" restore --repo "$SC_REPO" latest --target "$r" ;;
    restic) measure restic restore-full 1 restic "${RESTIC_ARGS[@]}" restore latest --target "$r" ;;
    borg) measure -C "$r" borg restore-full 1 borg extract "$BORG_URL::mutated-1" ;;
    rsync)
      mkdir -p "$r$SRC"
      measure rsync restore-full 1 rsync "${RSYNC_OPTS[@]}" "$RSYNC_REMOTE:$RSYNC_DIR/snaps/mutated-1/" "$r$SRC/" ;;
  esac
  step_msg "verifying $t's restore against the mutated manifest"
  v=$(python3 "$BENCHLIB" verify "$r$SRC" "$OUT/mutated.manifest" 2>&1 | tail -n1) || true
  echo "$t: $v" | tee -a "$OUT/verify-restore.txt"
  case $v in "VERIFY OK"*) ;; *) FAILED=1 ;; esac
  # the summary line without commas, for the CSV
  row "" "" "" "$(sed -E 's/ \(e\.g\. [^)]*\)//g; s/,/;/g' <<< "$v")"
  rm -rf "$r"
done

ONE_FILE=${ONE_FILE:-$(python3 -c 'import json, sys; print("tree/" + json.load(open(sys.argv[1]))["appended_logs"][0])' "$OUT/mutate-log.json")}
one_sha=$(awk -F'\t' -v p="$ONE_FILE" '$2 == p {print $6}' "$CORPUS_MANIFEST")
[ -n "$one_sha" ] || die "$ONE_FILE is not a file of the corpus manifest"
one_sha_now=$(awk -F'\t' -v p="$ONE_FILE" '$2 == p {print $6}' "$OUT/mutated.manifest")
echo "one file: $ONE_FILE, sha256 in the first snapshot $one_sha, after the mutation ${one_sha_now:-(deleted or renamed)}" | tee "$OUT/one-file.txt"
for t in $TOOLS; do
  r=$WORK/restore-$t
  rm -rf "$r"
  mkdir -p "$r"
  case $t in
    snapcrypt) measure snapcrypt restore-one 1 "$SC_CLIENT" restore --repo "$SC_REPO" "$(first_id snapcrypt):$SRC/$ONE_FILE" --target "$r" ;;
    restic) measure restic restore-one 1 restic "${RESTIC_ARGS[@]}" restore "$(first_id restic)" --target "$r" --include "$SRC/$ONE_FILE" ;;
    borg) measure -C "$r" borg restore-one 1 borg extract "$BORG_URL::first-1" "${SRC#/}/$ONE_FILE" ;;
    rsync) measure rsync restore-one 1 rsync "${RSYNC_OPTS[@]}" "$RSYNC_REMOTE:$RSYNC_DIR/snaps/first-1/$ONE_FILE" "$r/" ;;
  esac
  mapfile -t got < <(find "$r" -type f)
  if [ "${#got[@]}" = 1 ] && [ "$(sha256sum "${got[0]}" | cut -d' ' -f1)" = "$one_sha" ]; then
    v="OK sha256"
  else
    v="FAIL (${#got[@]} files; sha256 differs or missing)"
    FAILED=1
  fi
  echo "$t one file: $v" | tee -a "$OUT/verify-restore.txt"
  row "" "" "" "$v"
  rm -rf "$r"
done

# --- summary ---------------------------------------------------------------------------------------------------------
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
python3 "$SUMMARY_PY" "$CSV" "$OUT/env.txt" "$OUT/summary.csv" "$OUT/summary.md" "$ONE_FILE"
echo
cat "$OUT/summary.md"
[ "$FAILED" = 0 ] || { echo "compare.sh: some steps failed or did not verify (see $CSV and $LOGS)" >&2; exit 1; }
