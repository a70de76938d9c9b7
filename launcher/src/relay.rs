//! Copying a QEMU's output on to the launcher's own stdout or stderr.
//!
//! Two cases need it. A daemonized VM: QEMU must not hold the caller's pipes once the
//! foreground has exited (libvirt reads a probe's output to EOF), so its output goes through
//! the launcher, whose stdio points at /dev/null after start-up, as a daemonized QEMU's own does.
//! And every generation after the first: its stderr goes through the launcher so that when it
//! fails to start, the upgrade report can say why in QEMU's own words, while the message still
//! reaches the log the VM's stderr goes to.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// How much of the latest output is kept for reports.
const TAIL: usize = 4096;

/// One pipe from a QEMU to the launcher's fd `to`.
#[derive(Debug)]
pub struct Relay {
    from: OwnedFd,
    to: RawFd,
    open: bool,
    tail: Vec<u8>,
}

/// What one read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// Some bytes were copied; there may be more.
    More,
    /// Nothing to read now.
    Empty,
    /// The writer closed the pipe, or reading failed.
    Eof,
}

impl Relay {
    /// Relays the non-blocking read end `from` to the launcher's fd `to` (1 or 2).
    pub fn new(from: OwnedFd, to: RawFd) -> Relay {
        Relay {
            from,
            to,
            open: true,
            tail: Vec::new(),
        }
    }

    /// The pipe's read end, for registration.
    pub fn raw_fd(&self) -> RawFd {
        self.from.as_raw_fd()
    }

    /// Whether the writer may still write.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Copies everything available now; returns false once the pipe reached EOF.
    pub fn pump(&mut self) -> bool {
        loop {
            match self.copy_once() {
                Copied::More => continue,
                Copied::Empty => return true,
                Copied::Eof => {
                    self.open = false;
                    return false;
                }
            }
        }
    }

    /// For a report: the last error QEMU wrote (a line starting with `prefix`, QEMU's
    /// `progname: `, since hints such as "Use -machine help" follow the error itself), or else
    /// its last non-empty line.
    pub fn last_line(&self, prefix: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.tail);
        let lines = || text.lines().rev().map(str::trim).filter(|l| !l.is_empty());
        lines()
            .find(|l| l.starts_with(prefix))
            .or_else(|| lines().next())
            .map(str::to_owned)
    }

    /// Its part of a supervisor handover's state ([`crate::handover`]).
    pub(crate) fn export(&self) -> crate::handover::state::Relay {
        crate::handover::state::Relay {
            fd: crate::handover::state::Fd::of(&self.from),
            to: self.to,
            open: self.open,
            tail: crate::handover::state::Bytes(self.tail.clone()),
        }
    }

    /// The relay a handover brought, reading `from`.
    pub(crate) fn import(s: crate::handover::state::Relay, from: OwnedFd) -> Relay {
        Relay {
            from,
            to: s.to,
            open: s.open,
            tail: s.tail.0,
        }
    }

    fn copy_once(&mut self) -> Copied {
        let mut buf = [0u8; 16384];
        match nix::unistd::read(self.from.as_raw_fd(), &mut buf) {
            Ok(0) => Copied::Eof,
            Ok(n) => {
                let bytes = buf.get(..n).unwrap_or_default();
                self.keep_tail(bytes);
                // Never waits: a reader of the launcher's output that stalls must not stall
                // the loop; what does not fit is dropped and counted (crate::stdio).
                crate::stdio::write(self.to, bytes);
                Copied::More
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => Copied::Empty,
            Err(_) => Copied::Eof,
        }
    }

    fn keep_tail(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > TAIL {
            let cut = self.tail.len() - TAIL;
            self.tail.drain(..cut);
        }
    }
}

/// A non-blocking, close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_remembers_the_last_line() {
        let (r, w) = pipe().unwrap();
        let (out_r, out_w) = pipe().unwrap();
        let mut relay = Relay::new(r, out_w.as_raw_fd());
        nix::unistd::write(
            &w,
            b"warning: x\nqemu: unsupported machine type\nUse -machine help\n\n",
        )
        .unwrap();
        assert!(relay.pump());
        assert_eq!(
            relay.last_line("qemu: ").as_deref(),
            Some("qemu: unsupported machine type")
        );
        assert_eq!(
            relay.last_line("other: ").as_deref(),
            Some("Use -machine help")
        );
        let mut buf = [0u8; 128];
        let n = nix::unistd::read(out_r.as_raw_fd(), &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"warning: x\n"));
        drop(w);
        assert!(!relay.pump());
        assert!(!relay.is_open());
    }
}
