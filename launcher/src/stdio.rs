//! The launcher's own stdout and stderr, written without ever blocking its loop.
//!
//! What goes there: QEMU's output copied on ([`crate::relay`]: a daemonized VM's, and the
//! stderr of every generation after the first), the upgrade reports and the launcher's own
//! one-line messages. Whatever reads it (virtlogd under libvirt, journald, a terminal, a
//! script's pipe) may stop reading: a plain `write(2)` to a full pipe then waits, and with it
//! the supervisor's loop, every console and monitor of the VM, and any upgrade under way.
//!
//! The fd's open file description is shared with others (the first QEMU writes to the same
//! stderr), so the launcher may not set `O_NONBLOCK` on it. Each write is made non-blocking
//! per call instead: `pwritev2(RWF_NOWAIT)` where the kernel takes it for the fd (pipes since
//! Linux 6.4, sockets), else a write of at most [`GUARDED_CHUNK`] once `poll(2)` said the fd
//! is writable: a pipe that poll calls writable has a free buffer page, which takes `PIPE_BUF`
//! bytes at once (pipe(7)). Regular files and block devices wait on no reader and are written
//! plainly, whole and in order (libvirt's domain log, when virtlogd is not used).
//!
//! What cannot be written now waits in a queue of at most [`QUEUE_MAX`] bytes per stream, and
//! the loop writes it as the fd becomes writable ([`watch`], [`on_writable`]). Overflow
//! policy: these are diagnostics, so output that does not fit is dropped and counted
//! ([`dropped`], in `status`); once the queue has drained, one line says how much was lost
//! while nothing read the stream. A reader that is gone for good (EPIPE, a closed fd) costs
//! the output, never the VM; a failing write (a full disk) costs the bytes it carried.
//!
//! Residue: without `RWF_NOWAIT` (pipes before Linux 6.4, e.g. Debian 12's 6.1), a second
//! writer on the same pipe (the first QEMU, until the first upgrade) that fills it between
//! the launcher's `poll` and its `write` makes that write wait until the reader takes
//! `PIPE_BUF` bytes; a terminal, which takes no `RWF_NOWAIT`, is written [`TTY_CHUNK`] bytes
//! at a time and can make the write wait the same way when it has less room than that.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::SFlag;

use crate::token::Token;

/// Most bytes that wait for one stream; output beyond is dropped.
pub const QUEUE_MAX: usize = 64 * 1024;
/// Most bytes written at once to an fd that has no per-call non-blocking write, after poll(2)
/// said it is writable: `PIPE_BUF`, which a pipe with any room takes whole.
pub const GUARDED_CHUNK: usize = libc::PIPE_BUF;
/// The same for a terminal, which poll(2) calls writable with fewer than 256 characters
/// waiting in its output buffer (`WAKEUP_CHARS`).
pub const TTY_CHUNK: usize = 256;

/// How an fd is written without waiting, found at its first write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Not written yet.
    Unknown,
    /// `pwritev2(RWF_NOWAIT)`, not yet known to be supported for this fd.
    Probe,
    /// `pwritev2(RWF_NOWAIT)`.
    NoWait,
    /// poll(2) for POLLOUT, then a write of at most this many bytes.
    Guarded(usize),
    /// A plain write: a regular file or a block device.
    Plain,
}

/// One of the launcher's output streams.
#[derive(Debug)]
pub struct Sink {
    fd: RawFd,
    how: How,
    queue: Vec<u8>,
    /// Bytes dropped since the launcher started.
    dropped: u64,
    /// Bytes dropped that no line has reported yet.
    unreported: u64,
    /// The reader is gone for good: output is discarded.
    gone: bool,
    /// The fd is registered with the loop for writability.
    watched: bool,
}

impl Sink {
    /// A stream writing to `fd`, which stays open for the launcher's life.
    pub fn new(fd: RawFd) -> Sink {
        Sink {
            fd,
            how: How::Unknown,
            queue: Vec::new(),
            dropped: 0,
            unreported: 0,
            gone: false,
            watched: false,
        }
    }

