"""The pause taken apart: the swap's timeline (the shim's report, or QEMU's own events for
plain migration and cpr-transfer) with the guest's longest heartbeat gap laid on it.

Every moment is in ms after `migrate` was issued, on CLOCK_MONOTONIC, the clock of
time.monotonic() here, of the heartbeat stamper and of the shim. QEMU stamps its events with the
wall clock; they are moved onto CLOCK_MONOTONIC through the offset between the two clocks.

The swap gap is the heartbeat gap the swap itself made: for the shim the one around the new
QEMU's RESUME, for plain migration and cpr-transfer from the source's last heartbeat to the
destination's first. Unlike the longest gap in the window (the table's "pause"), another
process stalling the guest a second later on a busy machine does not land in it. The swap gap
minus the time from the old QEMU's STOP to the new one's RESUME is what the guest lost that
QEMU did not spend stopped: the heartbeat period, the output's way to the host, anything
competing for the CPUs, and for the shim the launcher's share of the pause.
"""

import statistics
import time

# (key in the run's timeline, column header), in the order a swap goes through them.
POINTS = [
    ("hb_last", "last HB"),  # the swap gap's ends
    ("old_stop", "STOP"),
    ("stream_end", "stream end"),
    ("loaded", "loaded"),
    ("resume", "RESUME"),
    ("hb_first", "first HB"),
    ("seen", "seen"),
    ("cont", "cont"),
    ("switched", "switched"),
    ("console_first_byte", "console"),
    ("monitor_first_reply", "monitor"),
    ("old_killed", "old killed"),
    ("old_reaped", "old reaped"),
]


def event_monotonic(event):
    """When QEMU emitted `event`, on time.monotonic()'s clock; None without a timestamp."""
    ts = event.get("timestamp") or {}
    if "seconds" not in ts:
        return None
    wall = ts["seconds"] + ts.get("microseconds", 0) / 1e6
    return wall - (time.time() - time.monotonic())


def from_report(run, pause, hb_times):
    """The shim's `pause` report: moments in us after migrate, migrate on CLOCK_MONOTONIC;
    `hb_times`, every heartbeat's arrival, for the swap gap."""
    if not pause or pause.get("migrate_monotonic_us") is None:
        return
    origin = pause["migrate_monotonic_us"] / 1e6
    moments = {}
    for key, _ in POINTS:
        us = pause.get(f"{key}_us")
        if us is not None:
            moments[key] = us / 1000.0
    if "resume" in moments:
        resume = origin + moments["resume"] / 1000
        after = [t for t in hb_times if t >= resume]
        before = [t for t in hb_times if t < resume]
        if after and before:
            run["swap_gap_ms"] = round((min(after) - max(before)) * 1000, 3)
            moments["hb_last"] = (max(before) - origin) * 1000
            moments["hb_first"] = (min(after) - origin) * 1000
    finish(run, origin, moments)


def from_events(run, t_migrate, src_qmp, dst_qmp):
    """Plain migration and cpr-transfer: the source's STOP and MIGRATION completed, the
    destination's RESUME and MIGRATION completed, from the events the bench's own monitor
    connections received (a destination's RESUME sent before the bench could connect is
    missing)."""
    moments = {}

    def first(qmp, pred):
        if qmp is None:
            return None
        with qmp.cond:
            for _, e in qmp.events:
                t = event_monotonic(e)
                if t is not None and t >= t_migrate - 0.001 and pred(e):
                    return t
        return None

    def completed(e):
        return e.get("event") == "MIGRATION" and (e.get("data") or {}).get("status") == "completed"

    if run.get("switch_gap_ms") is not None:
        run["swap_gap_ms"] = run["switch_gap_ms"]
        moments["hb_last"] = (run["switch_from_s"] - t_migrate) * 1000
        moments["hb_first"] = (run["switch_to_s"] - t_migrate) * 1000
    for key, qmp, pred in (
        ("old_stop", src_qmp, lambda e: e.get("event") == "STOP"),
        ("stream_end", src_qmp, completed),
        ("loaded", dst_qmp, completed),
        ("resume", dst_qmp, lambda e: e.get("event") == "RESUME"),
    ):
        t = first(qmp, pred)
        if t is not None:
            moments[key] = (t - t_migrate) * 1000
    finish(run, t_migrate, moments)


def finish(run, origin, moments):
    """Adds the derived figures to `run`."""
    run["timeline_ms"] = {k: round(v, 3) for k, v in moments.items()}
    if "resume" in moments and "old_stop" in moments:
        stopped = moments["resume"] - moments["old_stop"]
        run["qemu_pause_ms"] = round(stopped, 3)
        if run.get("swap_gap_ms") is not None:
            run["outside_qemu_pause_ms"] = round(run["swap_gap_ms"] - stopped, 3)
    if run.get("pause_ms") is not None and run.get("qemu_downtime_ms") is not None:
        run["gap_minus_downtime_ms"] = round(run["pause_ms"] - run["qemu_downtime_ms"], 3)


def print_breakdown(runs, methods_label):
    """Medians of every moment per method and size, next to the heartbeat gap."""
    groups = {}
    for r in runs:
        if r.get("ok") and r.get("timeline_ms"):
            groups.setdefault((r["method"], r["size_mib"]), []).append(r)
    if not groups:
        return
    print("pause breakdown: medians, ms after `migrate` was issued (CLOCK_MONOTONIC; QEMU's moments "
          "from its events' own timestamps)")
    heads = ["method", "MiB", "n", "gap", "swap gap", "STOP->RESUME", "swap gap-that",
             "gap-downtime"] + [h for _, h in POINTS]
    rows = []

    def med(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return f"{statistics.median(vals):.2f}" if vals else "-"

    for (m, size), rs in groups.items():
        row = [methods_label[m], str(size), str(len(rs)), med([r.get("pause_ms") for r in rs]),
               med([r.get("swap_gap_ms") for r in rs]), med([r.get("qemu_pause_ms") for r in rs]),
               med([r.get("outside_qemu_pause_ms") for r in rs]),
               med([r.get("gap_minus_downtime_ms") for r in rs])]
        row += [med([r["timeline_ms"].get(k) for r in rs]) for k, _ in POINTS]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("gap: longest heartbeat gap in the window; swap gap: the gap the swap made (see "
          "benchlib/timeline.py); STOP->RESUME: the old QEMU's STOP to the new one's RESUME;")
    print("swap gap-that: the rest of the swap gap (for ours, the launcher's share);")
    print("gap-downtime: the gap minus the downtime QEMU reports (whole ms). last/first HB: the "
          "swap gap's ends. seen: the shim read the new QEMU's completion; switched: consoles and")
    print("monitor clients on the new QEMU; console/monitor: first byte / reply relayed from it "
          "(none without a relayed console or a client asking).")
