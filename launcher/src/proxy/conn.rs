//! One client connection, and its connections to the QEMU generations behind it.
//!
//! All sockets are non-blocking and registered edge-triggered, for reading only. Each side
//! keeps whether it may have input: set by its readiness event, cleared by a read that finds
//! it empty (EAGAIN, or a read that did not fill the buffer: a stream socket's read returns
//! less only when nothing more is queued, unix(7) but for a message that brought fds). So a
//! round trip costs one read a side, and no read that only learns "nothing". A socket whose
//! peer closed is read to its end whatever a read returned: the end of input may wait behind
//! the last bytes, under the event that brought both. A side left unread because a buffer
//! was full is read again as soon as the buffer drains, since no new edge would come for
//! bytes already waiting. Writability is watched only while output waits on a full socket:
//! with it always on, every read the peer makes of what the proxy sent would wake the loop
//! once more (unix and TCP sockets wake their writer as their queue drains).
//!
//! Fds a client passes with SCM_RIGHTS (libvirt's `getfd` and `add-fd`) go to QEMU in a
//! message that starts with a unit of the client's input. QEMU keeps the fds of the last
//! message that brought any, closing those before, and hands them to the next `getfd` or
//! `add-fd` it runs (`tcp_chr_recv`, `qemu_chr_fe_get_msgfd`); it reads monitor input a byte at
//! a time (`monitor_can_read`), so it has them from that message's first byte. They must reach
//! QEMU no later than the command they are for. The kernel returns at most one fd-carrying
//! message per read, as the read's last part (`unix_stream_read_generic`), so that command ends
//! in the read that brought them, and the fds go with the first byte of the unit that holds
//! the read's first byte. That is early only by commands that take no fds, or by one that has
//! a batch of its own already, in which case the batch goes with the next unit.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::time::Instant;

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use serde_json::Value;

use super::framing::{Filter, Greeting, Inbound, Outbound, Request, Seen, Unit, CAP};
use super::sockets::{recv_fds, send, send_fds};
use super::stream::Stream;
use super::Mode;
use crate::journal::{Journal, Outcome};

const CHUNK: usize = 64 * 1024;

/// What one read gave.
enum Got {
    /// Bytes; `more` when the socket may hold more: the read filled the buffer, or stopped
    /// after a message that carried fds (a unix stream read ends there).
    Data {
        more: bool,
    },
    Blocked,
    /// End of stream, or the peer reset it: either way nothing more comes.
    End,
}

