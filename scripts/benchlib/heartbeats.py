"""Heartbeat analysis: the longest gap, the gaps over 10 ms, and the switch from the source's
output to the destination's."""

from .common import HB_AFTER, IDLE_BEFORE, WINDOW_AFTER
from .guest import HB_RE


def max_gap(times, start, end):
    """Longest interval without a heartbeat in [start, end], the window's ends counted: (gap s,
    time the gap began)."""
    prev, best, at = start, 0.0, start
    for t in sorted(x for x in times if start <= x <= end):
        if t - prev > best:
            best, at = t - prev, prev
        prev = t
    if end - prev > best:
        best, at = end - prev, prev
    return best, at


def gaps_over(times, start, end, limit):
    out, prev = [], None
    for t in sorted(x for x in times if start <= x <= end):
        if prev is not None and t - prev > limit:
            out.append([round((prev - start) * 1000, 1), round((t - prev) * 1000, 2)])
        prev = t
    return out


def guest_result(run, times, t_trigger, t_done, max_err, err_lines, hb_after, first_after_done):
    end = t_done + WINDOW_AFTER
    pause, at = max_gap(times, t_trigger, end)
    idle, _ = max_gap(times, t_trigger - IDLE_BEFORE, t_trigger)
    run["pause_ms"] = round(pause * 1000, 2)
    run["pause_at_ms"] = round((at - t_trigger) * 1000, 1)
    run["idle_max_gap_ms"] = round(idle * 1000, 2)
    run["gaps_over_10ms"] = gaps_over(times, t_trigger, end, 0.010)
    run["guest_max_err"] = max_err
    run["guest_err_lines"] = err_lines[:16]
    run["hb_after"] = hb_after
    run["hb_continue"] = hb_after >= HB_AFTER
    run["first_hb_after_done_ms"] = first_after_done


def splice(s_hbs, s_partial, d_hbs, d_lines):
    """The switch from source to destination output: the source's last heartbeat (or the piece
    of a line it wrote before it stopped) to the destination's first line. A heartbeat line the
    guest was writing when it was stopped is begun on the source and finished on the
    destination; it is put together here."""
    fields = {}
    extra_times = []
    src_last = s_hbs[-1] if s_hbs else None
    t_src_end = src_last[0] if src_last else None
    if s_partial and s_partial[1]:
        t_src_end = max(t_src_end or 0, s_partial[0])
    d_first_line = d_lines[0] if d_lines else None
    first_counter = None
    if d_first_line:
        m = HB_RE.match(d_first_line[1])
        if m:
            first_counter = int(m[1])
        elif s_partial:
            m = HB_RE.match(s_partial[1] + d_first_line[1])
            if m:
                first_counter = int(m[1])
                extra_times.append(d_first_line[0])
                fields["split_line"] = (s_partial[1] + d_first_line[1]).decode(errors="replace")
    if first_counter is None and d_hbs:
        first_counter = d_hbs[0][1]
    if t_src_end is not None and d_first_line:
        fields["switch_gap_ms"] = round((d_first_line[0] - t_src_end) * 1000, 2)
        fields["switch_from_s"] = t_src_end
        fields["switch_to_s"] = d_first_line[0]
    fields["src_last_counter"] = src_last[1] if src_last else None
    fields["dst_first_counter"] = first_counter
    if src_last and first_counter is not None:
        step = first_counter - src_last[1]
        fields["counter_step"] = step
        fields["counters_continue"] = 1 <= step <= 3
    return {"fields": fields, "extra_times": extra_times}
