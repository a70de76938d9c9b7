//! A small QMP client for tests: one command at a time, events kept aside.
//!
//! Commands carry an `id`, which QMP echoes in the reply, so a reply is never
//! confused with an event or a late answer. Every read has a deadline: a test must
//! fail with a message, not hang, when QEMU (or the proxy in front of it) stops
//! answering.

use std::io::{self, BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde_json::{json, Value};

/// A QMP connection past capabilities negotiation.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Bytes of a message not yet complete when a read timed out.
    partial: Vec<u8>,
    events: Vec<Value>,
    timeout: Duration,
    next_id: u64,
    greeting: Value,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until it accepts, within
    /// `timeout`), reads the greeting and negotiates capabilities. `timeout` is also
    /// the default reply deadline of [`Qmp::execute`].
    pub fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> Qmp {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "cannot connect to QMP socket {} within {timeout:?}: {e}",
                        path.display()
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let reader = BufReader::new(stream.try_clone().expect("clone QMP socket"));
        let mut qmp = Qmp {
            path,
            writer: stream,
            reader,
            partial: Vec::new(),
            events: Vec::new(),
            timeout,
            next_id: 1,
            greeting: Value::Null,
        };
        let greeting = qmp.read_message(deadline).unwrap_or_else(|| {
            panic!(
                "no QMP greeting on {} within {timeout:?}",
                qmp.path.display()
            )
        });
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", Value::Null);
        qmp
    }

    /// The greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets the reply deadline for later commands.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `cmd` with `args` (an object, or `Value::Null` for none) and returns
    /// its `"return"` value; panics if QEMU answers with an error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.try_execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd} on {} failed: {e}", self.path.display()))
    }

    /// Runs `cmd` and returns `Ok(return)` or `Err(error)` (the `"error"` object).
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let id = self.send(cmd, args, None);
        self.wait_reply(cmd, id)
    }

    /// Like [`Qmp::execute`], passing `fd` along with the command (SCM_RIGHTS), as
    /// `getfd` and `add-fd` expect.
    pub fn execute_with_fd(&mut self, cmd: &str, args: Value, fd: BorrowedFd<'_>) -> Value {
        let id = self.send(cmd, args, Some(fd));
        self.wait_reply(cmd, id)
            .unwrap_or_else(|e| panic!("QMP {cmd} on {} failed: {e}", self.path.display()))
    }

    /// Events received so far (in order), removing them from the connection; also
    /// picks up any that are already waiting on the socket.
    pub fn events(&mut self) -> Vec<Value> {
        while let Some(msg) = self.read_message(Instant::now() + Duration::from_millis(1)) {
            self.stash(msg);
        }
        std::mem::take(&mut self.events)
    }

    /// Waits for the event named `name` and returns it; earlier events stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            match self.read_message(deadline) {
                Some(msg) => self.stash(msg),
                None => panic!(
                    "no QMP event {name} on {} within {timeout:?}",
                    self.path.display()
                ),
            }
        }
    }

    fn send(&mut self, cmd: &str, args: Value, fd: Option<BorrowedFd<'_>>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        match fd {
            None => self
                .writer
                .write_all(&bytes)
                .unwrap_or_else(|e| panic!("QMP {cmd}: write to {}: {e}", self.path.display())),
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let sent = sendmsg::<UnixAddr>(
                    self.writer.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                )
                .unwrap_or_else(|e| panic!("QMP {cmd}: sendmsg to {}: {e}", self.path.display()));
                // The fd went with the first byte; the rest is plain data.
                self.writer
                    .write_all(&bytes[sent..])
                    .unwrap_or_else(|e| panic!("QMP {cmd}: write to {}: {e}", self.path.display()));
            }
        }
        id
    }

    fn wait_reply(&mut self, cmd: &str, id: u64) -> Result<Value, Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(mut msg) = self.read_message(deadline) else {
                panic!(
                    "QMP {cmd}: no reply from {} within {:?}",
                    self.path.display(),
                    self.timeout
                );
            };
            if msg.get("event").is_some() {
                self.stash(msg);
                continue;
            }
            if msg.get("id") != Some(&json!(id)) {
                panic!("QMP {cmd}: reply for another command: {msg}");
            }
            if let Some(ret) = msg.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = msg.get_mut("error") {
                return Err(err.take());
            }
            panic!("QMP {cmd}: malformed reply: {msg}");
        }
    }

    fn stash(&mut self, msg: Value) {
        if msg.get("event").is_some() {
            self.events.push(msg);
        } else {
            panic!(
                "unexpected QMP message from {} outside a command: {msg}",
                self.path.display()
            );
        }
    }

    /// Reads one message, or `None` if none completes before `deadline`. Panics on
    /// EOF, I/O errors and bad JSON.
    fn read_message(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .expect("set QMP read timeout");
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => panic!("QMP connection {} closed by the peer", self.path.display()),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    return Some(serde_json::from_slice(&line).unwrap_or_else(|e| {
                        panic!("bad QMP message {:?}: {e}", String::from_utf8_lossy(&line))
                    }));
                }
                Ok(_) => panic!("QMP connection {} closed mid-message", self.path.display()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("QMP read from {}: {e}", self.path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted peer: greets, then answers each command line with `reply(cmd)`,
    /// sending an event before every reply.
    fn fake_qmp(path: &Path, reply: fn(&Value) -> Value) -> thread::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(stream).lines() {
                let cmd: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let mut answer = reply(&cmd);
                answer["id"] = cmd["id"].clone();
                writeln!(out, r#"{{"event": "TICK", "data": {{}}}}"#).unwrap();
                writeln!(out, "{answer}").unwrap();
                seen.push(cmd);
            }
            seen
        })
    }

    #[test]
    fn executes_commands_and_keeps_events() {
        let dir = crate::tempdir();
        let path = dir.join("qmp");
        let peer = fake_qmp(&path, |cmd| match cmd["execute"].as_str() {
            Some("fail") => json!({"error": {"class": "GenericError", "desc": "no"}}),
            _ => json!({"return": {"echo": cmd["arguments"].clone()}}),
        });
        let mut qmp = Qmp::connect_unix(&path, Duration::from_secs(5));
        assert_eq!(
            qmp.execute("query-x", json!({"a": 1})),
            json!({"echo": {"a": 1}})
        );
        let err = qmp.try_execute("fail", Value::Null).unwrap_err();
        assert_eq!(err["desc"], "no");
        // One TICK before each of the three replies (capabilities included).
        assert_eq!(qmp.events().len(), 3);
        drop(qmp);
        let seen = peer.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert!(seen[0].get("arguments").is_none());
        assert_eq!(seen[1]["id"], 2);
    }

    #[test]
    fn passes_a_file_descriptor() {
        let dir = crate::tempdir();
        let path = dir.join("qmp");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            writeln!(stream, r#"{{"QMP": {{}}}}"#).unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            writeln!(stream, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            // getfd: the fd arrives with the first byte of the command.
            let mut buf = [0u8; 256];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = nix::sys::socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            let fds: Vec<_> = msg
                .cmsgs()
                .unwrap()
                .filter_map(|c| match c {
                    nix::sys::socket::ControlMessageOwned::ScmRights(fds) => Some(fds),
                    _ => None,
                })
                .flatten()
                .collect();
            let len = msg.bytes;
            // The command came in one sendmsg, whole.
            assert!(String::from_utf8_lossy(&buf[..len]).contains("getfd"));
            writeln!(stream, r#"{{"return": {{}}, "id": 2}}"#).unwrap();
            fds
        });
        let mut qmp = Qmp::connect_unix(&path, Duration::from_secs(5));
        let file = std::fs::File::open("/dev/null").unwrap();
        qmp.execute_with_fd(
            "getfd",
            json!({"fdname": "x"}),
            std::os::fd::AsFd::as_fd(&file),
        );
        let fds = peer.join().unwrap();
        assert_eq!(fds.len(), 1);
        nix::unistd::close(fds[0]).unwrap();
    }
}
