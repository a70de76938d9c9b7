"""The report: the summary of the runs, the table and its notes on stdout, results.json, the
chart."""

import json
import os
import statistics
import subprocess
import sys

from .common import (BENCH, HB_AFTER, IDLE_BEFORE, METHODS, PLAIN_MAX_BANDWIDTH, SAMPLE_PERIOD,
                     WINDOW_AFTER, log)


def print_header(info, sizes, runs, methods):
    """What is measured on what, before the runs."""
    print(f"qemu-liveupgrade bench  {info['date']}  commit {info.get('commit')}")
    print(f"machine: nproc {info['nproc']}, memory {info.get('mem_total_mib')} MiB, "
          f"CPU {info.get('cpu')}, kernel {info['kernel']}, {info.get('os')}")
    print(f"load average {info['loadavg_start']:.2f}, other QEMU processes running: "
          f"{info['other_qemu_processes']}")
    for v, s in info["qemu"].items():
        print(f"QEMU {v}: {s}")
    print(f"sizes {sizes} MiB, {runs} runs each, methods: "
          + ", ".join(METHODS[m] for m in methods))
    print("guest: heartbeat.elf under TCG (-machine pc, -nodefaults), a heartbeat line about every "
          "1 ms on the serial console, all RAM checked and rewritten continuously")
    sys.stdout.flush()


COLUMNS = [
    # (key, header, format)
    ("pause_ms", "pause ms", "{:.1f}"),
    ("swap_gap_ms", "swap gap ms", "{:.1f}"),
    ("outside_qemu_pause_ms", "swap gap beyond STOP->RESUME ms", "{:.1f}"),
    ("idle_max_gap_ms", "idle gap ms", "{:.1f}"),
    ("qemu_downtime_ms", "QEMU downtime ms", "{:.0f}"),
    ("total_ms", "total ms (reported)", "{:.0f}"),
    ("total_measured_ms", "total ms (measured)", "{:.0f}"),
    ("bytes_sent_mb", "sent MB", "{:.2f}"),
    ("peak_extra_mib", "peak extra MiB", "{:.0f}"),
    ("pss_delta_after_mib", "Pss after-before MiB", "{:.0f}"),
    ("qmp_same_conn_ms", "same-QMP ms", "{:.0f}"),
]


def summarize(runs):
    groups = {}
    for r in runs:
        if r.get("bytes_sent") is not None:
            r["bytes_sent_mb"] = r["bytes_sent"] / 1e6
        groups.setdefault((r["method"], r["size_mib"]), []).append(r)
    summary = []
    for (method, size), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        row = {"method": method, "label": METHODS[method], "size_mib": size,
               "runs": len(rs), "ok": len(ok)}
        for key, _, _ in COLUMNS:
            vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if vals:
                row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        row["guest_max_err"] = max((r.get("guest_max_err", 0) for r in rs), default=0)
        row["hb_continue"] = f"{sum(1 for r in ok if r.get('hb_continue'))}/{len(rs)}"
        conts = [r.get("counters_continue") for r in ok if "counters_continue" in r]
        row["counters_continue"] = f"{sum(1 for c in conts if c)}/{len(conts)}" if conts else "-"
        notes = sorted({r["qmp_same_conn"] for r in ok if r.get("qmp_same_conn_ms") is None
                        and r.get("qmp_same_conn")})
        row["qmp_note"] = "; ".join(notes)
        row["errors"] = [r["error"] for r in rs if not r.get("ok")]
        row["not_converged"] = sum(1 for r in rs if r.get("converged") is False)
        summary.append(row)
    return summary


def cell(stat, fmt):
    if not stat:
        return "-"
    med = fmt.format(stat["median"])
    if stat["min"] == stat["max"]:
        return med
    return f"{med} ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"


def print_table(summary):
    headers = ["method", "MiB", "ok"] + [h for _, h, _ in COLUMNS] + ["guest err", "HB after", "HB counters"]
    rows = []
    for s in summary:
        qmp = cell(s.get("qmp_same_conn_ms"), "{:.0f}")
        if qmp == "-" and s.get("qmp_note"):
            qmp = s["qmp_note"]
        cells = [s["label"], str(s["size_mib"]), f"{s['ok']}/{s['runs']}"]
        for key, _, fmt in COLUMNS:
            cells.append(qmp if key == "qmp_same_conn_ms" else cell(s.get(key), fmt))
        cells += [str(s["guest_max_err"]), s["hb_continue"], s["counters_continue"]]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for s in summary:
        for e in s["errors"]:
            print(f"  ! {s['label']} {s['size_mib']} MiB: {e}")


