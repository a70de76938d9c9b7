//! QMP framing on the launcher's private monitor.
//!
//! Each QEMU generation gets one end of a socketpair as `-chardev socket,fd=N` with a QMP
//! monitor on it. The launcher alone talks there: readiness, `query-version`, and later the
//! upgrade itself. QEMU writes one JSON object per line (ending in `\r\n`), so framing is by
//! newline. The socket is non-blocking and registered in the supervisor's `mio::Poll`; callers
//! send commands here and collect replies as the event loop reads them.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::json::JsonExt;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

/// A failure on the private monitor.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading or writing the socket failed.
    #[error("monitor I/O failed")]
    Io(#[source] io::Error),
    /// QEMU closed the monitor: it exited or is exiting.
    #[error("monitor closed by QEMU")]
    Closed,
    /// QEMU sent something that is not JSON.
    #[error("monitor sent invalid JSON")]
    Json(#[source] serde_json::Error),
    /// A command returned an error object.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
}

/// One message QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting, sent once the monitor is up.
    Greeting(Value),
    /// An asynchronous event.
    Event(Value),
    /// The answer to a command: its id and either `return` or `error`.
    Reply {
        /// The id the launcher gave the command.
        id: u64,
        /// The `return` value, or the `error` object.
        result: Result<Value, Value>,
    },
}

/// The launcher's end of one generation's private QMP monitor.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    rbuf: Vec<u8>,
    next_id: u64,
    inbox: VecDeque<Message>,
    closed: bool,
}

impl Qmp {
    /// Wraps the launcher's end of the socketpair and makes it non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<Qmp> {
        stream.set_nonblocking(true)?;
        Ok(Qmp {
            stream,
            rbuf: Vec::new(),
            next_id: 1,
            inbox: VecDeque::new(),
            closed: false,
        })
    }

    /// The socket, for registration with `mio`.
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether QEMU closed its end.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends `{"execute": command, "arguments": args, "id": N}` and returns N.
    pub fn send(&mut self, command: &str, args: Option<Value>) -> Result<u64, QmpError> {
        self.send_with_fd(command, args, None)
    }

    /// Like [`Qmp::send`], passing `fd` along with SCM_RIGHTS, as `getfd` and `add-fd` expect.
    pub fn send_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<u64, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg.put("arguments", args);
        }
        let mut line = serde_json::to_vec(&msg).map_err(QmpError::Json)?;
        line.push(b'\n');
        self.write_all(&line, fd)?;
        Ok(id)
    }

    fn write_all(
        &mut self,
        mut buf: &[u8],
        mut fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), QmpError> {
        while !buf.is_empty() {
            let res = match fd.take() {
                Some(fd) => {
                    let fds = [fd.as_raw_fd()];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    let iov = [io::IoSlice::new(buf)];
                    sendmsg::<()>(
                        self.stream.as_raw_fd(),
                        &iov,
                        &cmsg,
                        MsgFlags::empty(),
                        None,
                    )
                    .map_err(io::Error::from)
                }
                None => self.stream.write(buf),
            };
            match res {
                Ok(n) => buf = buf.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_writable(self.stream.as_fd())?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.closed = true;
                    return Err(QmpError::Closed);
                }
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
        Ok(())
    }

    /// Reads whatever QEMU has sent and queues the complete messages. Call when the socket is
    /// readable; returns how many messages were queued. EOF marks the monitor closed.
    pub fn on_readable(&mut self) -> Result<usize, QmpError> {
        let mut chunk = [0u8; 16384];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self
                    .rbuf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.closed = true;
                    break;
                }
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
        let mut queued = 0;
        while let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.rbuf.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_slice(line).map_err(QmpError::Json)?;
            self.inbox.push_back(classify(value));
            queued += 1;
        }
        Ok(queued)
    }

    /// Takes the reply to command `id` out of the queue, if it has arrived.
    pub fn take_reply(&mut self, id: u64) -> Option<Result<Value, Value>> {
        let pos = self
            .inbox
            .iter()
            .position(|m| matches!(m, Message::Reply { id: got, .. } if *got == id))?;
        match self.inbox.remove(pos) {
            Some(Message::Reply { result, .. }) => Some(result),
            _ => None,
        }
    }

    /// Takes the greeting out of the queue, if it has arrived.
    pub fn take_greeting(&mut self) -> Option<Value> {
        let pos = self
            .inbox
            .iter()
            .position(|m| matches!(m, Message::Greeting(_)))?;
        match self.inbox.remove(pos) {
            Some(Message::Greeting(v)) => Some(v),
            _ => None,
        }
    }

    /// Takes every queued event, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        self.inbox.retain(|m| match m {
            Message::Event(e) => {
                events.push(e.clone());
                false
            }
            _ => true,
        });
        events
    }
}

