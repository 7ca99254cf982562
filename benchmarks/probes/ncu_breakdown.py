"""Per-kernel time and DRAM bytes of one steady-state Flora step, from ncu's CSV of every
launch of ncu_probe.py's steps (kernels run one at a time under ncu, so the sum is the
step's kernel time without the side streams' overlap):

    ncu --clock-control none --csv --metrics \\
        gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python benchmarks/probes/ncu_probe.py bfloat16 compressed 7b > /tmp/ncu.csv
    python benchmarks/probes/ncu_breakdown.py /tmp/ncu.csv

A step starts at a stats launch that follows another kernel; the last complete step is
reported (not the first: plans are made and norm caches filled there).
"""
import csv
import re
import sys
from collections import defaultdict

METRICS = {"gpu__time_duration.sum": "ns", "dram__bytes_read.sum": "read",
           "dram__bytes_write.sum": "write"}
# ncu's units, to nanoseconds and bytes
UNITS = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6,
         "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}


def short_name(kernel):
    """`void (anonymous namespace)::stats_kernel<1>(TaskTable, ...)` -> `stats_kernel<1>`."""
    name = kernel.replace("(anonymous namespace)::", "").replace("unnamed>::", "")
    name = name.split("(")[0].removeprefix("void ")
    depth, cut = 0, 0
    for k, c in enumerate(name):  # the last `::` outside template arguments
        depth += (c == "<") - (c == ">")
        if depth == 0 and name.startswith("::", k):
            cut = k + 2
    return name[cut:] or kernel


def launches(lines):
    """The launches of ncu's CSV output, in order: dicts of name and the METRICS present."""
    rows = csv.reader(line for line in lines if line.startswith('"'))
    header = next(rows, None)
    if header is None:
        return []
    col = {h: k for k, h in enumerate(header)}
    by_id = {}
    for row in rows:
        launch_id = int(row[col["ID"]])
        if launch_id not in by_id:  # one row a metric: name the launch once
            by_id[launch_id] = {"name": short_name(row[col["Kernel Name"]])}
        launch = by_id[launch_id]
        metric = row[col["Metric Name"]]
        if metric in METRICS:
            unit = row[col["Metric Unit"]]
            if unit not in UNITS:
                raise ValueError(f"ncu_breakdown: unit {unit!r} of {metric} is not one of "
                                 f"{sorted(UNITS)}")
            value = float(row[col["Metric Value"]].replace(",", ""))
            launch[METRICS[metric]] = value * UNITS[unit]
    return [by_id[k] for k in sorted(by_id)]


def steps(all_launches):
    """Splits the launches into steps, each starting at a stats launch after another kernel."""
    out, previous_stats = [], False
    for launch in all_launches:
        is_stats = launch["name"].startswith("stats")
        if is_stats and not previous_stats:
            out.append([])
        if out:
            out[-1].append(launch)
        previous_stats = is_stats
    return out


def breakdown(step):
    """Per kernel name: time (ms), launches, DRAM bytes (GB) and rate (TB/s), longest first."""
    total = defaultdict(lambda: [0.0, 0, 0.0])
    for launch in step:
        entry = total[launch["name"]]
        entry[0] += launch.get("ns", 0.0) / 1e6
        entry[1] += 1
        entry[2] += (launch.get("read", 0.0) + launch.get("write", 0.0)) / 1e9
    return sorted(((name, ms, count, gb, gb / ms if ms else 0.0)
                   for name, (ms, count, gb) in total.items()), key=lambda r: -r[1])


def main(path):
    with open(path) as f:
        found = steps(launches(f))
    if len(found) < 2:
        sys.exit(f"{path}: {len(found)} step(s) found; profile at least two (ncu_probe.py "
                 "steps four)")
    # the last step, unless cut short (ncu's --launch-count)
    step = found[-1] if len(found[-1]) >= len(found[-2]) else found[-2]
    rows = breakdown(step)
    print(f"{len(found)} steps; step {found.index(step) + 1}: {len(step)} launches, "
          f"{sum(r[1] for r in rows):.2f} ms of kernel time")
    print("| kernel | ms | launches | DRAM GB | TB/s |\n|---|---|---|---|---|")
    for name, ms, count, gb, rate in rows:
        print(f"| {name} | {ms:.3f} | {count} | {gb:.2f} | {rate:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
