#!/usr/bin/env bash
# bench/local.sh — snapcrypt and restic, local repositories, the ../shared/bench corpus.
#
#   bench/local.sh CORPUS_DIR OUT_DIR
#
# CORPUS_DIR is what ../shared/bench/make_corpus.sh built (tree/ and big/). For each tool: a first
# backup into a new repository (page cache dropped first when run as root), then a backup with no
# change (3 runs). Wall time, CPU and peak RSS come from GNU time; bytes stored from du. Results go
# to OUT_DIR/results.csv and a markdown table on stdout. Needs: GNU time, restic.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=$(realpath "${1:?usage: bench/local.sh CORPUS_DIR OUT_DIR}")
OUT=$(realpath -m "${2:?usage: bench/local.sh CORPUS_DIR OUT_DIR}")
mkdir -p "$OUT"
SNAPCRYPT_ROOT=$HERE
. "$HERE/scripts/env.sh"
snapcrypt_find_node || { echo "no node >= 24: run ./install.sh" >&2; exit 1; }
NODE=$SNAPCRYPT_NODE
SC=("$NODE" "$HERE/dist/src/programs/snapcrypt.js")
export SNAPCRYPT_PASSWORD=bench RESTIC_PASSWORD=bench
export SNAPCRYPT_CACHE_DIR="$OUT/sc-cache" SNAPCRYPT_CONFIG_DIR="$OUT/sc-config"
CSV="$OUT/results.csv"
echo "tool,step,run,wall_s,user_s,sys_s,max_rss_kb" > "$CSV"

drop_caches() { sync; if [ "$(id -u)" = 0 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }

measure() { # tool step run cmd...
  local tool=$1 step=$2 run=$3; shift 3
  /usr/bin/time -f "%e,%U,%S,%M" -o "$OUT/time.tmp" "$@" > "$OUT/$tool-$step-$run.log" 2>&1
  echo "$tool,$step,$run,$(cat "$OUT/time.tmp")" >> "$CSV"
}

rm -rf "$OUT/sc-repo" "$OUT/restic-repo" "$OUT/sc-cache" "$OUT/sc-config" "$HOME/.cache/restic"
"${SC[@]}" init --repo "$OUT/sc-repo" > /dev/null
restic -r "$OUT/restic-repo" init -q > /dev/null

drop_caches; measure snapcrypt first 1 "${SC[@]}" backup --repo "$OUT/sc-repo" "$CORPUS/tree" "$CORPUS/big"
drop_caches; measure restic first 1 restic -r "$OUT/restic-repo" backup -q "$CORPUS/tree" "$CORPUS/big"
for run in 1 2 3; do
  measure snapcrypt nochange "$run" "${SC[@]}" backup --repo "$OUT/sc-repo" "$CORPUS/tree" "$CORPUS/big"
  measure restic nochange "$run" restic -r "$OUT/restic-repo" backup -q "$CORPUS/tree" "$CORPUS/big"
done
sc_bytes=$(du -sb "$OUT/sc-repo/current" | cut -f1)
restic_bytes=$(du -sb "$OUT/restic-repo" | cut -f1)

echo "| tool | first backup (s) | CPU (s) | peak RSS (MiB) | no change, median of 3 (s) | stored (MiB) |"
echo "|---|---:|---:|---:|---:|---:|"
for tool in snapcrypt restic; do
  first=$(awk -F, -v t=$tool '$1==t && $2=="first" {printf "%.1f|%.1f|%.0f", $4, $5+$6, $7/1024}' "$CSV")
  nc=$(awk -F, -v t=$tool '$1==t && $2=="nochange" {print $4}' "$CSV" | sort -n | sed -n 2p)
  bytes=$([ $tool = snapcrypt ] && echo "$sc_bytes" || echo "$restic_bytes")
  IFS='|' read -r w c r <<< "$first"
  printf '| %s | %s | %s | %s | %s | %d |\n' "$tool" "$w" "$c" "$r" "$nc" $((bytes / 1048576))
done