def print_notes(runs):
    """What the table's columns mean and how each method was set up."""
    print("pause: longest gap between heartbeat lines as timestamped on the host, from the trigger to "
          f"{WINDOW_AFTER:.0f} s after completion;")
    print(f"       idle gap is the same measure over the {IDLE_BEFORE:.0f} s before the trigger (background jitter).")
    print("trigger: ours = SIGUSR2 to the shim; plain/cpr = start of the destination QEMU. "
          "completion: ours = the shim's report line; plain/cpr = destination running.")
    print("total ms (reported): ours = report total_ms; plain/cpr = query-migrate total-time "
          "(migrate command to completion).")
    plain = [r for r in runs if r["method"] == "plain" and r.get("defaults")]
    if plain:
        d = plain[0]["defaults"]
        print(f"plain migration: max-bandwidth set to {PLAIN_MAX_BANDWIDTH} B/s (QEMU default "
              f"{d.get('max-bandwidth')} B/s), downtime-limit left at QEMU's default "
              f"({d.get('downtime-limit')} ms), anonymous RAM, unix socket.")
    print("cpr-transfer: memory-backend-memfd share=on, -machine aux-ram-share=on, destination with "
          "-incoming unix:MAIN and -incoming cpr,...unix; migrate mode=cpr-transfer with both channels.")
    print(f"peak extra: max over samples every {SAMPLE_PERIOD * 1000:.0f} ms (trigger to completion + 0.5 s) of "
          "the process tree's memory, minus the same just before the trigger; memory = RssAnon + VmPTE")
    print("       of every process (/proc/PID/status) + each memfd/shm object the tree maps or holds, "
          "once (st_blocks). Pss after-before: sum of Pss")
    print("       (smaps_rollup) over the tree after the pause window minus before the idle second. "
          "smaps_rollup is not sampled during the swap: it takes")
    print("       ~100 ms for 2 GiB of memfd RAM in 4 KiB pages (~1 ms for anonymous RAM in huge pages), and a "
          "Pss sum over-counts while a second QEMU maps a memfd.")
    print("same-QMP: SIGUSR2 to the new QEMU answering query-version on a QMP connection opened "
          "before (10.0.2->10.0.2: after status --json shows the next generation).")
    print(f"HB after: runs with >= {HB_AFTER} heartbeats after completion. HB counters: runs where the "
          "guest's heartbeat counter went on by 1..3 across the swap")
    print("       (plain/cpr: destination's first = source's last + 1..3, a line the guest was writing when "
          "stopped put together; ours: every step in the window).")


def write_results(out_dir, info, args, summary, runs):
    """All of it, raw runs included, to OUT_DIR/results.json; returns that path."""
    results = {"machine": info, "config": {
        "sizes_mib": args.sizes, "runs": args.runs, "methods": args.methods,
        "sample_period_ms": SAMPLE_PERIOD * 1000, "window_after_s": WINDOW_AFTER,
        "idle_before_s": IDLE_BEFORE, "hb_after_required": HB_AFTER,
        "plain_max_bandwidth": PLAIN_MAX_BANDWIDTH,
    }, "summary": summary, "runs": runs}
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    return json_path


SYSTEM_PYTHON = "/usr/bin/python3"


def draw_chart(summary, path, sizes, methods, json_path=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        # Run under another interpreter (a pyenv python3, say): Debian's python3-matplotlib
        # belongs to the system's, which can draw from the results file.
        if json_path and os.path.realpath(sys.executable) != os.path.realpath(SYSTEM_PYTHON) \
                and os.path.exists(SYSTEM_PYTHON):
            r = subprocess.run([SYSTEM_PYTHON, BENCH, "--chart", json_path, path])
            return r.returncode == 0
        log("matplotlib missing: no chart (apt-get install python3-matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / max(1, len(methods))
    by = {(s["method"], s["size_mib"]): s for s in summary}
    for ax, key, title, log_scale in (
        (axes[0], "pause_ms", "longest heartbeat gap (median, ms; log scale)", True),
        (axes[1], "peak_extra_mib", "peak extra memory of the process tree (median, MiB; RssAnon+PTE, shmem once)", False),
    ):
        for i, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for j, size in enumerate(sizes):
                st = by.get((m, size), {}).get(key)
                if st:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(max(st["median"], 0.1) if log_scale else st["median"])
                    lo.append(max(0, ys[-1] - st["min"]))
                    hi.append(max(0, st["max"] - ys[-1]))
            for j, size in enumerate(sizes):
                row = by.get((m, size))
                if row and not row.get(key) and row["runs"]:
                    # Every run failed (plain migration that did not converge): say so.
                    why = "did not converge" if row.get("not_converged") == row["runs"] else "failed"
                    ax.annotate(why, (j + (i - (len(methods) - 1) / 2) * width, 0),
                                xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                fontsize=7, rotation=90, xytext=(0, 4), textcoords="offset points")
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, label=METHODS[m], yerr=[lo, hi], capsize=3)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                            (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
            if key == "pause_ms":
                # The same measure over the second before the trigger: the machine's own jitter.
                idle = [(x, by[(m, size)]["idle_max_gap_ms"]["median"])
                        for x, size in zip(xs, [s for s in sizes if by.get((m, s), {}).get(key)])
                        if by[(m, size)].get("idle_max_gap_ms")]
                if idle:
                    ax.scatter([x for x, _ in idle], [y for _, y in idle], marker="_", s=300,
                               color="black", zorder=3,
                               label="idle jitter (same measure, 1 s before)" if i == 0 else None)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{s} MiB" for s in sizes])
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(bottom=1)
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(axis="y", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Moving a running guest to a new QEMU (heartbeat guest, TCG); bars: median, whiskers: min-max",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
