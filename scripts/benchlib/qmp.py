"""QMP: one reader thread a connection; replies matched by id, events kept with their time."""

import json
import socket
import threading
import time

from .common import BenchError


class QmpClosed(Exception):
    pass


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path, timeout=30.0, alive=None):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if alive is not None and not alive():
                    raise BenchError(f"QEMU exited before its monitor {path} listened")
                if time.monotonic() > deadline:
                    raise BenchError(f"no QMP monitor at {path} within {timeout:.0f} s")
                time.sleep(0.002)
        self.sock = s
        self.cond = threading.Condition()
        self.replies = {}
        self.events = []  # (t, event dict)
        self.greeting = None
        self.closed = False
        self.next_id = 0
        self.send_lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()
        with self.cond:
            self.cond.wait_for(lambda: self.greeting is not None or self.closed, timeout=timeout)
        if self.greeting is None:
            self.close()
            raise BenchError(f"no QMP greeting on {path}")
        try:
            self.cmd("qmp_capabilities", timeout=timeout)
        except Exception:
            self.close()
            raise

    def _reader(self):
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            t = time.monotonic()
            if not chunk:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            with self.cond:
                for line in lines:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "QMP" in msg:
                        self.greeting = msg
                    elif "event" in msg:
                        self.events.append((t, msg))
                    elif "id" in msg:
                        self.replies[msg["id"]] = (t, msg)
                self.cond.notify_all()

    def cmd(self, name, args=None, timeout=10.0, with_time=False):
        with self.send_lock:
            self.next_id += 1
            ident = f"bench-{self.next_id}"
        msg = {"execute": name, "id": ident}
        if args is not None:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpClosed(str(e)) from None
        with self.cond:
            self.cond.wait_for(lambda: ident in self.replies or self.closed, timeout=timeout)
            if ident not in self.replies:
                if self.closed:
                    raise QmpClosed(f"connection closed during {name}")
                raise BenchError(f"QMP {name}: no reply within {timeout:.0f} s")
            t, reply = self.replies.pop(ident)
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return (t, reply.get("return")) if with_time else reply.get("return")

    def event_time(self, name, after=0.0):
        with self.cond:
            for t, e in self.events:
                if e.get("event") == name and t >= after:
                    return t
        return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
