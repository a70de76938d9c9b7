//! Asking the placer without waiting on it: the request goes out and the answer comes in as
//! the socket allows, so a supervisor asking during an upgrade keeps serving the VM's consoles,
//! monitors and signals meanwhile ([`crate::supervisor::Supervisor::ask_placer`]), and a placer
//! that is stopped, stuck in the kernel or slow costs the upgrade [`super::TIMEOUT`] in all,
//! never the loop.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use serde_json::Value;

use super::MAX_LINE;
use crate::rundir;

/// One request to the placer under way, on a non-blocking connection of its own.
#[derive(Debug)]
pub struct Asking {
    stream: UnixStream,
    /// The socket's path, for messages.
    shown: PathBuf,
    out: Vec<u8>,
    sent: usize,
    answer: Vec<u8>,
}

impl Asking {
    /// Connects to the placer's socket and queues `req`. Never waits: connect(2) on a unix
    /// socket either connects at once or, with the placer's backlog full, fails with EAGAIN.
    pub fn start(req: &Value) -> Result<Asking, String> {
        let base = rundir::base(false).map_err(|e| crate::error_chain(&e))?;
        Asking::start_at(&base.reach(super::SOCKET), &base.shown(super::SOCKET), req)
    }

    /// [`Asking::start`] on the socket at `path`, shown as `shown`.
    pub(crate) fn start_at(path: &Path, shown: &Path, req: &Value) -> Result<Asking, String> {
        let no_placer = |e: Errno| {
            format!(
                "no placer service (qemu-liveupgrade placer) at {}: {}",
                shown.display(),
                io::Error::from(e)
            )
        };
        let sock: OwnedFd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(no_placer)?;
        let addr = UnixAddr::new(path).map_err(no_placer)?;
        match crate::fdio::retry(|| socket::connect(sock.as_raw_fd(), &addr)) {
            Ok(()) => {}
            Err(Errno::EAGAIN) => {
                return Err(format!(
                    "the placer at {} is busy: its backlog is full",
                    shown.display()
                ))
            }
            Err(e) => return Err(no_placer(e)),
        }
        let stream = UnixStream::from(sock);
        let fail = |e: io::Error| format!("placer {}: {e}", shown.display());
        let (uid, pid) = rundir::peer(&stream).map_err(fail)?;
        if !uid.is_root() {
            return Err(format!(
                "{} is served by pid {pid} as uid {uid}, not by root",
                shown.display()
            ));
        }
        let mut out = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        out.push(b'\n');
        Ok(Asking {
            stream,
            shown: shown.to_path_buf(),
            out,
            sent: 0,
            answer: Vec::new(),
        })
    }

    /// The connection, to be woken on.
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Moves the request on as far as the socket allows now, without waiting: `Some` once
    /// the placer answered (its first line) or the connection failed.
    pub fn step(&mut self) -> Option<Result<Value, String>> {
        while let Some(rest) = self.out.get(self.sent..).filter(|r| !r.is_empty()) {
            match crate::fdio::send(self.stream.as_fd(), rest) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(self.failed(e))),
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return Some(self.answered()),
                Ok(n) => {
                    self.answer
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if self.answer.contains(&b'\n') || self.answer.len() as u64 >= MAX_LINE {
                        return Some(self.answered());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(self.failed(e))),
            }
        }
    }

    /// Asks and waits until `deadline` for the answer: for a launcher that has no loop yet.
    pub fn wait(mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(answer) = self.step() {
                return answer;
            }
            let event = match self.sent < self.out.len() {
                true => PollFlags::POLLOUT,
                false => PollFlags::POLLIN,
            };
            if crate::fdio::wait_fd(self.stream.as_fd(), event, deadline).is_err() {
                return Err(self.timed_out());
            }
        }
    }

    /// What to say when the answer did not come in time.
    pub fn timed_out(&self) -> String {
        format!(
            "placer {}: no answer within {} s",
            self.shown.display(),
            super::TIMEOUT.as_secs()
        )
    }

    fn failed(&self, e: io::Error) -> String {
        format!("placer {}: {e}", self.shown.display())
    }

    /// The answer's first line, as JSON; an `error` it carries becomes the error.
    fn answered(&self) -> Result<Value, String> {
        let line = self
            .answer
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        let reply: Value = serde_json::from_slice(line)
            .map_err(|e| format!("placer {}: not JSON ({e})", self.shown.display()))?;
        match reply.get("error").and_then(Value::as_str) {
            Some(e) => Err(format!("the placer says: {e}")),
            None => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests;