    /// Writes `bytes` after what waits, as far as the fd takes them now; the rest waits. What
    /// does not fit in the queue is dropped and counted.
    pub fn write(&mut self, bytes: &[u8]) {
        if self.gone || bytes.is_empty() {
            return;
        }
        let mut rest = bytes;
        if self.queue.is_empty() {
            // Nothing waits, so nothing is overtaken: straight to the fd, as much as it takes.
            while !rest.is_empty() {
                match write_now(self.fd, &mut self.how, rest) {
                    Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                    Err(Errno::EAGAIN) => break,
                    Err(e) => return self.failed(e, rest.len()),
                }
            }
            if rest.is_empty() {
                // Bytes a failing write cost earlier are said now that writes go again.
                if self.unreported > 0 {
                    self.flush();
                }
                return;
            }
        }
        if self.queue.len().saturating_add(rest.len()) > QUEUE_MAX {
            self.lost(rest.len());
            return;
        }
        self.queue.extend_from_slice(rest);
        self.flush();
    }

    /// Writes what waits, as far as the fd takes it without waiting; once all of it went,
    /// says how much was dropped meanwhile, if anything was. Returns whether bytes still wait.
    pub fn flush(&mut self) -> bool {
        let mut said = false;
        loop {
            while !self.queue.is_empty() && !self.gone {
                match write_now(self.fd, &mut self.how, &self.queue) {
                    Ok(n) => {
                        self.queue.drain(..n.min(self.queue.len()));
                    }
                    Err(Errno::EAGAIN) => return true,
                    Err(e) => {
                        let n = self.queue.len();
                        self.queue.clear();
                        self.failed(e, n);
                        return false;
                    }
                }
            }
            // Said at most once a call: the line itself may fail to go (a full disk).
            if self.gone || self.unreported == 0 || said {
                return false;
            }
            let line = format!(
                "{}qemu-liveupgrade: {} bytes of output dropped: {} was not being read\n",
                prefix(),
                self.unreported,
                if self.fd == 1 { "stdout" } else { "stderr" }
            );
            self.unreported = 0;
            said = true;
            self.queue.extend_from_slice(line.as_bytes());
        }
    }

    /// Bytes waiting.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// `n` bytes that could not wait are lost.
    fn lost(&mut self, n: usize) {
        self.dropped = self.dropped.saturating_add(n as u64);
        self.unreported = self.unreported.saturating_add(n as u64);
    }

    /// A write of `n` bytes failed with `e`. A reader that went away (EPIPE), a closed fd or
    /// a peer that hung up takes nothing from here on, as it would have taken nothing from
    /// QEMU itself: the stream is discarded. Any other failure (a full disk, EIO) costs these
    /// bytes, counted; later output is tried again.
    fn failed(&mut self, e: Errno, n: usize) {
        match e {
            Errno::EPIPE
            | Errno::EBADF
            | Errno::ECONNRESET
            | Errno::ENOTCONN
            | Errno::ESHUTDOWN
            | Errno::EINVAL => {
                self.gone = true;
                self.queue.clear();
            }
            _ => self.lost(n),
        }
    }

    /// Registers the fd with the loop for writability while bytes wait, and drops the
    /// registration once none do: a registered pipe would wake the loop at every read its
    /// reader makes.
    fn watch(&mut self, registry: &Registry) {
        let want = !self.queue.is_empty() && !self.gone;
        if want == self.watched {
            return;
        }
        let mut source = SourceFd(&self.fd);
        let token = Token::Stdio(self.fd.unsigned_abs() as usize).to_mio();
        self.watched = match want {
            // An fd epoll cannot watch (a regular file never waits anyway) stays unwatched:
            // its queue drains with the next write or at exit.
            true => registry
                .register(&mut source, token, Interest::WRITABLE)
                .is_ok(),
            false => {
                let _ = registry.deregister(&mut source);
                false
            }
        };
    }
}

