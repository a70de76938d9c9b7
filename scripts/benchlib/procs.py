"""Processes: every one in its own process group, all killed at exit; temporary directories,
removed at exit; a process's descendants, read from /proc."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading

from .common import log

_live = []  # Popen objects still to be killed
_live_lock = threading.Lock()
_tempdirs = []


def descendants(pid):
    """pid's descendants, by the children files of all its threads (proc(5)); a full scan of
    /proc by parent pid when those files are absent."""
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            tasks = []  # gone
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids += [int(k) for k in f.read().split()]
            except FileNotFoundError:
                continue  # that thread (or the process) ended meanwhile
            except OSError:
                kids = _children_by_scan(p)  # no CONFIG_PROC_CHILDREN
                break
        out += kids
        todo += kids
    return out


def _children_by_scan(ppid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                kids.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def kill_tree(proc):
    """SIGKILL to proc's process group and to every descendant (a child that left the group
    too), then reap proc."""
    if proc.poll() is None:
        pids = descendants(proc.pid)
        for p in [proc.pid] + pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} did not die")
    with _live_lock:
        if proc in _live:
            _live.remove(proc)


def cleanup_all():
    with _live_lock:
        procs = list(_live)
    for p in procs:
        kill_tree(p)
    for d in list(_tempdirs):
        shutil.rmtree(d, ignore_errors=True)
        _tempdirs.remove(d)


def spawn(argv, executable=None, env=None, stdout=None, stdin=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL):
    p = subprocess.Popen(
        argv,
        executable=executable,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    with _live_lock:
        _live.append(p)
    return p


def make_tempdir():
    d = tempfile.mkdtemp(prefix="qlu-bench-")
    _tempdirs.append(d)
    return d


def remove_tempdir(d):
    shutil.rmtree(d, ignore_errors=True)
    if d in _tempdirs:
        _tempdirs.remove(d)
