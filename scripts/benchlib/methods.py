"""The methods: a run of the shim's upgrade (ours, ours-7.2) and a run of QEMU's own plain
migration or cpr-transfer (plain, cpr), each from a fresh guest to a result dict."""

import json
import os
import signal
import subprocess
import threading
import time

from .common import (HB_AFTER, IDLE_BEFORE, PLAIN_MAX_BANDWIDTH, QEMU_BUILDS, QEMU_NAME, REPO,
                     WINDOW_AFTER, BenchError, NotConverged)
from .guest import Guest
from .heartbeats import guest_result, splice
from .memory import MemSampler, memory_result, pss_result, tree_memory_kib, tree_pss_kib
from .procs import kill_tree, make_tempdir, remove_tempdir
from .qmp import Qmp, QmpClosed, QmpError
from . import timeline


class Ctx:
    def __init__(self, args):
        self.args = args
        self.shim = os.path.join(args.bin_dir, "qemu-liveupgrade-shim")
        self.cli = os.path.join(args.bin_dir, "qemu-liveupgrade")
        self.elf = os.path.join(REPO, "target/guest/heartbeat.elf")

    def plain_timeout(self, mib):
        """How long plain migration may take before it counts as not converging."""
        if self.args.plain_timeout:
            return self.args.plain_timeout
        return 30 + 15 * mib / 1024

    @staticmethod
    def qemu(version):
        return os.path.join(QEMU_BUILDS, version, "bin", QEMU_NAME)

    def guest_args(self, mib, qmp_sock):
        return [
            "-accel", "tcg", "-machine", "pc", "-m", str(mib), "-nodefaults", "-nographic",
            "-serial", "stdio", "-kernel", self.elf, "-append", f"mem={mib}M",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off",
        ]


def ready_timeout(mib):
    return 60 + 30 * mib / 1024


def boot(guest, mib):
    """Until READY and the first heartbeat."""
    t_ready = guest.wait_ready(ready_timeout(mib))
    guest.wait_hbs_after(t_ready, 1, 30)


def idle(guest):
    """About IDLE_BEFORE s of heartbeats with nothing else going on: the window the idle
    jitter is measured over, so every monitor command and slow /proc read comes before."""
    t0 = time.monotonic()
    time.sleep(IDLE_BEFORE)
    guest.wait_hbs_after(t0, 100, 30)


def swap_timeout(mib):
    return 60 + 45 * mib / 1024