/// One write of the front of `buf` to `fd` that does not wait: the bytes written, or EAGAIN.
/// `how` is found at the first call: files and block devices, which wait on no reader, are
/// written plainly (a filesystem may refuse `RWF_NOWAIT` for buffered writes, or take it and
/// fail with EAGAIN where a plain write only waits for the disk); anything else by
/// `RWF_NOWAIT` where the kernel takes it for that fd, else guarded by poll(2).
fn write_now(fd: RawFd, how: &mut How, buf: &[u8]) -> Result<usize, Errno> {
    if *how == How::Unknown {
        *how = match kind(fd) {
            Some(SFlag::S_IFREG | SFlag::S_IFBLK) => How::Plain,
            _ => How::Probe,
        };
    }
    match *how {
        How::Unknown | How::Probe => match write_nowait(fd, buf) {
            // This fd takes no per-call flag (an older kernel, a terminal).
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
                *how = fallback(fd);
                write_now(fd, how, buf)
            }
            other => {
                *how = How::NoWait;
                other
            }
        },
        How::NoWait => write_nowait(fd, buf),
        How::Guarded(chunk) => write_guarded(fd, buf, chunk),
        How::Plain => write_plain(fd, buf),
    }
}

/// `pwritev2(fd, buf, -1, RWF_NOWAIT)`: a write at the fd's position that fails with EAGAIN
/// rather than wait, and leaves the file description's flags alone.
fn write_nowait(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    crate::fdio::retry(|| {
        // SAFETY: `iov` describes `buf`, which outlives the call and which the kernel only
        // reads; `fd` is an fd number, and a closed one fails with EBADF.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        usize::try_from(n).map_err(|_| Errno::last())
    })
}

/// Writes at most `chunk` bytes of `buf`, if poll(2) says `fd` is writable now; else EAGAIN.
fn write_guarded(fd: RawFd, buf: &[u8], chunk: usize) -> Result<usize, Errno> {
    // SAFETY: the fd stays open for the launcher's life (its stdout or stderr); a closed one
    // makes poll report POLLNVAL, handled below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLOUT)];
    let ready = crate::fdio::retry(|| nix::poll::poll(&mut fds, PollTimeout::ZERO))?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    if revents.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
        return Err(Errno::EPIPE);
    }
    if ready == 0 || !revents.contains(PollFlags::POLLOUT) {
        return Err(Errno::EAGAIN);
    }
    write_plain(fd, buf.get(..chunk.min(buf.len())).unwrap_or_default())
}

fn write_plain(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: as in `write_guarded`.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    crate::fdio::retry(|| nix::unistd::write(borrowed, buf))
}

/// The file type of `fd`, if fstat(2) tells.
fn kind(fd: RawFd) -> Option<SFlag> {
    nix::sys::stat::fstat(fd)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
}

/// How to write `fd` when it takes no `RWF_NOWAIT`: a terminal, whose poll(2) says writable
/// with less room than a pipe's, in smaller pieces; anything else `PIPE_BUF` at a time.
fn fallback(fd: RawFd) -> How {
    match kind(fd) {
        Some(SFlag::S_IFREG | SFlag::S_IFBLK) => How::Plain,
        Some(SFlag::S_IFCHR) => How::Guarded(TTY_CHUNK),
        _ => How::Guarded(GUARDED_CHUNK),
    }
}

/// The launcher's streams, by fd: the relays, the reports and the launcher's own lines all
/// write through these, in the order they come.
static SINKS: Mutex<Vec<Sink>> = Mutex::new(Vec::new());
/// What the notice about dropped output starts with (`qemu-system-x86_64: `).
static PREFIX: Mutex<String> = Mutex::new(String::new());

fn sinks() -> MutexGuard<'static, Vec<Sink>> {
    SINKS.lock().unwrap_or_else(|e| e.into_inner())
}

