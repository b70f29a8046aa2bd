#!/usr/bin/env python3
"""Summary of bench/compare.sh's results.csv: one row per tool (summary.csv) and markdown tables.

    compare_summary.py RESULTS_CSV ENV_TXT SUMMARY_CSV SUMMARY_MD ONE_FILE

Wall and CPU seconds per step (no change: the median of its runs), peak RSS of client and server over
all steps but init, bytes stored after the first backup and the extra bytes after the mutation
(stored after `mutated` minus stored after the last no-change run), and wall-time ratios against
restic (> 1: slower than restic). Standard library only.
"""
import csv
import statistics
import sys

MiB = 1 << 20
STEPS = [("first", "first backup"), ("nochange", "no change (median)"), ("mutated", "after mutation"),
         ("restore-full", "full restore"), ("restore-one", "one file")]


def main():
    results, env_txt, out_csv, out_md, one_file = sys.argv[1:6]
    rows = list(csv.DictReader(open(results)))
    tools = []
    for r in rows:
        if r["tool"] not in tools:
            tools.append(r["tool"])

    def sel(tool, step):
        return [r for r in rows if r["tool"] == tool and r["step"] == step]

    def wall(tool, step):
        rs = [float(r["wall_s"]) for r in sel(tool, step) if r["rc"] == "0"]
        return statistics.median(rs) if rs else None

    def cpu(tool, step):
        rs = [float(r["user_s"]) + float(r["sys_s"]) + float(r["server_user_s"]) + float(r["server_sys_s"])
              for r in sel(tool, step) if r["rc"] == "0"]
        return statistics.median(rs) if rs else None

    def last_stored(tool, step):
        rs = [r for r in sel(tool, step) if r["stored_bytes"]]
        return int(float(rs[-1]["stored_bytes"])) if rs else None

    def fmt(v, nd=2):
        return "–" if v is None else "%.*f" % (nd, v)

    summary = []
    for t in tools:
        measured = [r for r in rows if r["tool"] == t and r["step"] != "init"]
        s = {"tool": t}
        for step, _ in STEPS:
            s["wall_" + step] = wall(t, step)
            s["cpu_" + step] = cpu(t, step)
        s["client_peak_rss_mib"] = max((int(r["max_rss_kb"]) for r in measured), default=0) / 1024
        s["server_peak_rss_mib"] = max((int(r["server_max_rss_kb"]) for r in measured), default=0) / 1024
        first = last_stored(t, "first")
        nochange = last_stored(t, "nochange")
        mutated = last_stored(t, "mutated")
        s["stored_first_mib"] = first / MiB if first is not None else None
        base = nochange if nochange is not None else first
        s["stored_extra_mutation_mib"] = (mutated - base) / MiB if mutated is not None and base is not None else None
        ap = [r for r in sel(t, "mutated") if r["apparent_bytes"]]
        s["apparent_after_mutation_mib"] = int(float(ap[-1]["apparent_bytes"])) / MiB if ap else None
        st = [r for r in sel(t, "mutated") if r["client_state_bytes"]]
        s["client_state_mib"] = int(float(st[-1]["client_state_bytes"])) / MiB if st else None
        s["verify_full"] = ";".join(r["verify"] for r in sel(t, "restore-full")) or "–"
        s["verify_one"] = ";".join(r["verify"] for r in sel(t, "restore-one")) or "–"
        s["failed_runs"] = sum(1 for r in rows if r["tool"] == t and r["rc"] != "0")
        summary.append(s)
    ref = next((s for s in summary if s["tool"] == "restic"), None)
    for s in summary:
        for step, _ in STEPS:
            a, b = s["wall_" + step], ref and ref["wall_" + step]
            s["ratio_" + step] = a / b if a and b else None

    cols = (["tool"] + ["wall_" + st for st, _ in STEPS] + ["cpu_" + st for st, _ in STEPS] +
            ["client_peak_rss_mib", "server_peak_rss_mib", "stored_first_mib", "stored_extra_mutation_mib",
             "apparent_after_mutation_mib", "client_state_mib"] + ["ratio_" + st for st, _ in STEPS] +
            ["verify_full", "verify_one", "failed_runs"])
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in summary:
            w.writerow([("%.3f" % s[c]) if isinstance(s[c], float) else ("" if s[c] is None else s[c]) for c in cols])

    loads = [float(r["load1"]) for r in rows if r["step"] != "init"]
    other = [float(r["other_cpu_s"]) for r in rows if r["step"] != "init"]
    walls = [float(r["wall_s"]) for r in rows if r["step"] != "init"]
    nruns = max((int(r["run"]) for r in rows if r["step"] == "nochange"), default=0)
    md = ["# bench/compare.sh", ""]
    md += ["    " + line.rstrip("\n") for line in open(env_txt)]
    md += ["", "1-minute load at the start of the measured steps: %.2f to %.2f (median %.2f); the rest of the "
           "machine (other workers, kernel writeback) used %.0f CPU-s during the %.0f s measured, "
           "%.2f cores on average." % (min(loads), max(loads), statistics.median(loads), sum(other),
                                       sum(walls), sum(other) / sum(walls) if sum(walls) else 0), ""]
    md += ["Wall seconds per step (no change: median of %d runs), peak RSS (largest process, any step but "
           "init), bytes stored on the server (btrfs data extents, shared ones once) after the first backup "
           "and the extra after the mutation:" % nruns, ""]
    md.append("| tool | " + " | ".join(n for _, n in STEPS) +
              " | client peak RSS MiB | server peak RSS MiB | stored after first MiB | extra after mutation MiB |")
    md.append("|---|" + "---:|" * (len(STEPS) + 4))
    for s in summary:
        md.append("| %s | %s | %.0f | %.0f | %s | %s |" % (
            s["tool"], " | ".join(fmt(s["wall_" + st]) for st, _ in STEPS), s["client_peak_rss_mib"],
            s["server_peak_rss_mib"], fmt(s["stored_first_mib"], 0), fmt(s["stored_extra_mutation_mib"], 1)))
    md += ["", "CPU seconds, client + server (user + sys), same steps:", ""]
    md.append("| tool | " + " | ".join(n for _, n in STEPS) + " |")
    md.append("|---|" + "---:|" * len(STEPS))
    for s in summary:
        md.append("| %s | %s |" % (s["tool"], " | ".join(fmt(s["cpu_" + st], 1) for st, _ in STEPS)))
    if ref is not None:
        md += ["", "Wall time against restic (> 1: slower than restic):", ""]
        md.append("| tool | " + " | ".join(n for _, n in STEPS) + " |")
        md.append("|---|" + "---:|" * len(STEPS))
        for s in summary:
            md.append("| %s | %s |" % (s["tool"], " | ".join(
                "–" if s["ratio_" + st] is None else "%.2f" % s["ratio_" + st] for st, _ in STEPS)))
    md += ["", "Checks: full restore of the latest snapshot against the mutated tree's manifest (benchlib.py "
           "verify: content, types, symlink targets hard; modes, mtimes, owners reported); one file `%s` "
           "from the first snapshot against its sha256 in the corpus manifest." % one_file, ""]
    md.append("| tool | full restore | one file | client state MiB | failed runs |")
    md.append("|---|---|---|---:|---:|")
    for s in summary:
        md.append("| %s | %s | %s | %s | %d |" % (s["tool"], s["verify_full"], s["verify_one"],
                                                fmt(s["client_state_mib"], 0), s["failed_runs"]))
    with open(out_md, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
