"""The heartbeat guest's QEMU and its output: the stamper (`scripts/bench --stamp`) between the
QEMU's stdout and this process, and the Guest that reads the stamped lines."""

import bisect
import os
import re
import subprocess
import sys
import threading
import time

from .common import BENCH, BenchError
from .procs import kill_tree, spawn

HB_RE = re.compile(rb"^HB (\d+) err=(\d+) pass=(\d+)")


def stamp_main():
    """Copies stdin to stdout line by line, each prefixed with the CLOCK_MONOTONIC time (the
    clock of time.monotonic() in every process) at which its newline arrived: "<t> L <line>".
    A last unterminated piece is written at EOF as "<t> P <piece>", t being when it arrived."""
    buf = b""
    t = time.monotonic()
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        t = time.monotonic()
        buf += chunk
        if b"\n" not in buf:
            continue
        *lines, buf = buf.split(b"\n")
        out = b"".join(b"%.6f L %s\n" % (t, line.rstrip(b"\r")) for line in lines)
        try:
            os.write(1, out)
        except BrokenPipeError:
            return
    if buf:
        try:
            os.write(1, b"%.6f P %s\n" % (t, buf))
        except BrokenPipeError:
            pass


class Guest:
    """A QEMU (or the shim) running the heartbeat guest: stdout through the stamper, stderr
    read here line by line with time.monotonic()."""

    def __init__(self, name, argv, executable=None, env=None):
        self.name = name
        self.proc = spawn(argv, executable=executable, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self.stamper = spawn(
            [sys.executable, BENCH, "--stamp"],
            stdin=self.proc.stdout,
            stdout=subprocess.PIPE,
        )
        self.proc.stdout.close()  # the stamper holds the read end now
        self.pid = self.proc.pid
        self.lock = threading.Lock()
        self.lines = []  # (t, bytes) every stdout line
        self.hbs = []  # (t, counter, err, pass)
        self.partial = None  # (t, bytes): unterminated tail at EOF
        self.ready_at = None
        self.err_lines = []
        self.stderr = []  # (t, str)
        self.stdout_eof = False
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for raw in self.stamper.stdout:
            try:
                ts, kind, line = raw.rstrip(b"\n").split(b" ", 2)
                t = float(ts)
            except ValueError:
                continue
            with self.lock:
                if kind == b"P":
                    self.partial = (t, line)
                    continue
                self.lines.append((t, line))
                m = HB_RE.match(line)
                if m:
                    self.hbs.append((t, int(m[1]), int(m[2]), int(m[3])))
                elif line.startswith(b"READY") and self.ready_at is None:
                    self.ready_at = t
                elif line.startswith(b"ERR"):
                    self.err_lines.append(line.decode(errors="replace"))
        with self.lock:
            self.stdout_eof = True

    def _read_stderr(self):
        for raw in self.proc.stderr:
            with self.lock:
                self.stderr.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def alive(self):
        return self.proc.poll() is None

    def wait_for(self, what, timeout, pred):
        """Polls pred() (called with the lock held) until it returns something not None."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                v = pred()
                eof = self.stdout_eof
            if v is not None:
                return v
            if eof or not self.alive():
                raise BenchError(f"{self.name} ended while waiting for {what}: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {what} within {timeout:.0f} s: {self.stderr_tail()}")
            time.sleep(0.005)

    def wait_ready(self, timeout):
        return self.wait_for("READY", timeout, lambda: self.ready_at)

    def wait_hbs_after(self, t0, n, timeout):
        """Waits until n heartbeats arrived after t0; returns how many did."""
        def enough():
            # Heartbeats are in arrival order: bisect rather than count, this is polled.
            k = len(self.hbs) - bisect.bisect_right(self.hbs, (t0, float("inf")))
            return k if k >= n else None
        return self.wait_for(f"{n} heartbeats", timeout, enough)

    def stderr_tail(self, n=8):
        with self.lock:
            lines = [s for _, s in self.stderr[-n:]]
        return " | ".join(lines) if lines else "(no stderr)"

    def snapshot(self):
        with self.lock:
            return list(self.hbs), list(self.lines), self.partial, list(self.err_lines)

    def kill(self):
        kill_tree(self.proc)
        kill_tree(self.stamper)

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