def run_ours(ctx, mib, from_ver, to_ver):
    run = {}
    tmp = make_tempdir()
    guest = qmp = sampler = None
    try:
        rundir = os.path.join(tmp, "run")
        os.mkdir(rundir)
        link = os.path.join(tmp, QEMU_NAME)
        os.symlink(ctx.qemu(from_ver), link)
        sock = os.path.join(tmp, "qmp.sock")
        env = dict(os.environ)
        env.update(
            QEMU_LIVEUPGRADE_BINARY=link,
            QEMU_LIVEUPGRADE_CONFIG="/nonexistent",
            QEMU_LIVEUPGRADE_RUNDIR=rundir,
        )
        guest = Guest("shim", [QEMU_NAME] + ctx.guest_args(mib, sock), executable=ctx.shim, env=env)
        boot(guest, mib)
        qmp = Qmp(sock, alive=guest.alive)
        v0 = qmp.cmd("query-version")["qemu"]
        run["qmp_version_before"] = f"{v0['major']}.{v0['minor']}.{v0['micro']}"

        # The next generation's binary: repoint the symlink (atomically, by rename).
        new_link = link + ".new"
        os.symlink(ctx.qemu(to_ver), new_link)
        os.rename(new_link, link)

        def status():
            r = subprocess.run(
                [ctx.cli, "status", str(guest.pid), "--json"],
                env=env, capture_output=True, timeout=30,
            )
            return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

        st = status() or {}
        gen0 = st.get("generation", 1)

        pss_before = tree_pss_kib([guest.pid])
        idle(guest)
        baseline = tree_memory_kib([guest.pid])
        sampler = MemSampler([guest.pid])
        probe = {}
        t_trigger = time.monotonic()
        os.kill(guest.pid, signal.SIGUSR2)

        def probe_qmp():
            # The same connection, until the new QEMU answers it.
            deadline = time.monotonic() + swap_timeout(mib)
            same = from_ver == to_ver
            try:
                while time.monotonic() < deadline:
                    t, v = qmp.cmd("query-version", timeout=swap_timeout(mib), with_time=True)
                    ver = f"{v['qemu']['major']}.{v['qemu']['minor']}.{v['qemu']['micro']}"
                    if not same and ver != run["qmp_version_before"]:
                        probe.update(t=t, version=ver, how="query-version changed")
                        return
                    if same:
                        s = status()
                        if s and s.get("generation", 0) > gen0:
                            t, v = qmp.cmd("query-version", timeout=30, with_time=True)
                            probe.update(t=t, version=ver, how="generation advanced, then query-version")
                            return
                    time.sleep(0.005)
                probe["error"] = "timed out"
            except QmpClosed:
                probe["error"] = "n/a (connection lost)"
            except (QmpError, BenchError, subprocess.TimeoutExpired, ValueError) as e:
                probe["error"] = f"n/a ({e})"

        prober = threading.Thread(target=probe_qmp, daemon=True)
        prober.start()

        def report_line():
            for t, line in guest.stderr:
                if line.startswith("{") and '"qemu-liveupgrade"' in line:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if r.get("qemu-liveupgrade") == "upgrade":
                        return t, r
            return None

        t_done, report = guest.wait_for("the upgrade report", swap_timeout(mib), report_line)
        run["report"] = report
        if report.get("result") != "ok":
            raise BenchError(f"upgrade failed: {report.get('reason')}")
        time.sleep(0.5)
        peaks = sampler.stop()
        sampler = None
        prober.join(timeout=swap_timeout(mib))

        run["from"] = report["from"]["version"]
        run["to"] = report["to"]["version"]
        run["ram_mode"] = report.get("ram")
        run["qemu_downtime_ms"] = report.get("downtime_ms")
        run["total_ms"] = report.get("total_ms")
        run["total_measured_ms"] = round((t_done - t_trigger) * 1000, 2)
        run["bytes_sent"] = report.get("ram_bytes")
        memory_result(run, baseline, peaks)
        if "t" in probe:
            run["qmp_same_conn_ms"] = round((probe["t"] - t_trigger) * 1000, 2)
            run["qmp_same_conn"] = probe["how"]
        else:
            run["qmp_same_conn_ms"] = None
            run["qmp_same_conn"] = probe.get("error", "n/a (no answer)")

        guest.wait_for("the window after completion", WINDOW_AFTER + 30,
                       lambda: True if time.monotonic() > t_done + WINDOW_AFTER else None)
        try:
            guest.wait_hbs_after(t_done, HB_AFTER, 30)
        except BenchError:
            pass
        pss_result(run, pss_before, [guest.pid])
        hbs, _, _, err_lines = guest.snapshot()
        after = [h for h in hbs if h[0] > t_done]
        # One stream across generations: the guest's counter must only ever go up, by 1 (a few
        # when the guest skipped lines it could not send in time).
        window = [h[1] for h in hbs if t_trigger - IDLE_BEFORE <= h[0] <= t_done + WINDOW_AFTER]
        steps = [b - a for a, b in zip(window, window[1:])]
        run["counter_min_step"] = min(steps, default=None)
        run["counter_max_step"] = max(steps, default=None)
        run["counters_continue"] = bool(steps) and min(steps) >= 1 and max(steps) <= 3
        guest_result(
            run, [h[0] for h in hbs], t_trigger, t_done,
            max((h[2] for h in hbs), default=0), err_lines, len(after),
            round((after[0][0] - t_done) * 1000, 2) if after else None,
        )
        timeline.from_report(run, report.get("pause"), [h[0] for h in hbs])
        end_status = status() or {}
        run["status_after"] = {k: end_status.get(k) for k in ("version", "generation", "qemu_pid")}
        run["ok"] = True
    except Exception as e:  # noqa: BLE001 -- one failed run must not end the benchmark
        run["ok"] = False
        run["error"] = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
    finally:
        if sampler:
            sampler.stop()
        if qmp:
            qmp.close()
        if guest:
            if not run.get("ok"):
                run["stderr_tail"] = guest.stderr_tail(20)
            guest.kill()
        remove_tempdir(tmp)
    return run


