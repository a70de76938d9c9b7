"""What every part of the benchmark shares: where things are, the methods, the timing
constants, the error types and the log line."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
# The entry point, run again as the heartbeat stamper (--stamp) and the chart drawer (--chart).
BENCH = os.path.join(REPO, "scripts", "bench")
QEMU_BUILDS = os.environ.get("QEMU_BUILDS_DIR", "/var/cache/qemu-liveupgrade/qemu")
QEMU_NAME = "qemu-system-x86_64"

# Methods in the order they run and are shown.
METHODS = {
    "ours": "ours 10.0.2->10.0.2",
    "ours-7.2": "ours 7.2.22->10.0.2",
    "plain": "plain migration 10.0.2->10.0.2",
    "cpr": "cpr-transfer 10.0.2->10.0.2",
}

SAMPLE_PERIOD = 0.020  # memory sampling interval during a swap
IDLE_BEFORE = 1.0  # heartbeats to see before the trigger
WINDOW_AFTER = 2.0  # pause window: trigger .. completion + this
HB_AFTER = 500  # heartbeats the guest must give after completion
PLAIN_MAX_BANDWIDTH = 1 << 40  # bytes/s: "no cap" for a local socket


class BenchError(Exception):
    """A run that could not be completed; the message says what was waited for."""


class NotConverged(BenchError):
    """A migration still running at its deadline; it was cancelled."""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)