/// The private monitor as a supervisor handover writes it ([`crate::handover`]).
impl Qmp {
    /// Its part of the handed-over state: the socket, what was read and not framed, and the
    /// messages not yet taken, as QEMU sent them.
    pub(crate) fn export(&self) -> crate::handover::state::Qmp {
        use crate::handover::state::{Bytes, Fd};
        let inbox = self
            .inbox
            .iter()
            .map(|m| match m {
                Message::Greeting(v) | Message::Event(v) => v.clone(),
                Message::Reply { id, result: Ok(v) } => json!({ "return": v, "id": id }),
                Message::Reply { id, result: Err(e) } => json!({ "error": e, "id": id }),
            })
            .collect();
        crate::handover::state::Qmp {
            fd: Fd::of(&self.stream),
            rbuf: Bytes(self.rbuf.clone()),
            next_id: self.next_id,
            inbox,
            closed: self.closed,
        }
    }

    /// The private monitor a handover brought, on its socket `stream`.
    pub(crate) fn import(s: crate::handover::state::Qmp, stream: UnixStream) -> io::Result<Qmp> {
        stream.set_nonblocking(true)?;
        Ok(Qmp {
            stream,
            rbuf: s.rbuf.0,
            next_id: s.next_id,
            inbox: s.inbox.into_iter().map(classify).collect(),
            closed: s.closed,
        })
    }
}

fn classify(value: Value) -> Message {
    if value.get("QMP").is_some() {
        return Message::Greeting(value);
    }
    if value.get("event").is_some() {
        return Message::Event(value);
    }
    let id = value.get("id").and_then(Value::as_u64).unwrap_or(0);
    let result = match value.get("error") {
        Some(err) => Err(err.clone()),
        None => Ok(value.get("return").cloned().unwrap_or(Value::Null)),
    };
    Message::Reply { id, result }
}

/// Turns a QMP error object into a [`QmpError::Command`].
pub fn command_error(command: &str, err: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_owned(),
        class: err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_owned(),
        desc: err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    }
}

/// Blocks until a full socket buffer drains. Only reached when QEMU stops reading its monitor
/// while the launcher sends a command, which commands of a few hundred bytes never cause.
fn wait_writable(fd: BorrowedFd<'_>) -> Result<(), QmpError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::from(1000u16)).map_err(|e| QmpError::Io(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn frames_greeting_replies_and_events() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut qmp = Qmp::new(a).unwrap();
        let mut peer = b;
        peer.write_all(
            b"{\"QMP\": {\"version\": {}}}\r\n{\"event\": \"STOP\"}\r\n{\"return\": {}, \"id\"",
        )
        .unwrap();
        assert_eq!(qmp.on_readable().unwrap(), 2);
        assert!(qmp.take_greeting().is_some());
        assert_eq!(qmp.take_reply(1), None);
        peer.write_all(
            b": 1}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": 2}\n",
        )
        .unwrap();
        assert_eq!(qmp.on_readable().unwrap(), 2);
        assert_eq!(
            qmp.take_reply(2),
            Some(Err(json!({"class": "GenericError", "desc": "no"})))
        );
        assert_eq!(qmp.take_reply(1), Some(Ok(json!({}))));
        assert_eq!(qmp.take_events(), vec![json!({"event": "STOP"})]);
        drop(peer);
        qmp.on_readable().unwrap();
        assert!(qmp.is_closed());
    }

    #[test]
    fn sends_commands_with_ids_and_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut qmp = Qmp::new(a).unwrap();
        let id = qmp.send("query-status", None).unwrap();
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let id2 = qmp
            .send_with_fd("getfd", Some(json!({"fdname": "m"})), Some(pipe_r.as_fd()))
            .unwrap();
        assert_ne!(id, id2);
        let mut buf = [0u8; 256];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut seen = String::new();
        let mut got_fd = false;
        while !seen.contains("getfd") {
            let msg = nix::sys::socket::recvmsg::<()>(
                b.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            got_fd |= msg
                .cmsgs()
                .unwrap()
                .any(|c| matches!(c, nix::sys::socket::ControlMessageOwned::ScmRights(_)));
            let n = msg.bytes;
            seen.push_str(std::str::from_utf8(&iov[0][..n]).unwrap());
        }
        assert!(got_fd);
        let lines: Vec<Value> = seen
            .as_bytes()
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        assert_eq!(lines[0], json!({"execute": "query-status", "id": id}));
        assert_eq!(
            lines[1],
            json!({"execute": "getfd", "id": id2, "arguments": {"fdname": "m"}})
        );
    }
}