def query_done(qmp, run, timeout):
    """Polls the source's query-migrate until the migration is over; keeps the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        st = info.get("status")
        if st == "completed":
            return info
        if st in ("failed", "cancelled"):
            raise BenchError(f"migration {st}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            try:
                qmp.cmd("migrate_cancel")
            except (QmpError, QmpClosed):
                pass
            run["last_query_migrate"] = info
            ram = info.get("ram") or {}
            raise NotConverged(
                f"migration did not complete within {timeout:.0f} s (status {st}, "
                f"{ram.get('dirty-sync-count')} dirty syncs, {(ram.get('transferred') or 0) / 1e9:.1f} GB "
                f"sent, expected downtime {info.get('expected-downtime')} ms); cancelled")
        time.sleep(0.02)


def wait_running(dst, dst_qmp_path, t_after, timeout, dst_guest):
    """Connects to the destination's monitor (retrying: a cpr-transfer destination opens it
    only after reading the cpr channel) and polls until it runs. Returns (qmp, time running):
    the RESUME event's arrival if seen, else the first query-status that said running."""
    deadline = time.monotonic() + timeout
    qmp = dst
    if qmp is None:
        qmp = Qmp(dst_qmp_path, timeout=timeout, alive=dst_guest.alive)
    while True:
        t_ev = qmp.event_time("RESUME", t_after)
        t, st = qmp.cmd("query-status", with_time=True)
        if st.get("status") == "running":
            t_ev = qmp.event_time("RESUME", t_after) or t_ev
            return qmp, (t_ev if t_ev is not None else t)
        if st.get("status") not in ("inmigrate", "prelaunch", "paused"):
            raise BenchError(f"destination is {st.get('status')}")
        if time.monotonic() > deadline:
            raise BenchError(f"destination not running within {timeout:.0f} s ({st.get('status')})")
        time.sleep(0.002)


