//! One client connection, and its connections to the QEMU generations behind it.
//!
//! All sockets are non-blocking and registered edge-triggered: every side is read until it
//! would block, and a side left unread because a buffer was full is read again as soon as the
//! buffer drains, since no new edge would come for bytes already waiting.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::time::Instant;

use mio::net::UnixStream;
use mio::Token;
use nix::poll::PollFlags;

use super::framing::{Filter, Greeting, Inbound, Outbound, Unit, CAP};
use super::sockets::{send, wait_fd};
use super::Mode;

const CHUNK: usize = 64 * 1024;

/// What one read gave.
enum Got {
    Data,
    Blocked,
    /// End of stream, or the peer reset it: either way nothing more comes.
    End,
}

fn read_chunk(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Got {
    let len = buf.len();
    buf.resize(len + CHUNK, 0);
    let got = loop {
        match stream.read(&mut buf[len..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    match got {
        Ok(n) => {
            buf.truncate(len + n);
            if n == 0 {
                Got::End
            } else {
                Got::Data
            }
        }
        Err(e) => {
            buf.truncate(len);
            if e.kind() == io::ErrorKind::WouldBlock {
                Got::Blocked
            } else {
                Got::End
            }
        }
    }
}

/// Writes the front of `buf` until the socket would block. `Err` when the peer is gone.
fn write_some(stream: &UnixStream, buf: &mut Vec<u8>) -> Result<bool, ()> {
    let mut at = 0;
    let mut result = Ok(());
    while at < buf.len() {
        match send(stream.as_fd(), &buf[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => {
                result = Err(());
                break;
            }
        }
    }
    buf.drain(..at);
    result.map(|()| at > 0)
}

/// Why a new generation's connection could not be made ready.
#[derive(Debug)]
pub(super) enum Handshake {
    Io(io::Error),
    /// The replayed `qmp_capabilities` was refused, with QEMU's description.
    Refused(String),
}

/// One connection to one QEMU generation's monitor or chardev.
#[derive(Debug)]
pub(super) struct Backend {
    pub stream: UnixStream,
    pub token: Token,
    rx: Vec<u8>,
    pub out: Outbound,
    to_qemu: Vec<u8>,
    /// One entry per forwarded unit QEMU will answer, oldest first; a `qmp_capabilities`
    /// carries its bytes, to be replayed if QEMU accepts it.
    pending: VecDeque<Option<Vec<u8>>>,
    /// Output of a generation not yet committed, filtered, waiting for the client.
    held: Vec<u8>,
    pub eof: bool,
    shut: bool,
}

impl Backend {
    /// Connects to a generation's backend socket. A unix `connect` to a listening socket
    /// completes at once, queued in its backlog until QEMU accepts, so this does not block.
    pub(super) fn connect(
        path: &Path,
        mode: Mode,
        greeting: Greeting,
        filter: Filter,
        token: Token,
    ) -> io::Result<Backend> {
        let stream = StdStream::connect(path)?;
        stream.set_nonblocking(true)?;
        Ok(Backend {
            stream: UnixStream::from_std(stream),
            token,
            rx: Vec::new(),
            out: Outbound::new(mode, greeting, filter),
            to_qemu: Vec::new(),
            pending: VecDeque::new(),
            held: Vec::new(),
            eof: false,
            shut: false,
        })
    }

    /// Reads what QEMU sent and frames it into `out`, or into `held` when `out` is `None`.
    /// With `bounded`, stops once the destination holds [`CAP`] bytes. Returns whether
    /// anything happened, and the answers seen.
    fn pull(&mut self, out: Option<&mut Vec<u8>>, bounded: bool) -> (bool, Vec<bool>) {
        let mut held = std::mem::take(&mut self.held);
        let out = out.unwrap_or(&mut held);
        let mut progress = false;
        let mut answers = Vec::new();
        while !self.eof && (!bounded || out.len() < CAP) {
            match read_chunk(&mut self.stream, &mut self.rx) {
                Got::Data => answers.extend(self.out.process(&mut self.rx, out)),
                Got::Blocked => break,
                Got::End => self.eof = true,
            }
            progress = true;
        }
        self.held.append(&mut held);
        (progress, answers)
    }

    /// Writes forwarded input to QEMU. A QEMU that stopped reading for good is gone.
    fn push(&mut self) -> bool {
        match write_some(&self.stream, &mut self.to_qemu) {
            Ok(progress) => progress,
            Err(()) => {
                self.to_qemu.clear();
                self.eof = true;
                true
            }
        }
    }

    /// Matches answers to forwarded units; a `qmp_capabilities` QEMU accepted is remembered.
    fn settle(&mut self, answers: &[bool], caps: &mut Option<Vec<u8>>) {
        for &ok in answers {
            if let Some(Some(bytes)) = self.pending.pop_front() {
                if ok && caps.is_none() {
                    *caps = Some(bytes);
                }
            }
        }
    }

    /// Whether everything forwarded has been written and answered (or QEMU is gone).
    pub(super) fn drained(&self) -> bool {
        self.eof || (self.to_qemu.is_empty() && self.pending.is_empty())
    }

    /// Blocks until the greeting (QMP) or banner (HMP) has been read, then replays the
    /// client's `qmp_capabilities` and swallows its answer. Used on a new generation, which
    /// is up and answers at once; whatever follows stays held for the client.
    pub(super) fn handshake(
        &mut self,
        caps: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(), Handshake> {
        self.wait(deadline, |b| b.out.greeting == Greeting::Done)?;
        let Some(caps) = caps else { return Ok(()) };
        self.out.swallow = true;
        self.to_qemu.extend_from_slice(caps);
        while !self.to_qemu.is_empty() {
            self.push();
            if self.eof {
                return Err(Handshake::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            if !self.to_qemu.is_empty() {
                wait_fd(self.stream.as_fd(), PollFlags::POLLOUT, deadline)
                    .map_err(Handshake::Io)?;
            }
        }
        self.wait(deadline, |b| b.out.replayed.is_some())?;
        match self.out.replayed.take() {
            Some(Err(desc)) => Err(Handshake::Refused(desc)),
            _ => Ok(()),
        }
    }

    fn wait(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Backend) -> bool,
    ) -> Result<(), Handshake> {
        loop {
            self.pull(None, false);
            if done(self) {
                return Ok(());
            }
            if self.eof {
                return Err(Handshake::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            wait_fd(self.stream.as_fd(), PollFlags::POLLIN, deadline).map_err(Handshake::Io)?;
        }
    }
}

/// One accepted client and the QEMU connections serving it.
#[derive(Debug)]
pub(super) struct Conn {
    pub monitor: usize,
    pub client: UnixStream,
    pub token: Token,
    to_client: Vec<u8>,
    from_client: Vec<u8>,
    inbound: Inbound,
    client_eof: bool,
    /// The client is gone: nothing more can be delivered.
    pub dead: bool,
    /// QEMU is gone: the client is closed once it has everything QEMU said.
    pub closing: bool,
    /// The generation serving the client; `None` while it waits its turn.
    pub back: Option<Backend>,
    /// The connection prepared on the generation a swap moves to.
    pub next: Option<Backend>,
    /// The client's `qmp_capabilities`, exactly as it sent it, once QEMU accepted it.
    pub caps: Option<Vec<u8>>,
}

impl Conn {
    pub(super) fn new(monitor: usize, mode: Mode, client: UnixStream, token: Token) -> Conn {
        Conn {
            monitor,
            client,
            token,
            to_client: Vec::new(),
            from_client: Vec::new(),
            inbound: Inbound::new(mode),
            client_eof: false,
            dead: false,
            closing: false,
            back: None,
            next: None,
            caps: None,
        }
    }

    /// Moves bytes every way it can until nothing moves. With `hold`, client input is left
    /// unread and unforwarded; QEMU's output and input forwarded earlier still flow.
    pub(super) fn pump(&mut self, hold: bool) {
        loop {
            let mut progress = false;
            if let Some(b) = &mut self.back {
                let (moved, answers) = b.pull(Some(&mut self.to_client), true);
                b.settle(&answers, &mut self.caps);
                progress |= moved;
            }
            if let Some(n) = &mut self.next {
                progress |= n.pull(None, true).0;
            }
            match write_some(&self.client, &mut self.to_client) {
                Ok(moved) => progress |= moved,
                Err(()) => self.dead = true,
            }
            if !hold && !self.closing && self.back.is_some() {
                progress |= self.read_client();
                progress |= self.forward();
            }
            if let Some(b) = &mut self.back {
                progress |= b.push();
                // QEMU sees the client's end of input as its own: its chardev then drops
                // the connection (`tcp_chr_disconnect`) and accepts the next one.
                if !hold && self.client_eof && self.from_client.is_empty() && b.to_qemu.is_empty() {
                    if !b.shut {
                        let _ = b.stream.shutdown(Shutdown::Write);
                    }
                    b.shut = true;
                }
            }
            if self.dead || !progress {
                break;
            }
        }
    }

    fn read_client(&mut self) -> bool {
        let mut progress = false;
        while !self.client_eof && !self.dead && self.from_client.len() < CAP {
            match read_chunk(&mut self.client, &mut self.from_client) {
                Got::Data => {}
                Got::Blocked => break,
                Got::End => self.client_eof = true,
            }
            progress = true;
        }
        progress
    }

    /// Moves complete units of client input to QEMU, keeping count of those it will answer.
    fn forward(&mut self) -> bool {
        let Some(b) = &mut self.back else {
            return false;
        };
        let mut at = 0;
        while b.to_qemu.len() < CAP && at < self.from_client.len() {
            let rest = &self.from_client[at..];
            let unit = match self.inbound.next(rest) {
                Some(unit) => unit,
                // Half a unit waits for the rest, unless the rest can never come: the client
                // ended its input, or the unit outgrew the buffer (QEMU refuses those anyway).
                None if self.client_eof || self.from_client.len() >= CAP => {
                    self.inbound.consumed();
                    Unit {
                        len: rest.len(),
                        answered: false,
                        caps: false,
                    }
                }
                None => break,
            };
            let bytes = &rest[..unit.len];
            b.to_qemu.extend_from_slice(bytes);
            if unit.answered {
                b.pending.push_back(unit.caps.then(|| bytes.to_vec()));
            }
            at += unit.len;
        }
        self.from_client.drain(..at);
        at > 0
    }

    /// What is left to relay once QEMU is gone: the connection to read to its end (when there
    /// is room for what it says) and the client to write to. `None` when the client has
    /// everything, or is gone itself.
    pub(super) fn unflushed(&self) -> Option<(Option<BorrowedFd<'_>>, Option<BorrowedFd<'_>>)> {
        if self.dead {
            return None;
        }
        let read = self
            .back
            .as_ref()
            .filter(|b| !b.eof && self.to_client.len() < CAP);
        let write = (!self.to_client.is_empty()).then(|| self.client.as_fd());
        let read = read.map(|b| b.stream.as_fd());
        (read.is_some() || write.is_some()).then_some((read, write))
    }

    /// Whether the client may be closed and forgotten.
    pub(super) fn done(&self) -> bool {
        self.dead || (self.closing && self.to_client.is_empty())
    }

    /// Whether everything forwarded to the current generation has its answer.
    pub(super) fn drained(&self) -> bool {
        self.back.as_ref().is_none_or(Backend::drained)
    }

    /// Whether the current generation still owes what decides how to prepare the next: its
    /// greeting (did the client see one?) or its answer to a `qmp_capabilities` (replay it?).
    pub(super) fn unsettled(&self) -> bool {
        self.back.as_ref().is_some_and(|b| {
            !b.eof && (b.out.greeting != Greeting::Done || b.pending.iter().any(Option::is_some))
        })
    }

    /// Whether the client saw a greeting (QMP) or banner (HMP), so must not see another.
    pub(super) fn greeted(&self) -> bool {
        self.back
            .as_ref()
            .is_some_and(|b| b.out.greeting == Greeting::Done)
    }

    /// Commits a swap for this client: the old generation's last output, then what the new
    /// one said so far, then the new one live. Returns the old connection to deregister.
    /// `resumed_by_swap`: the guest ran before the swap, so the new generation's first RESUME
    /// is the swap's own, not news to the client.
    pub(super) fn switch(&mut self, resumed_by_swap: bool) -> Option<Backend> {
        let mut old = self.back.take();
        if let Some(o) = &mut old {
            o.pull(Some(&mut self.to_client), false);
        }
        match self.next.take() {
            Some(mut new) => {
                self.to_client.append(&mut new.held);
                new.out.filter = Filter::Live;
                new.out.drop_resume = resumed_by_swap;
                self.back = Some(new);
            }
            // Nothing was prepared for it: it cannot go on without losing its session.
            None => self.closing = true,
        }
        old
    }

    /// Aborts a swap for this client: back to the old generation, whose RESUME restarting
    /// the guest answers a STOP the client never saw. Returns the prepared connection.
    pub(super) fn unswitch(&mut self) -> Option<Backend> {
        if let Some(b) = &mut self.back {
            b.out.filter = Filter::Live;
            b.out.drop_resume = b.out.hidden_stop;
        }
        self.next.take()
    }
}
