# bench/sshd-lib.sh — the throwaway sshd of the benchmarks, sourced by bench/compare.sh and
# bench/server-rss.sh.
#
#   bench_sshd_start DIR PORT LOG [EXTRA_CONFIG_LINES]
#
# DIR holds host_key, host_key.pub and authorized_keys. Writes DIR/sshd_config (127.0.0.1:PORT, only
# that host key and those keys, forced commands only, no PAM or passwords, the invoking user only,
# plus EXTRA_CONFIG_LINES), starts `/usr/sbin/sshd -D` with its log in LOG, sets SSHD_PID, waits until
# it listens and writes DIR/known_hosts for it. Returns 1 (LOG on stderr) if it does not start.
#
# `SetEnv SHLVL=1`: sshd runs every forced command through the invoking user's shell (`bash -c`),
# and Debian's bash, started by sshd as a top-level shell, reads ~/.bashrc. On the machines these
# benchmarks run on, root's .bashrc starts pyenv: 0.1 s per connection (hyperfine, one file restored
# over SSH: 431 ms against 332 ms), for every tool, and none of it any tool's own work. With SHLVL=1
# in the session's environment bash counts itself a nested shell and reads no .bashrc, as a backup
# account with the shell /bin/sh (the one `snapcrypt-server user add` makes) reads none.
bench_sshd_start() {
  local dir=$1 port=$2 log=$3 extra=${4:-}
  if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd && chmod 755 /run/sshd; fi
  cat > "$dir/sshd_config" << EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
PidFile none
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin forced-commands-only
AllowUsers $(id -un)
PrintMotd no
PrintLastLog no
SetEnv SHLVL=1
$extra
LogLevel INFO
EOF
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2> "$log" &
  SSHD_PID=$!
  for _ in $(seq 100); do
    grep -q "Server listening on 127.0.0.1 port" "$log" && break
    kill -0 "$SSHD_PID" 2> /dev/null || break
    sleep 0.1
  done
  if ! grep -q "Server listening on 127.0.0.1 port" "$log"; then
    echo "sshd did not start:" >&2
    cat "$log" >&2
    return 1
  fi
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$dir/host_key.pub")" > "$dir/known_hosts"
}