fn prefix() -> String {
    PREFIX.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Sets what the launcher's notices start with: QEMU's name as invoked, and `: `.
pub fn set_prefix(program: &str) {
    *PREFIX.lock().unwrap_or_else(|e| e.into_inner()) = format!("{program}: ");
}

fn with<R>(fd: RawFd, f: impl FnOnce(&mut Sink) -> R) -> R {
    let mut all = sinks();
    let i = match all.iter().position(|s| s.fd == fd) {
        Some(i) => i,
        None => {
            all.push(Sink::new(fd));
            all.len() - 1
        }
    };
    match all.get_mut(i) {
        Some(sink) => f(sink),
        None => f(&mut Sink::new(fd)),
    }
}

/// Writes `bytes` to the launcher's `fd` (1 or 2) without waiting; see the module.
pub fn write(fd: RawFd, bytes: &[u8]) {
    with(fd, |s| s.write(bytes));
}

/// Writes `line` and a line end to stderr without waiting. Returns whether it went out or
/// waits to, rather than being dropped or having no reader.
pub fn line(text: &str) -> bool {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    with(2, |s| {
        let before = s.dropped;
        s.write(&bytes);
        s.dropped == before && !s.gone
    })
}

/// Brings the loop's registrations in line with what waits: call once per turn of the loop.
pub fn watch(registry: &Registry) {
    for s in sinks().iter_mut() {
        s.watch(registry);
    }
}

/// The stream on `fd` became writable: writes what waits.
pub fn on_writable(fd: RawFd) {
    with(fd, Sink::flush);
}

/// Waits until every stream has written what waits, or `deadline`: a last chance for the
/// final report and QEMU's last words when the VM ends, and for QEMU's start-up messages before
/// a daemon's stdio goes to /dev/null.
pub fn drain(deadline: Instant) {
    loop {
        let waiting: Vec<RawFd> = sinks()
            .iter_mut()
            .filter_map(|s| s.flush().then_some(s.fd))
            .collect();
        if waiting.is_empty() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        // SAFETY: as in `write_guarded`: the launcher's stdout and stderr stay open.
        let borrowed = waiting
            .iter()
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) });
        let mut fds: Vec<PollFd<'_>> = borrowed
            .map(|fd| PollFd::new(fd, PollFlags::POLLOUT))
            .collect();
        if let Err(e) = nix::poll::poll(&mut fds, crate::fdio::poll_timeout(left)) {
            if e != Errno::EINTR {
                return;
            }
        }
    }
}

/// Output dropped since the launcher started, in bytes, over all streams.
pub fn dropped() -> u64 {
    sinks().iter().map(|s| s.dropped).sum()
}

/// Forgets what waits for `fd` and how it was written: it was pointed elsewhere (a daemon's
/// stdio at /dev/null).
pub fn reopened(fd: RawFd) {
    sinks().retain(|s| s.fd != fd);
}

/// What waits, as a supervisor handover writes it ([`crate::handover`]).
pub(crate) fn export() -> Vec<crate::handover::state::StdioQueue> {
    sinks().iter().filter_map(Sink::exported).collect()
}

/// Takes up what a handover brought. The new loop has no registration yet; [`watch`] makes it.
pub(crate) fn import(streams: Vec<crate::handover::state::StdioQueue>) {
    let mut all = sinks();
    for sink in streams.into_iter().filter_map(Sink::imported) {
        all.retain(|s| s.fd != sink.fd);
        all.push(sink);
    }
}

impl Sink {
    /// Its part of a handover's state, if it has one: bytes waiting or dropped.
    fn exported(&self) -> Option<crate::handover::state::StdioQueue> {
        (!self.queue.is_empty() || self.dropped > 0).then(|| crate::handover::state::StdioQueue {
            fd: self.fd,
            queued: crate::handover::state::Bytes(self.queue.clone()),
            dropped: self.dropped,
            unreported: self.unreported,
        })
    }

    /// The stream a handover brought: only the launcher's stdout and stderr, the one fds it
    /// writes without owning, and no more than a queue holds.
    fn imported(st: crate::handover::state::StdioQueue) -> Option<Sink> {
        if st.fd != 1 && st.fd != 2 {
            return None;
        }
        let mut sink = Sink::new(st.fd);
        sink.queue = st.queued.0;
        if sink.queue.len() > QUEUE_MAX {
            let cut = sink.queue.len() - QUEUE_MAX;
            sink.queue.truncate(QUEUE_MAX);
            sink.lost(cut);
        }
        sink.dropped = sink.dropped.saturating_add(st.dropped);
        sink.unreported = sink.unreported.saturating_add(st.unreported);
        Some(sink)
    }
}

#[cfg(test)]
mod tests;
