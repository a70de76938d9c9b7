"""Cost at scale: what a VM pays for running under the shim when nothing is being upgraded.

- Start: from spawning the process to the QMP greeting on its monitor socket, through the shim
  and with QEMU started directly, the same argv, alternating.
- Idle: one VM under the shim with its guest busy (heartbeats straight on stdout, not through
  the shim): the shim's context switches over IDLE_WINDOW s (voluntary and involuntary, from
  /proc/PID/status: every wake-up of a process is one), its resident memory, and its CPU time
  (/proc/PID/schedstat, nanoseconds on the CPU).
"""

import os
import socket
import statistics
import subprocess
import time

from .common import QEMU_NAME, BenchError, log
from .guest import Guest
from .procs import kill_tree, make_tempdir, remove_tempdir, spawn

IDLE_WINDOW = 10.0


def _greeting_s(sock, proc, timeout):
    """Seconds until `sock` accepts a connection and sends QMP's greeting, polling every ms."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock)
            s.settimeout(timeout)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise BenchError(f"{sock}: closed before the greeting")
                buf += chunk
            return time.monotonic()
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None:
                raise BenchError(f"exited with {proc.returncode} before {sock} listened") from None
            if time.monotonic() > deadline:
                raise BenchError(f"no greeting on {sock} within {timeout} s") from None
            time.sleep(0.001)
        finally:
            s.close()


def start_times(ctx, mib, n):
    """Median and all start times (ms) to the QMP greeting: shim and QEMU direct."""
    out = {"shim": [], "direct": []}
    for i in range(n):
        for how in ("direct", "shim"):
            tmp = make_tempdir()
            proc = None
            try:
                sock = os.path.join(tmp, "qmp.sock")
                env = dict(os.environ, QEMU_LIVEUPGRADE_BINARY=ctx.qemu("10.0.2"),
                           QEMU_LIVEUPGRADE_CONFIG="/nonexistent",
                           QEMU_LIVEUPGRADE_RUNDIR=tmp)
                # Paused (-S), so that starting is all that is timed.
                argv = [QEMU_NAME] + ctx.guest_args(mib, sock) + ["-S"]
                exe = ctx.shim if how == "shim" else ctx.qemu("10.0.2")
                t0 = time.monotonic()
                proc = spawn(argv, executable=exe, env=env, stdout=subprocess.DEVNULL)
                t1 = _greeting_s(sock, proc, 60)
                out[how].append(round((t1 - t0) * 1000, 2))
            finally:
                if proc:
                    kill_tree(proc)
                remove_tempdir(tmp)
    return out


def _ctxt(pid):
    vol = invol = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
    return vol + invol


def _status_kib(pid, keys):
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                got[k] = int(line.split()[1])
    return got


def _cpu_ns(pid):
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def idle_shim(ctx, mib):
    """An idle shim's wake-ups per second, CPU time and memory, its guest busy."""
    tmp = make_tempdir()
    guest = None
    try:
        sock = os.path.join(tmp, "qmp.sock")
        env = dict(os.environ, QEMU_LIVEUPGRADE_BINARY=ctx.qemu("10.0.2"),
                   QEMU_LIVEUPGRADE_CONFIG="/nonexistent", QEMU_LIVEUPGRADE_RUNDIR=tmp)
        guest = Guest("shim", [QEMU_NAME] + ctx.guest_args(mib, sock), executable=ctx.shim, env=env)
        t_ready = guest.wait_ready(60 + 30 * mib / 1024)
        guest.wait_hbs_after(t_ready, 200, 30)
        pid = guest.pid
        c0, cpu0, t0 = _ctxt(pid), _cpu_ns(pid), time.monotonic()
        time.sleep(IDLE_WINDOW)
        c1, cpu1, t1 = _ctxt(pid), _cpu_ns(pid), time.monotonic()
        beats = sum(1 for h in guest.snapshot()[0] if t0 <= h[0] <= t1)
        mem = _status_kib(pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem"))
        return {
            "window_s": round(t1 - t0, 2),
            "wakeups_per_s": round((c1 - c0) / (t1 - t0), 2),
            "cpu_us_per_s": round((cpu1 - cpu0) / 1000 / (t1 - t0), 1),
            "heartbeats_in_window": beats,
            "rss_kib": mem.get("VmRSS"),
            "rss_anon_kib": mem.get("RssAnon"),
            "rss_file_kib": mem.get("RssFile"),
            "rss_shmem_kib": mem.get("RssShmem"),
        }
    finally:
        if guest:
            guest.kill()
        remove_tempdir(tmp)


def measure(ctx, mib, starts):
    """Both, as one dict for results.json; a failure is recorded, not raised."""
    res = {"guest_mib": mib}
    try:
        res["start_ms"] = start_times(ctx, mib, starts)
    except BenchError as e:
        res["start_error"] = str(e)
    try:
        res["idle"] = idle_shim(ctx, mib)
    except BenchError as e:
        res["idle_error"] = str(e)
    return res


def print_scale(res):
    if not res:
        return
    print(f"cost at scale ({res['guest_mib']} MiB guest, QEMU 10.0.2):")
    st = res.get("start_ms")
    if st and st["shim"] and st["direct"]:
        ms, md = statistics.median(st["shim"]), statistics.median(st["direct"])
        print(f"  start to QMP greeting (-S), median of {len(st['shim'])}: through the shim {ms:.1f} ms "
              f"({min(st['shim']):.1f}-{max(st['shim']):.1f}), QEMU direct {md:.1f} ms "
              f"({min(st['direct']):.1f}-{max(st['direct']):.1f}): the shim adds {ms - md:.1f} ms")
    elif "start_error" in res:
        print(f"  start: FAILED: {res['start_error']}")
    idle = res.get("idle")
    if idle:
        print(f"  idle shim over {idle['window_s']} s with its guest busy ({idle['heartbeats_in_window']} "
              f"heartbeats): {idle['wakeups_per_s']} wake-ups/s, {idle['cpu_us_per_s']} us CPU/s, "
              f"RSS {idle['rss_kib'] / 1024:.1f} MiB (anon {idle['rss_anon_kib'] / 1024:.1f}, "
              f"file {idle['rss_file_kib'] / 1024:.1f}, shmem {idle['rss_shmem_kib'] / 1024:.1f})")
    elif "idle_error" in res:
        print(f"  idle: FAILED: {res['idle_error']}")
    log("scale: " + str(res))
