"""The pause taken apart: the swap's timeline (the shim's report, or QEMU's own events for
plain migration and cpr-transfer) with the guest's longest heartbeat gap laid on it.

Every moment is in ms after `migrate` was issued, on CLOCK_MONOTONIC, the clock of
time.monotonic() here, of the heartbeat stamper and of the shim. QEMU stamps its events with the
wall clock; they are moved onto CLOCK_MONOTONIC through the offset between the two clocks.

"Outside QEMU's pause" is the longest gap minus the time from the old QEMU's STOP to the new
one's RESUME: what the guest lost that QEMU did not spend stopped, for any method alike (the
heartbeat period, the output's way to the host, anything competing for the CPUs). For the shim
it is the launcher's share of the pause; for cpr-transfer the same measure of QEMU's own path
shows what no launcher can take away.
"""

import statistics
import time

# (key in the run's timeline, column header), in the order a swap goes through them.
POINTS = [
    ("hb_last", "last HB"),
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
]


def event_monotonic(event):
    """When QEMU emitted `event`, on time.monotonic()'s clock; None without a timestamp."""
    ts = event.get("timestamp") or {}
    if "seconds" not in ts:
        return None
    wall = ts["seconds"] + ts.get("microseconds", 0) / 1e6
    return wall - (time.time() - time.monotonic())


def from_report(run, pause):
    """The shim's `pause` report: moments in us after migrate, migrate on CLOCK_MONOTONIC."""
    if not pause or pause.get("migrate_monotonic_us") is None:
        return
    origin = pause["migrate_monotonic_us"] / 1e6
    moments = {}
    for key, _ in POINTS:
        us = pause.get(f"{key}_us")
        if us is not None:
            moments[key] = us / 1000.0
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
    """Adds the heartbeat gap's ends to `moments` and the derived figures to `run`."""
    if run.get("pause_from_s") is not None:
        moments["hb_last"] = (run["pause_from_s"] - origin) * 1000
        moments["hb_first"] = (run["pause_to_s"] - origin) * 1000
    run["timeline_ms"] = {k: round(v, 3) for k, v in moments.items()}
    if "resume" in moments and "old_stop" in moments:
        stopped = moments["resume"] - moments["old_stop"]
        run["qemu_pause_ms"] = round(stopped, 3)
        if run.get("pause_ms") is not None:
            run["outside_qemu_pause_ms"] = round(run["pause_ms"] - stopped, 3)
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
    heads = ["method", "MiB", "n", "gap", "STOP->RESUME", "gap-that", "gap-downtime"] + [h for _, h in POINTS]
    rows = []

    def med(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return f"{statistics.median(vals):.2f}" if vals else "-"

    for (m, size), rs in groups.items():
        row = [methods_label[m], str(size), str(len(rs)), med([r.get("pause_ms") for r in rs]),
               med([r.get("qemu_pause_ms") for r in rs]), med([r.get("outside_qemu_pause_ms") for r in rs]),
               med([r.get("gap_minus_downtime_ms") for r in rs])]
        row += [med([r["timeline_ms"].get(k) for r in rs]) for k, _ in POINTS]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("gap: longest heartbeat gap; STOP->RESUME: the old QEMU's STOP to the new one's RESUME; "
          "gap-that: the rest of the gap (for ours, the launcher's share);")
    print("gap-downtime: the gap minus the downtime QEMU reports (whole ms). last/first HB: the "
          "gap's ends. seen: the shim read the new QEMU's completion; switched: consoles and")
    print("monitor clients on the new QEMU; console/monitor: first byte / reply relayed from it "
          "(none without a relayed console or a client asking).")
