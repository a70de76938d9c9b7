"""Memory of process trees, read from /proc: sampled during a swap, Pss before and after."""

import os
import threading
import time

from .common import SAMPLE_PERIOD
from .procs import descendants

# Memory of a process tree is taken two ways.
#
# Sampled every SAMPLE_PERIOD during a swap: private anonymous memory and page tables of every
# process (RssAnon and VmPTE of /proc/PID/status, counters the kernel keeps), plus every shared
# memory object the tree maps or holds open (the memfd of guest RAM, say), once, at its size in
# memory. File pages (the QEMU binary and its libraries) are page cache shared with the running
# QEMU and are left out.
#
# Before the trigger and after completion only: the sum of Pss from /proc/PID/smaps_rollup.
# smaps_rollup walks every page-table entry of the process: about 1 ms for 2 GiB of anonymous
# RAM in huge pages, but about 100 ms for 2 GiB of memfd RAM in 4 KiB pages (measured here), so
# it can neither be read every 20 ms nor be read during a swap without loading the CPU for the
# memfd methods alone. And a Pss sum read process by process over-counts while a new QEMU maps
# the guest's memfd: a page read as the old QEMU's alone and then as half the new one's counts
# 1.5 times.

# Paths under which /proc/PID/maps and /proc/PID/fd show shared memory (shmem): memfds (guest RAM
# of ours and of cpr-transfer, aux RAM), POSIX and SysV shm, shared anonymous mappings.
SHMEM_PREFIXES = ("/memfd:", "/dev/shm/", "/SYSV", "/dev/zero")


def tree_pids(roots):
    pids = set()
    for r in roots:
        if os.path.exists(f"/proc/{r}"):
            pids.add(r)
            pids.update(descendants(r))
    return pids


def private_kib(pid):
    """RssAnon + VmPTE of pid in KiB (proc(5)); 0 once it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "VmPTE:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return total


def shmem_objects(pid, found):
    """Adds to found {(st_dev, st_ino): bytes allocated} every shmem object pid maps or holds
    open; stat(2) of /proc/PID/map_files and /proc/PID/fd reaches the object itself, whose
    st_blocks count its allocated pages, whoever maps them."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.readlines()
    except OSError:
        return
    paths = []
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith(SHMEM_PREFIXES):
            paths.append(f"/proc/{pid}/map_files/{parts[0]}")
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith(SHMEM_PREFIXES):
                    paths.append(path)
            except OSError:
                pass
    except OSError:
        pass
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found[(st.st_dev, st.st_ino)] = st.st_blocks * 512


def tree_memory_kib(roots, count=None):
    """The sampled measure (see above), in KiB; count, a list, gets the number of processes."""
    shared = {}
    private = 0
    pids = tree_pids(roots)
    for p in pids:
        private += private_kib(p)
        shmem_objects(p, shared)
    if count is not None:
        count.append(len(pids))
    return private + sum(shared.values()) // 1024


def tree_pss_kib(roots):
    """Sum of Pss over the trees, from smaps_rollup (slow; see above)."""
    total = 0
    for p in tree_pids(roots):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


class MemSampler:
    """Samples tree_memory_kib(roots) every SAMPLE_PERIOD until stopped; roots may grow."""

    def __init__(self, roots):
        self.roots = list(roots)
        self.samples = []  # (t, kib)
        self.procs = []  # processes in the trees, per sample
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add_root(self, pid):
        self.roots.append(pid)

    def _run(self):
        nxt = time.monotonic()
        while not self.stop_flag.is_set():
            self.samples.append((time.monotonic(), tree_memory_kib(list(self.roots), self.procs)))
            nxt += SAMPLE_PERIOD
            delay = nxt - time.monotonic()
            if delay > 0:
                self.stop_flag.wait(delay)
            else:
                nxt = time.monotonic()

    def stop(self):
        """Stops sampling; returns (peak, number of samples, most processes seen at once)."""
        self.stop_flag.set()
        self.thread.join(timeout=5)
        return (max((k for _, k in self.samples), default=0), len(self.samples),
                max(self.procs, default=0))


def memory_result(run, base, peak):
    run["baseline_mib"] = round(base / 1024, 1)
    run["peak_extra_mib"] = round((peak[0] - base) / 1024, 1)
    run["mem_samples"] = peak[1]
    run["mem_max_procs"] = peak[2]  # 3 for ours (shim, old and new QEMU), 2 for plain/cpr


def pss_result(run, pss_before, roots_after):
    """Pss after the pause window (reading it sooner would load the CPU inside the window)."""
    pss_after = tree_pss_kib(roots_after)
    run["pss_before_mib"] = round(pss_before / 1024, 1)
    run["pss_after_mib"] = round(pss_after / 1024, 1)
    run["pss_delta_after_mib"] = round((pss_after - pss_before) / 1024, 1)