def run_migration(ctx, mib, mode):
    """plain or cpr: source and destination QEMU 10.0.2, both started here."""
    run = {"from": "10.0.2", "to": "10.0.2"}
    tmp = make_tempdir()
    src = dst = src_qmp = dst_qmp = sampler = None
    qemu = ctx.qemu("10.0.2")
    try:
        src_sock = os.path.join(tmp, "src.qmp")
        dst_sock = os.path.join(tmp, "dst.qmp")
        mig = os.path.join(tmp, "mig.sock")
        cpr = os.path.join(tmp, "cpr.sock")
        extra = []
        if mode == "cpr":
            # Guest RAM in a memfd, shared; implicit RAM blocks (ROMs) too, via aux-ram-share.
            extra = [
                "-object", f"memory-backend-memfd,id=ram0,size={mib}M,share=on",
                "-machine", "pc,memory-backend=ram0,aux-ram-share=on",
            ]
        src = Guest("source", [QEMU_NAME] + ctx.guest_args(mib, src_sock) + extra, executable=qemu)
        boot(src, mib)
        src_qmp = Qmp(src_sock, alive=src.alive)
        # MIGRATION events, for the timeline: the shim turns them on for its swaps too.
        src_qmp.cmd("migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]})
        params = src_qmp.cmd("query-migrate-parameters")
        run["defaults"] = {k: params.get(k) for k in ("max-bandwidth", "downtime-limit", "mode")}
        pss_before = tree_pss_kib([src.pid])
        idle(src)

        baseline = tree_memory_kib([src.pid])
        sampler = MemSampler([src.pid])
        t_trigger = time.monotonic()
        dst_args = [QEMU_NAME] + ctx.guest_args(mib, dst_sock) + extra + ["-incoming", f"unix:{mig}"]
        if mode == "cpr":
            dst_args += ["-incoming", f"cpr,addr.transport=socket,addr.type=unix,addr.path={cpr}"]
        dst = Guest("destination", dst_args, executable=qemu)
        sampler.add_root(dst.pid)

        if mode == "plain":
            dst_qmp = Qmp(dst_sock, alive=dst.alive)
            dst_qmp.cmd("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
            src_qmp.cmd("migrate-set-parameters", {"max-bandwidth": PLAIN_MAX_BANDWIDTH})
            wait_path(mig, 30, dst)
            t_migrate = time.monotonic()
            src_qmp.cmd("migrate", {"uri": f"unix:{mig}"})
        else:
            # The destination blocks on the cpr channel before it opens its monitor: the
            # source must issue migrate first (CPR.rst).
            wait_path(cpr, 30, dst)
            src_qmp.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
            t_migrate = time.monotonic()
            src_qmp.cmd("migrate", {"channels": [
                {"channel-type": "main",
                 "addr": {"transport": "socket", "type": "unix", "path": mig}},
                {"channel-type": "cpr",
                 "addr": {"transport": "socket", "type": "unix", "path": cpr}},
            ]})
        limit = ctx.plain_timeout(mib) if mode == "plain" else swap_timeout(mib)
        try:
            info = query_done(src_qmp, run, limit)
        except NotConverged:
            # The guest must go on on the source, memory intact.
            t_cancel = time.monotonic()
            run["bytes_sent"] = ((run.get("last_query_migrate") or {}).get("ram") or {}).get("transferred")
            try:
                src.wait_hbs_after(t_cancel, HB_AFTER, 30)
            except BenchError:
                pass
            s_hbs = src.snapshot()[0]
            run["guest_max_err"] = max((h[2] for h in s_hbs), default=0)
            run["hb_after_cancel"] = sum(1 for h in s_hbs if h[0] > t_cancel)
            raise
        dst_qmp, t_done = wait_running(dst_qmp, dst_sock, t_trigger, 60, dst)
        info = src_qmp.cmd("query-migrate")  # final numbers
        # The old QEMU goes, as in an upgrade.
        try:
            src_qmp.cmd("quit", timeout=10)
        except (QmpClosed, QmpError):
            pass
        if not src.wait_exit(10):
            kill_tree(src.proc)
        time.sleep(max(0.0, t_done + 0.5 - time.monotonic()))
        peaks = sampler.stop()
        sampler = None

        run["query_migrate"] = info
        run["qemu_downtime_ms"] = info.get("downtime")
        run["total_ms"] = info.get("total-time")  # QEMU's: migrate command to completion
        run["total_measured_ms"] = round((t_done - t_trigger) * 1000, 2)
        run["migrate_to_running_ms"] = round((t_done - t_migrate) * 1000, 2)
        run["bytes_sent"] = (info.get("ram") or {}).get("transferred")
        run["dirty_sync_count"] = (info.get("ram") or {}).get("dirty-sync-count")
        memory_result(run, baseline, peaks)
        run["qmp_same_conn_ms"] = None
        run["qmp_same_conn"] = "n/a (new QEMU, new monitor)"

        time.sleep(max(0.0, t_done + WINDOW_AFTER - time.monotonic()))
        try:
            dst.wait_hbs_after(t_done, HB_AFTER, 30)
        except BenchError:
            pass
        pss_result(run, pss_before, [dst.pid])
        # The source's stdout is at EOF now (it quit), so its unterminated tail is known.
        src.proc.wait(timeout=10)
        src.wait_for("source stdout EOF", 10, lambda: True if src.stdout_eof else None)
        s_hbs, _, s_partial, s_err = src.snapshot()
        d_hbs, d_lines, _, d_err = dst.snapshot()
        switch = splice(s_hbs, s_partial, d_hbs, d_lines)
        run.update(switch.pop("fields"))
        times = [h[0] for h in s_hbs] + switch["extra_times"] + [h[0] for h in d_hbs]
        after = [h for h in d_hbs if h[0] > t_done]
        guest_result(
            run, times, t_trigger, t_done,
            max((h[2] for h in s_hbs + d_hbs), default=0), s_err + d_err, len(after),
            round((after[0][0] - t_done) * 1000, 2) if after else None,
        )
        timeline.from_events(run, t_migrate, src_qmp, dst_qmp)
        run["ok"] = True
    except Exception as e:  # noqa: BLE001 -- one failed run must not end the benchmark
        run["ok"] = False
        run["converged"] = not isinstance(e, NotConverged)
        run["error"] = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
    finally:
        if sampler:
            sampler.stop()
        for q in (src_qmp, dst_qmp):
            if q:
                q.close()
        for g, name in ((src, "source"), (dst, "destination")):
            if g:
                if not run.get("ok"):
                    run[f"{name}_stderr_tail"] = g.stderr_tail(20)
                g.kill()
        remove_tempdir(tmp)
    return run


def listening(path):
    """Whether a unix socket is bound at `path` and listening: the file appears at bind(2),
    before listen(2), and a connect in between is refused. /proc/net/unix shows
    __SO_ACCEPTCON (0x10000) in the flags of a listening socket."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def wait_path(path, timeout, guest):
    """Waits until QEMU listens on the unix socket `path`."""
    deadline = time.monotonic() + timeout
    while not listening(path):
        if not guest.alive():
            raise BenchError(f"{guest.name} exited before {path} appeared: {guest.stderr_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear within {timeout} s")
        time.sleep(0.001)
