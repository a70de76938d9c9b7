//! A scripted QEMU monitor for the proxy's tests: a thread serving one backend listening
//! socket one connection at a time, as a QEMU socket chardev does.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::proxy::sockets::recv_fds;
use crate::proxy::Mode;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// The connection being served, for output on demand.
    writer: Mutex<Option<UnixStream>>,
    /// What it was sent: QMP commands as received text, HMP and raw lines.
    got: Mutex<Vec<String>>,
    /// Fds `getfd` and `add-fd` took: the command, and the fd's inode.
    fds: Mutex<Vec<(String, u64)>>,
    accepted: AtomicUsize,
    /// Reading stops while set, as a busy QEMU's would.
    paused: AtomicBool,
}

/// One generation's fake monitor.
pub(super) struct Fake {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How the fake behaves.
#[derive(Clone, Copy)]
pub(super) struct Script {
    pub gen: u32,
    pub mode: Mode,
    /// Answer `qmp_capabilities` with an error.
    pub refuse_caps: bool,
    /// Answer `qmp_capabilities` this late.
    pub caps_delay: Duration,
}

impl Fake {
    pub(super) fn spawn(fd: OwnedFd, script: Script) -> Fake {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let listener = UnixListener::from(fd);
            listener.set_nonblocking(true).unwrap();
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        s.accepted.fetch_add(1, Ordering::SeqCst);
                        serve(&s, conn, script);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("fake accept: {e}"),
                }
            }
        });
        Fake {
            shared,
            thread: Some(thread),
        }
    }

    /// Writes raw output on the current connection.
    pub(super) fn emit(&self, bytes: &[u8]) {
        let mut w = self.shared.writer.lock().unwrap();
        w.as_mut()
            .expect("fake has a connection")
            .write_all(bytes)
            .unwrap();
    }

    /// Writes `bytes` on the current connection from a thread of its own, for output larger
    /// than the sockets hold: it returns once the proxy took all of it.
    pub(super) fn emit_in_background(&self, bytes: Vec<u8>) -> JoinHandle<()> {
        let w = self.shared.writer.lock().unwrap();
        let mut conn = w
            .as_ref()
            .expect("fake has a connection")
            .try_clone()
            .unwrap();
        std::thread::spawn(move || conn.write_all(&bytes).unwrap())
    }

    /// Stops reading its connection, or reads again.
    pub(super) fn pause(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    /// Emits a QMP event.
    pub(super) fn event(&self, name: &str) {
        let ev = json!({"timestamp": {"seconds": 1, "microseconds": 2}, "event": name});
        self.emit(format!("{ev}\r\n").as_bytes());
    }

    /// The inode of each fd a `getfd` or `add-fd` took, with the command's name.
    pub(super) fn fds(&self) -> Vec<(String, u64)> {
        self.shared.fds.lock().unwrap().clone()
    }

    /// What it was sent so far.
    pub(super) fn got(&self) -> Vec<String> {
        self.shared.got.lock().unwrap().clone()
    }

    /// How many connections it accepted.
    pub(super) fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Whether a connection is being served.
    pub(super) fn connected(&self) -> bool {
        self.shared.writer.lock().unwrap().is_some()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(s: &Shared, conn: UnixStream, script: Script) {
    conn.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    *s.writer.lock().unwrap() = Some(conn.try_clone().unwrap());
    let say = |text: String| {
        let mut w = s.writer.lock().unwrap();
        let _ = w.as_mut().unwrap().write_all(text.as_bytes());
    };
    let gen = script.gen;
    match script.mode {
        Mode::Qmp => say(format!(
            "{}\r\n",
            json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}},
                           "capabilities": ["oob"]}})
        )),
        Mode::Hmp => say(format!(
            "QEMU 7.2.{gen} monitor - type 'help' for more information\r\n(qemu) "
        )),
        Mode::Raw => {}
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // As QEMU: the fds of the last message that had any, until a command takes them.
    let mut held: Option<OwnedFd> = None;
    // A reply held back until the next command's.
    let mut deferred: Option<Value> = None;
    // Where in `buf` the search for a line end goes on.
    let mut scanned = 0;
    while !s.stop.load(Ordering::SeqCst) {
        if s.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match recv_fds(conn.as_fd(), &mut chunk) {
            Ok((0, _)) => break,
            Ok((n, fds)) => {
                if let Some(fd) = fds.into_iter().next() {
                    held = Some(fd);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        }
        let mut take_fd = |name: &str| match held.take() {
            Some(fd) => {
                let ino = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
                s.fds.lock().unwrap().push((name.to_owned(), ino));
                true
            }
            None => false,
        };
        match script.mode {
            Mode::Qmp => {
                let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                let mut used = 0;
                while let Some(Ok(cmd)) = values.next() {
                    let text = String::from_utf8_lossy(&buf[used..values.byte_offset()]);
                    s.got.lock().unwrap().push(text.trim().to_owned());
                    used = values.byte_offset();
                    let name = cmd["execute"].as_str().unwrap_or("");
                    let fd = matches!(name, "getfd" | "add-fd") && take_fd(name);
                    let reply = answer(&cmd, script, fd);
                    if cmd["arguments"]["defer"] == true {
                        deferred = Some(reply);
                        continue;
                    }
                    say(format!("{reply}\r\n"));
                    if let Some(late) = deferred.take() {
                        say(format!("{late}\r\n"));
                    }
                }
                buf.drain(..used);
            }
            Mode::Hmp | Mode::Raw => {
                while let Some(end) = buf[scanned..].iter().position(|&b| b == b'\n') {
                    let end = scanned + end;
                    scanned = 0;
                    let line = String::from_utf8_lossy(&buf[..end]).trim_end().to_owned();
                    buf.drain(..=end);
                    s.got.lock().unwrap().push(line.clone());
                    if script.mode == Mode::Raw {
                        say(format!("g{gen}:{line}\n"));
                    } else {
                        let out = if line == "info version" {
                            format!("7.2.{gen}\r\n")
                        } else if line.starts_with("getfd") && !take_fd("getfd") {
                            "Error: No file descriptor supplied via SCM_RIGHTS\r\n".into()
                        } else if line.contains("fail") {
                            "Error: failed\r\n".into()
                        } else {
                            String::new()
                        };
                        say(format!("{line}\r\n{out}(qemu) "));
                    }
                }
                scanned = buf.len();
            }
        }
    }
    *s.writer.lock().unwrap() = None;
}

fn answer(cmd: &Value, script: Script, fd: bool) -> Value {
    let name = cmd["execute"].as_str().or(cmd["exec-oob"].as_str());
    let mut reply = match name.unwrap_or("") {
        "getfd" | "add-fd" if !fd => json!({"error": {"class": "GenericError",
            "desc": "No file descriptor supplied via SCM_RIGHTS"}}),
        "add-fd" => {
            json!({"return": {"fdset-id": cmd["arguments"]["fdset-id"].as_i64().unwrap_or(0), "fd": 40}})
        }
        _ if cmd["arguments"]["fail"] == true => {
            json!({"error": {"class": "GenericError", "desc": "failed"}})
        }
        "qmp_capabilities" if script.refuse_caps => {
            json!({"error": {"class": "GenericError", "desc": "no oob here"}})
        }
        "qmp_capabilities" => {
            std::thread::sleep(script.caps_delay);
            json!({"return": {}})
        }
        "query-version" => json!({"return": {
            "qemu": {"major": 7, "minor": 2, "micro": script.gen}, "package": ""}}),
        "slow" => {
            std::thread::sleep(Duration::from_millis(200));
            json!({"return": {}})
        }
        _ => json!({"return": {}}),
    };
    if let Some(id) = cmd.get("id") {
        reply["id"] = id.clone();
    }
    reply
}