thread_local! {
    /// Where reads land before they are appended to a connection's buffer: zeroed once, so a
    /// read costs a copy of what arrived rather than a 64 KiB clear of the buffer's tail.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

/// Reads what is there into `buf`; with `fds`, also the fds passed along.
fn read_chunk(
    stream: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    mut fds: Option<&mut Vec<OwnedFd>>,
) -> Got {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut passed = false;
        let got = loop {
            let got = match fds.as_deref_mut() {
                Some(fds) => recv_fds(stream, scratch).map(|(n, got)| {
                    passed = !got.is_empty();
                    fds.extend(got);
                    n
                }),
                None => nix::unistd::read(stream.as_raw_fd(), scratch).map_err(io::Error::from),
            };
            match got {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match got {
            Ok(0) => Got::End,
            Ok(n) => {
                buf.extend_from_slice(scratch.get(..n).unwrap_or_default());
                Got::Data {
                    more: passed || n == scratch.len(),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Got::Blocked,
            Err(_) => Got::End,
        }
    })
}

/// Writes the front of `buf` until the socket would block. `Err` when the peer is gone.
fn write_some(stream: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<bool, ()> {
    let mut at = 0;
    let mut result = Ok(());
    while at < buf.len() {
        match send(stream, buf.get(at..).unwrap_or_default()) {
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

/// A forwarded command QEMU has yet to answer.
#[derive(Debug)]
struct Pending {
    request: Request,
    /// A `qmp_capabilities`' bytes, to be replayed if QEMU accepts it.
    caps: Option<Vec<u8>>,
    /// A copy of the fd QEMU takes for it (`getfd`, `add-fd`), for the journal.
    fd: Option<OwnedFd>,
}

/// Fds a client passed, and where in a buffer they go: with the byte at `at`.
#[derive(Debug)]
struct Batch {
    at: usize,
    fds: Vec<OwnedFd>,
}

/// One connection to one QEMU generation's monitor or chardev.
#[derive(Debug)]
pub(super) struct Backend {
    pub stream: UnixStream,
    pub token: Token,
    rx: Vec<u8>,
    pub out: Outbound,
    to_qemu: Vec<u8>,
    /// Client fds to pass along with `to_qemu`, in order.
    fds_out: VecDeque<Batch>,
    /// A copy of the first fd QEMU holds for this connection once it has read what was
    /// forwarded: the next `getfd` or `add-fd` takes it.
    qemu_fd: Option<OwnedFd>,
    /// The forwarded units QEMU will answer, oldest first.
    pending: VecDeque<Pending>,
    /// Output of a generation not yet committed, filtered, waiting for the client.
    held: Vec<u8>,
    pub eof: bool,
    shut: bool,
    /// QEMU may have sent something not read yet.
    pub readable: bool,
    /// Read until EAGAIN or EOF, not trusting a short read.
    drain: bool,
    /// Writability is registered: forwarded input waits on a full socket.
    watch_out: bool,
    /// When this connection, serving the client, first relayed an answer (QMP, HMP) or a
    /// byte (any other chardev), for the upgrade's report.
    pub first_out: Option<Instant>,
    /// A new generation's connection is being made ready ([`Backend::start_handshake`]).
    handshaking: bool,
    /// The client's `qmp_capabilities`, to be replayed once the greeting has been read.
    replay: Option<Vec<u8>>,
    /// A replayed `qmp_capabilities` awaits its answer.
    replayed: bool,
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
            fds_out: VecDeque::new(),
            qemu_fd: None,
            pending: VecDeque::new(),
            held: Vec::new(),
            eof: false,
            shut: false,
            readable: true,
            drain: false,
            watch_out: false,
            first_out: None,
            handshaking: false,
            replay: None,
            replayed: false,
        })
    }

    /// Reads what QEMU sent and frames it into `out`, or into `held` when `out` is `None`.
    /// With `bounded`, stops once the destination holds [`CAP`] bytes. Returns whether
    /// anything happened, and the answers and events seen.
    fn pull(&mut self, out: Option<&mut Vec<u8>>, bounded: bool) -> (bool, Vec<Seen>) {
        let mut held = std::mem::take(&mut self.held);
        let out = out.unwrap_or(&mut held);
        let mut progress = false;
        let mut answers = Vec::new();
        while self.readable && !self.eof && (!bounded || out.len() < CAP) {
            match read_chunk(self.stream.as_fd(), &mut self.rx, None) {
                Got::Data { more } => {
                    answers.extend(self.out.process(&mut self.rx, out));
                    self.readable = more || self.drain;
                }
                Got::Blocked => {
                    self.readable = false;
                    self.drain = false;
                    break;
                }
                Got::End => self.eof = true,
            }
            progress = true;
        }
        self.held.append(&mut held);
        (progress, answers)
    }

    /// Notes when the first answer (or byte, on a chardev) went the client's way.
    fn note_output(&mut self, bytes: bool, seen: &[Seen]) {
        if self.first_out.is_some() || self.out.filter != Filter::Live {
            return;
        }
        let relayed = match self.out.mode() {
            Mode::Raw => bytes,
            Mode::Qmp | Mode::Hmp => seen.iter().any(|s| matches!(s, Seen::Answer { .. })),
        };
        if relayed {
            self.first_out = Some(Instant::now());
        }
    }

    /// Queues `fds` to go to QEMU with the next byte forwarded.
    fn attach(&mut self, fds: Vec<OwnedFd>) {
        // QEMU closes fds it still held when a message brings others, and `getfd` and
        // `add-fd` take the first one and close the rest.
        self.qemu_fd = fds.first().and_then(|fd| fd.try_clone().ok());
        self.fds_out.push_back(Batch {
            at: self.to_qemu.len(),
            fds,
        });
    }

    /// Writes forwarded input to QEMU, each batch of fds with the byte it goes with. A QEMU
    /// that stopped reading for good is gone.
    fn push(&mut self) -> bool {
        let mut at = 0;
        let mut gone = false;
        while at < self.to_qemu.len() {
            let fds = self.fds_out.front().filter(|b| b.at == at);
            let next = self.fds_out.iter().map(|b| b.at).find(|&b| b > at);
            let buf = self
                .to_qemu
                .get(at..next.unwrap_or(self.to_qemu.len()))
                .unwrap_or_default();
            let sent = match fds {
                Some(b) => send_fds(self.stream.as_fd(), buf, &b.fds),
                None => send(self.stream.as_fd(), buf),
            };
            match sent {
                Ok(n) => {
                    // The fds went with the first byte; QEMU has its own copies now.
                    if fds.is_some() {
                        self.fds_out.pop_front();
                    }
                    at += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            self.to_qemu.clear();
            self.fds_out.clear();
            self.eof = true;
            return true;
        }
        self.to_qemu.drain(..at);
        for b in &mut self.fds_out {
            b.at -= at;
        }
        at > 0
    }

    /// Matches answers to the commands they answer, and tells the journal. A
    /// `qmp_capabilities` QEMU accepted is remembered.
    fn settle(
        &mut self,
        seen: Vec<Seen>,
        caps: &mut Option<Vec<u8>>,
        monitor: usize,
        journal: &mut Journal,
    ) {
        for s in seen {
            let (id, reply) = match s {
                Seen::Event(event) => {
                    journal.event(&event);
                    continue;
                }
                Seen::Answer { id, reply } => (id, reply),
            };
            let Some(p) = self.answered(id.as_ref()) else {
                continue;
            };
            let outcome = reply.outcome(p.request.command.as_ref());
            if let (Some(bytes), Outcome::Return(_)) = (p.caps, &outcome) {
                caps.get_or_insert(bytes);
            }
            if let Some(cmd) = p.request.command {
                journal.record(monitor, cmd, outcome, p.fd);
            }
        }
    }

    /// The command a reply answers. QEMU answers in order (`monitor/qmp.c` dispatches one
    /// command at a time), but for `exec-oob` commands, which run at once: a reply goes to
    /// the command with its `id`, else to the oldest in-band command without an `id` (QEMU
    /// answers what it could not parse without one), else to the oldest in-band one.
    fn answered(&mut self, id: Option<&Value>) -> Option<Pending> {
        let in_band = |p: &Pending| !p.request.oob;
        let at = match id {
            Some(id) => self
                .pending
                .iter()
                .position(|p| p.request.id.as_ref() == Some(id)),
            None => self
                .pending
                .iter()
                .position(|p| in_band(p) && p.request.id.is_none()),
        };
        let at = at
            .or_else(|| self.pending.iter().position(in_band))
            .unwrap_or(0);
        self.pending.remove(at)
    }

    /// Whether everything forwarded has been written and answered (or QEMU is gone).
    pub(super) fn drained(&self) -> bool {
        self.eof || (self.to_qemu.is_empty() && self.pending.is_empty())
    }

    /// Starts making a new generation's connection ready for the client: once the greeting
    /// (QMP) or banner (HMP) is read, `caps`, the client's `qmp_capabilities`, is replayed
    /// and its answer swallowed. The loop moves it along ([`Backend::advance`]); whatever
    /// follows stays held for the client.
    pub(super) fn start_handshake(&mut self, caps: Option<Vec<u8>>) {
        self.handshaking = true;
        self.replay = caps;
    }

    /// Replays the client's capabilities once the greeting is in. Returns whether anything
    /// was queued.
    fn advance(&mut self) -> bool {
        if !self.handshaking || self.out.greeting != Greeting::Done {
            return false;
        }
        let Some(caps) = self.replay.take() else {
            return false;
        };
        self.out.swallow = true;
        self.replayed = true;
        self.to_qemu.extend_from_slice(&caps);
        true
    }

    /// Whether the handshake [`Backend::start_handshake`] began is done; `Err` if it cannot
    /// be: the new generation went away, or refused the capabilities.
    pub(super) fn handshake(&self) -> Result<bool, Handshake> {
        if !self.handshaking {
            return Ok(true);
        }
        if self.eof {
            return Err(Handshake::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if self.out.greeting != Greeting::Done || self.replay.is_some() {
            return Ok(false);
        }
        if !self.replayed {
            return Ok(true);
        }
        match &self.out.replayed {
            None => Ok(false),
            Some(Ok(())) => Ok(self.to_qemu.is_empty()),
            Some(Err(desc)) => Err(Handshake::Refused(desc.clone())),
        }
    }
}

/// One accepted client and the QEMU connections serving it.
#[derive(Debug)]
pub(super) struct Conn {
    pub monitor: usize,
    pub client: Stream,
    pub token: Token,
    to_client: Vec<u8>,
    from_client: Vec<u8>,
    /// Fds the client passed, by where in `from_client` the read that brought them began.
    fds_in: VecDeque<Batch>,
    inbound: Inbound,
    client_eof: bool,
    /// The client may have sent something not read yet.
    client_readable: bool,
    /// The client closed its end: read it until EOF, not trusting a short read.
    client_drain: bool,
    /// Writability of the client is registered: output waits on a full socket.
    client_watch_out: bool,
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
    pub(super) fn new(monitor: usize, mode: Mode, client: Stream, token: Token) -> Conn {
        Conn {
            monitor,
            client,
            token,
            to_client: Vec::new(),
            from_client: Vec::new(),
            fds_in: VecDeque::new(),
            inbound: Inbound::new(mode),
            client_eof: false,
            client_readable: true,
            client_drain: false,
            client_watch_out: false,
            dead: false,
            closing: false,
            back: None,
            next: None,
            caps: None,
        }
    }

    /// Moves bytes every way it can until nothing moves, and tells `journal` what QEMU
    /// answered. With `hold`, client input is left unread and unforwarded; QEMU's output and
    /// input forwarded earlier still flow.
    pub(super) fn pump(&mut self, hold: bool, journal: &mut Journal) {
        loop {
            let mut progress = false;
            if let Some(b) = self.back.as_mut() {
                let before = self.to_client.len();
                let (moved, seen) = b.pull(Some(&mut self.to_client), true);
                b.note_output(self.to_client.len() > before, &seen);
                b.settle(seen, &mut self.caps, self.monitor, journal);
                progress |= moved;
            }
            // What a generation not yet committed says changes nothing: until the switch, the
            // old generation is the VM's state.
            if let Some(n) = self.next.as_mut() {
                progress |= n.pull(None, true).0;
            }
            // A new generation's handshake: the replayed capabilities go once it greeted.
            if let Some(n) = self.next.as_mut() {
                progress |= n.advance();
                progress |= n.push();
            }
            match write_some(self.client.as_fd(), &mut self.to_client) {
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

    /// Reads what the client sent; returns whether anything moved.
    fn read_client(&mut self) -> bool {
        let mut progress = false;
        while self.client_readable && !self.client_eof && !self.dead && self.from_client.len() < CAP
        {
            let at = self.from_client.len();
            let mut fds = Vec::new();
            match read_chunk(self.client.as_fd(), &mut self.from_client, Some(&mut fds)) {
                Got::Data { more } => self.client_readable = more || self.client_drain,
                Got::Blocked => {
                    self.client_readable = false;
                    self.client_drain = false;
                    break;
                }
                Got::End => self.client_eof = true,
            }
            if !fds.is_empty() && self.from_client.len() > at {
                self.fds_in.push_back(Batch { at, fds });
            }
            progress = true;
        }
        progress
    }

    /// Takes note of a readiness event for one of this client's sockets, by its token:
    /// `readable` when it has input, `closed` when its peer closed (or it failed).
    pub(super) fn ready(&mut self, token: Token, readable: bool, closed: bool) {
        if !readable && !closed {
            return;
        }
        if token == self.token {
            self.client_readable = true;
            self.client_drain |= closed;
        }
        for b in [&mut self.back, &mut self.next].into_iter().flatten() {
            if b.token == token {
                b.readable = true;
                b.drain |= closed;
            }
        }
    }

    /// Every QEMU connection may have input, its end of input too: it was waited on with
    /// poll(2), outside the loop's events.
    pub(super) fn assume_readable(&mut self) {
        for b in [&mut self.back, &mut self.next].into_iter().flatten() {
            b.readable = true;
            b.drain = true;
        }
    }

    /// Registers interest in writability exactly for the sockets whose output waits (and
    /// drops it again once it went), so that the usual round trip makes no `epoll_ctl`.
    pub(super) fn watch_writes(&mut self, registry: &Registry) -> io::Result<()> {
        let interest = |out: bool| match out {
            true => Interest::READABLE | Interest::WRITABLE,
            false => Interest::READABLE,
        };
        let want = !self.to_client.is_empty();
        if want != self.client_watch_out {
            registry.reregister(&mut self.client, self.token, interest(want))?;
            self.client_watch_out = want;
        }
        for b in [&mut self.back, &mut self.next].into_iter().flatten() {
            let want = !b.to_qemu.is_empty();
            if want != b.watch_out {
                registry.reregister(&mut b.stream, b.token, interest(want))?;
                b.watch_out = want;
            }
        }
        Ok(())
    }

    /// Moves complete units of client input to QEMU, with the fds that came with them,
    /// keeping track of those it will answer.
    fn forward(&mut self) -> bool {
        let Some(b) = &mut self.back else {
            return false;
        };
        let raw = matches!(self.inbound, Inbound::Raw);
        let mut at = 0;
        while b.to_qemu.len() < CAP && at < self.from_client.len() {
            let mut rest = self.from_client.get(at..).unwrap_or_default();
            if raw {
                // Bytes with no units: fds go exactly where they came.
                if let Some(next) = self.fds_in.iter().map(|f| f.at).find(|&f| f > at) {
                    rest = rest.get(..next - at).unwrap_or_default();
                }
            }
            let unit = match self.inbound.next(rest) {
                Some(unit) => unit,
                // Half a unit waits for the rest, unless the rest can never come: the client
                // ended its input, or the unit outgrew the buffer (QEMU refuses those anyway).
                None if self.client_eof || self.from_client.len() >= CAP => {
                    self.inbound.consumed();
                    Unit {
                        len: rest.len(),
                        answered: false,
                        request: Request::default(),
                    }
                }
                None => break,
            };
            let end = at + unit.len;
            // A second batch in the same unit belongs to a later one (see the module doc).
            if let Some(batch) = self.fds_in.pop_front_if(|f| f.at < end) {
                b.attach(batch.fds);
            }
            let bytes = rest.get(..unit.len).unwrap_or_default();
            b.to_qemu.extend_from_slice(bytes);
            if unit.answered {
                let request = unit.request;
                if request.command.as_ref().is_some_and(|c| c.is_migrate()) {
                    super::framing::hide_migration_state(false);
                }
                let takes_fd = request.command.as_ref().is_some_and(|c| c.takes_fd());
                b.pending.push_back(Pending {
                    caps: request.caps.then(|| bytes.to_vec()),
                    fd: if takes_fd { b.qemu_fd.take() } else { None },
                    request,
                });
            }
            at = end;
        }
        self.from_client.drain(..at);
        for f in &mut self.fds_in {
            f.at = f.at.saturating_sub(at);
        }
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
            !b.eof
                && (b.out.greeting != Greeting::Done || b.pending.iter().any(|p| p.caps.is_some()))
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
    pub(super) fn switch(
        &mut self,
        resumed_by_swap: bool,
        journal: &mut Journal,
    ) -> Option<Backend> {
        let mut old = self.back.take();
        if let Some(o) = &mut old {
            // All of it, even what came after the last event this loop has handled.
            o.readable = true;
            o.drain = true;
            let (_, seen) = o.pull(Some(&mut self.to_client), false);
            o.settle(seen, &mut self.caps, self.monitor, journal);
        }
        match self.next.take() {
            Some(mut new) => {
                if new.out.mode() == Mode::Raw && !new.held.is_empty() {
                    new.first_out = Some(Instant::now());
                }
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

mod handover;
