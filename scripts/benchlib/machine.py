"""The machine the benchmark runs on, as recorded with the results."""

import datetime
import os
import platform
import subprocess

from .common import REPO


def machine_info(ctx):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    info["nproc"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_mib"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["kernel"] = platform.release()
    info["loadavg_start"] = os.getloadavg()[0]
    info["other_qemu_processes"] = other_qemus()
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    info["commit"] = r.stdout.strip() or None
    info["qemu"] = {}
    for v in ("7.2.22", "10.0.2"):
        r = subprocess.run([ctx.qemu(v), "--version"], capture_output=True, text=True)
        info["qemu"][v] = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else None
    return info


def other_qemus():
    """QEMU processes on the machine that this script did not start: they share the CPUs."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().startswith("qemu-system"):
                    n += 1
        except OSError:
            pass
    return n
