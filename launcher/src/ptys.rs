//! Ptys the launcher holds for the VM's life: `-serial pty`, `-parallel pty`, `-chardev pty`.
//!
//! QEMU's pty chardev opens a new pty pair when it starts (`chardev/char-pty.c`), and its user
//! learns the slave's name from QEMU's stdout (`char device redirected to /dev/pts/N (label
//! X)`) or, as libvirt does, from `query-chardev` (`"filename": "pty:/dev/pts/N"`). A new
//! generation would open another pty and leave that user holding a dead one. So the launcher
//! opens each pty once, as QEMU does (slave put in raw mode, then closed), prints QEMU's line,
//! and relays between the master and the generation running the guest, which gets a connected
//! socket in the pty's place (`-chardev socket,id=X,fd=N`).
//!
//! Why not hand every generation the master itself: a 16550 takes input whether or not its
//! guest runs (`serial_can_receive` looks only at the FIFO). Measured with 7.2 and 10.0, a
//! QEMU waiting under `-incoming defer` reads a byte from the master into a UART whose state
//! the migration then overwrites, and a QEMU whose guest has moved away may read more into a
//! device nobody sees again. Through the relay, input goes only to the generation running the
//! guest: once an upgrade starts a new generation, input waits in the launcher, and what the
//! old QEMU had not read yet is taken back out of its socket (the launcher keeps a copy of
//! QEMU's end); all of it goes to the new generation at commit, or back to the old one if the
//! upgrade fails. Output of the new generation goes out only after all of the old one's.
//!
//! Like QEMU's pty, the relay drops output while nobody has the slave open
//! (`char_pty_chr_write` checks for POLLHUP), so a console nobody reads never stalls the
//! guest, and a reader that is connected but slow stalls QEMU's output.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use serde_json::Value;

use crate::cmdline::{CmdLine, Item};

/// How much the relay keeps for a side that does not read, before it stops reading the other.
const CAP: usize = 1 << 20;

/// A failure to open a pty, in QEMU's words (`chardev/char-pty.c`).
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// `posix_openpt`, `grantpt`, `unlockpt`, `ptsname` or the slave's termios failed.
    #[error("Failed to create PTY (label {label})")]
    Open {
        /// The chardev's label.
        label: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The `path=` symlink QEMU 9.0+ makes to the pty could not be made.
    #[error("Failed to create PTY symlink {}", path.display())]
    Link {
        /// The symlink.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a kept pty appears on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `-chardev pty,id=X,...`: rewritten in place.
    Chardev,
    /// `-serial pty` or `-parallel pty`: becomes `chardev:LABEL`, the chardev added at the end.
    Legacy,
}

/// One pty chardev the launcher keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPty {
    item: usize,
    kind: Kind,
    /// The chardev's label, as QEMU names it (`serial0`, `parallel0`, or the `-chardev` id);
    /// every generation's chardev has this id.
    pub label: String,
    /// `path=`: QEMU 9.0+ makes a symlink there to the pty (7.2 ignores it).
    pub link: Option<PathBuf>,
}

/// Finds the ptys the launcher keeps, in the order QEMU creates them: `-chardev` first, then
/// `-serial`, then `-parallel`. Left to QEMU, with a new pty per generation: a pty shared with
/// a monitor (`-monitor pty`, `-serial mon:pty`, `mux=on`, a `-mon` on it), whose greeting and
/// prompt every generation would print again.
pub fn find(cmd: &CmdLine) -> Vec<KeptPty> {
    let monitored: Vec<String> = cmd
        .opts("mon")
        .filter_map(|o| o.parse_arg()?.get("chardev"))
        .collect();
    let mut chardevs = Vec::new();
    let mut legacy = Vec::new();
    let (mut serials, mut parallels) = (0, 0);
    for (item, it) in cmd.items.iter().enumerate() {
        let Item::Opt(opt) = it else { continue };
        match opt.name.as_str() {
            "chardev" => {
                // QEMU 7.2 and 10.0 take no JSON `-chardev`; it is left for QEMU to refuse.
                let Some(arg) = opt.parse_arg().filter(|a| !a.is_json()) else {
                    continue;
                };
                let Some(id) = arg.get("id") else { continue };
                if arg.get("backend").as_deref() != Some("pty")
                    || arg.get_bool("mux") == Some(true)
                    || monitored.contains(&id)
                {
                    continue;
                }
                chardevs.push(KeptPty {
                    item,
                    kind: Kind::Chardev,
                    label: id,
                    link: arg.get("path").map(PathBuf::from),
                });
            }
            // QEMU numbers every `-serial`, `none` included, but skips `-parallel none`
            // (seen with 7.2 and 10.0).
            "serial" | "parallel" => {
                let serial = opt.name == "serial";
                let index = if serial { &mut serials } else { &mut parallels };
                let dev = opt.arg_str().unwrap_or_default();
                if !serial && dev == "none" {
                    continue;
                }
                let label = format!("{}{index}", opt.name);
                *index += 1;
                if dev == "pty" {
                    legacy.push((serial, item, label));
                }
            }
            _ => {}
        }
    }
    legacy.sort_by_key(|(serial, ..)| !serial);
    chardevs.extend(legacy.into_iter().map(|(_, item, label)| KeptPty {
        item,
        kind: Kind::Legacy,
        label,
        link: None,
    }));
    chardevs
}

/// Gives each kept pty's chardev the socket placed at `numbers[i]` instead: the chardev keeps
/// its id and common options (`logfile=`, `logappend=`), loses `path=` (the launcher made the
/// symlink), and QEMU connects to nothing.
pub fn rewrite(cmd: &CmdLine, ptys: &[KeptPty], numbers: &[RawFd]) -> CmdLine {
    let mut out = cmd.clone();
    let mut added = Vec::new();
    for (pty, fd) in ptys.iter().zip(numbers) {
        let Some(Item::Opt(opt)) = out.items.get_mut(pty.item) else {
            continue;
        };
        match pty.kind {
            Kind::Chardev => {
                let Some(mut arg) = opt.parse_arg() else {
                    continue;
                };
                arg.set("backend", "socket");
                arg.remove("path");
                arg.set("fd", &fd.to_string());
                opt.set_arg(&arg);
            }
            Kind::Legacy => {
                opt.arg = Some(format!("chardev:{}", pty.label).into());
                added.push(format!("socket,id={},fd={fd}", pty.label));
            }
        }
    }
    for chardev in added {
        out.push("chardev", Some(&chardev));
    }
    out
}

/// A pty the launcher opened: the master, held for the VM's life, and the slave's name.
#[derive(Debug)]
pub struct OpenPty {
    master: OwnedFd,
    /// The slave, `/dev/pts/N`: what the console's user opens.
    pub path: PathBuf,
    /// The chardev's label.
    pub label: String,
    /// The `path=` symlink made, removed when the pty goes.
    link: Option<PathBuf>,
}

/// Opens a pty for `pty` as QEMU's `char_pty_open` does: a new pair, the slave in raw mode
/// (`cfmakeraw`) and closed again, so that the master reports POLLHUP until someone opens it.
pub fn open(pty: &KeptPty) -> Result<OpenPty, PtyError> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let fail = |source| PtyError::Open {
        label: pty.label.clone(),
        source,
    };
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::pty::posix_openpt(flags).map_err(fail)?;
    nix::pty::grantpt(&master).map_err(fail)?;
    nix::pty::unlockpt(&master).map_err(fail)?;
    let path = PathBuf::from(nix::pty::ptsname_r(&master).map_err(fail)?);
    let slave = nix::fcntl::open(&path, flags, nix::sys::stat::Mode::empty()).map_err(fail)?;
    // SAFETY: open(2) just returned this fd and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let mut termios = tcgetattr(&slave).map_err(fail)?;
    cfmakeraw(&mut termios);
    tcsetattr(&slave, SetArg::TCSAFLUSH, &termios).map_err(fail)?;
    drop(slave);
    // SAFETY: into_raw_fd hands over the open master fd; nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    set_nonblocking(master.as_fd()).map_err(fail)?;
    let link = match &pty.link {
        Some(link) => {
            std::os::unix::fs::symlink(&path, link).map_err(|source| PtyError::Link {
                path: link.clone(),
                source,
            })?;
            Some(link.clone())
        }
        None => None,
    };
    Ok(OpenPty {
        master,
        path,
        label: pty.label.clone(),
        link,
    })
}

impl OpenPty {
    /// The line QEMU prints on stdout for a pty it opened (7.2 and 10.0 alike).
    pub fn announcement(&self) -> String {
        format!(
            "char device redirected to {} (label {})",
            self.path.display(),
            self.label
        )
    }

    /// What `query-chardev` says of the pty: `pty:/dev/pts/N`.
    pub fn filename(&self) -> String {
        format!("pty:{}", self.path.display())
    }
}

impl Drop for OpenPty {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }
}

/// `(label, filename)` of each kept pty, as `query-chardev` must report it.
static FILENAMES: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Makes the monitor proxy report each pty as `pty:/dev/pts/N` in `query-chardev` replies,
/// where QEMU reports the socket it was given. Set once: a launcher runs one VM, and its ptys
/// are fixed before the first generation starts. A process-wide table, because the proxy
/// frames QEMU's output per connection, deep below anything that knows about ptys.
pub fn publish(ptys: &[OpenPty]) {
    publish_filenames(
        ptys.iter()
            .map(|p| (p.label.clone(), p.filename()))
            .collect(),
    );
}

pub(crate) fn publish_filenames(names: Vec<(String, String)>) {
    let _ = FILENAMES.set(names);
}

/// Whether [`chardev_info_reply`] can change anything: ptys are kept.
pub fn rewrites_replies() -> bool {
    FILENAMES.get().is_some_and(|names| !names.is_empty())
}

/// The `return` of a `query-chardev` reply with each kept pty's `filename` put back to the
/// pty; `None` when there is nothing to change. A `query-chardev` reply is recognized by its
/// shape, a list of `ChardevInfo` (exactly `label`, `filename`, `frontend-open`), which no
/// other command returns.
pub fn chardev_info_reply(ret: &Value) -> Option<Value> {
    rewrite_chardev_info(ret, FILENAMES.get()?)
}

fn rewrite_chardev_info(ret: &Value, names: &[(String, String)]) -> Option<Value> {
    let list = ret.as_array()?;
    let is_info = |v: &Value| {
        v.as_object().is_some_and(|o| {
            o.len() == 3
                && o.get("label").is_some_and(Value::is_string)
                && o.get("filename").is_some_and(Value::is_string)
                && o.get("frontend-open").is_some_and(Value::is_boolean)
        })
    };
    if names.is_empty() || list.is_empty() || !list.iter().all(is_info) {
        return None;
    }
    let mut out = ret.clone();
    let mut changed = false;
    for info in out.as_array_mut()? {
        let label = info["label"].as_str().unwrap_or_default();
        if let Some((_, filename)) = names.iter().find(|(l, _)| l == label) {
            if info["filename"] != *filename {
                info["filename"] = Value::String(filename.clone());
                changed = true;
            }
        }
    }
    changed.then_some(out)
}

/// One generation's socket for one pty.
#[derive(Debug)]
struct End {
    gen: u32,
    /// The launcher's end.
    ours: OwnedFd,
    /// A copy of QEMU's end, to take back input QEMU has not read.
    theirs: OwnedFd,
    /// QEMU shut it down: nothing more goes either way.
    closed: bool,
}

#[derive(Debug)]
struct Kept {
    pty: OpenPty,
    token: Token,
    /// Read from the master, for the guest.
    to_guest: Vec<u8>,
    /// Written by the guest, for the master.
    to_pty: Vec<u8>,
    /// The live generation's socket, and during an upgrade the incoming one's.
    ends: Vec<End>,
}

/// Every kept pty, relayed to the generation running the guest. Everything runs from the
/// supervisor's loop: each master and generation socket is registered under its pty's token,
/// and any event for it moves what can move ([`PtyRelay::handle`]).
#[derive(Debug)]
pub struct PtyRelay {
    ptys: Vec<Kept>,
    /// The generation that gets input and whose output is forwarded.
    live: Option<u32>,
    /// An upgrade has started a new generation: input waits here.
    held: bool,
    /// When output of the generation last committed was first read, for the upgrade's
    /// report; `None` until it said something.
    first_output: Option<Instant>,
}

impl PtyRelay {
    /// Relays `ptys`, pty `i` under `token(i)`.
    pub fn new(
        registry: &Registry,
        ptys: Vec<OpenPty>,
        token: impl Fn(usize) -> Token,
    ) -> io::Result<PtyRelay> {
        let mut kept = Vec::new();
        for (i, pty) in ptys.into_iter().enumerate() {
            let token = token(i);
            register(registry, pty.master.as_fd(), token)?;
            kept.push(Kept {
                pty,
                token,
                to_guest: Vec::new(),
                to_pty: Vec::new(),
                ends: Vec::new(),
            });
        }
        Ok(PtyRelay {
            ptys: kept,
            live: None,
            held: false,
            first_output: None,
        })
    }

    /// Makes generation `gen`'s sockets, one per pty in order, and returns QEMU's ends to be
    /// placed at the layout's numbers (close-on-exec; drop them once the child has them). The
    /// first generation is live at once. A later one is an upgrade's: from now on input waits
    /// here, and what the live QEMU has not read is taken back from its socket, until
    /// [`PtyRelay::commit`] or [`PtyRelay::abort`].
    pub fn ends_for(&mut self, registry: &Registry, gen: u32) -> io::Result<Vec<OwnedFd>> {
        let first = self.live.is_none();
        if !first {
            self.held = true;
        }
        let mut theirs = Vec::new();
        for k in &mut self.ptys {
            if !first {
                k.take_back(self.live);
            }
            let (ours, qemu) = socket::socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )?;
            set_nonblocking(ours.as_fd())?;
            register(registry, ours.as_fd(), k.token)?;
            k.ends.push(End {
                gen,
                ours,
                theirs: qemu.try_clone()?,
                closed: false,
            });
            theirs.push(qemu);
        }
        if first {
            self.live = Some(gen);
        }
        Ok(theirs)
    }

    /// Generation `gen` runs the guest now: the old one's last output goes out, then input
    /// held meanwhile goes to `gen`, and its output follows.
    pub fn commit(&mut self, registry: &Registry, gen: u32) {
        for k in &mut self.ptys {
            if let Some(old) = k.ends.iter_mut().find(|e| Some(e.gen) == self.live) {
                // All of it, whatever the cap: nothing of the new generation may overtake it.
                recv_into(old, &mut k.to_pty, usize::MAX);
            }
            k.drop_ends(registry, |e| e != gen);
        }
        self.live = Some(gen);
        self.held = false;
        self.first_output = None;
        self.pump_all();
    }

    /// When the generation last committed first had output relayed, if it has yet.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output
    }

    /// The upgrade failed: the new generation's sockets go, and input, what was taken back
    /// first, goes to the live generation again. Nothing to do if no upgrade was under way.
    pub fn abort(&mut self, registry: &Registry) {
        let live = self.live;
        for k in &mut self.ptys {
            k.drop_ends(registry, |e| Some(e) != live);
        }
        self.held = false;
        self.pump_all();
    }

    /// Moves what can move for pty `index` after an event under its token.
    pub fn handle(&mut self, index: usize) {
        if let Some(k) = self.ptys.get_mut(index) {
            if k.pump(self.live, self.held) && self.first_output.is_none() {
                self.first_output = Some(Instant::now());
            }
        }
    }

    /// Relays what the last generation wrote before it exited, until `deadline` at most.
    pub fn flush(&mut self, deadline: Instant) {
        for k in &mut self.ptys {
            loop {
                k.pump(self.live, true);
                let left = deadline.saturating_duration_since(Instant::now());
                if k.to_pty.is_empty() || left.is_zero() {
                    break;
                }
                let left = left.min(Duration::from_millis(100));
                let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(k.pty.master.as_fd(), PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, timeout);
            }
        }
    }

    fn pump_all(&mut self) {
        for k in &mut self.ptys {
            if k.pump(self.live, self.held) && self.first_output.is_none() {
                self.first_output = Some(Instant::now());
            }
        }
    }
}

impl Kept {
    /// Moves bytes every way they may go. Sockets and the master are registered
    /// edge-triggered, so each side is read until it would block or its buffer is full; a side
    /// left unread for a full buffer is read again once the buffer drains. Returns whether the
    /// live generation had output.
    fn pump(&mut self, live: Option<u32>, held: bool) -> bool {
        let mut output = false;
        loop {
            let reader = self.read_in();
            if let Some(end) = self.ends.iter_mut().find(|e| Some(e.gen) == live) {
                output |= recv_into(end, &mut self.to_pty, CAP) > 0;
            }
            let full = (self.to_pty.len() >= CAP, self.to_guest.len() >= CAP);
            if let Some(end) = self.ends.iter_mut().find(|e| Some(e.gen) == live) {
                if !held {
                    send_from(end, &mut self.to_guest);
                }
            }
            self.write_out(reader);
            let drained =
                (full.0 && self.to_pty.len() < CAP) || (full.1 && self.to_guest.len() < CAP);
            if !drained {
                return output;
            }
        }
    }

    /// Writes output to the master; drops it while nobody has the slave open, as QEMU does.
    /// `reader`: whether someone has the slave open, if [`Kept::read_in`] found out.
    fn write_out(&mut self, reader: Option<bool>) {
        if self.to_pty.is_empty() {
            return;
        }
        if !reader.unwrap_or_else(|| !hung_up(self.pty.master.as_fd())) {
            self.to_pty.clear();
            return;
        }
        let mut at = 0;
        while at < self.to_pty.len() {
            match nix::unistd::write(&self.pty.master, self.to_pty.get(at..).unwrap_or_default()) {
                Ok(n) => at += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                // The reader went away meanwhile.
                Err(_) => at = self.to_pty.len(),
            }
        }
        self.to_pty.drain(..at);
    }

    /// Reads input from the master, and says whether someone has the slave open: a master
    /// read fails with EIO while nobody does (pty(7)), which spares a poll(2) per write.
    /// `None` when it did not read.
    fn read_in(&mut self) -> Option<bool> {
        let mut buf = [0u8; 16 << 10];
        let mut reader = None;
        while self.to_guest.len() < CAP {
            match nix::unistd::read(self.pty.master.as_raw_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_guest
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    reader = Some(true);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Some(true),
                Err(Errno::EIO) => return Some(false),
                Err(_) => break,
            }
        }
        reader
    }

    /// Takes back from the live generation's socket the input its QEMU has not read, ahead of
    /// what waits here: it was sent first.
    fn take_back(&mut self, live: Option<u32>) {
        let Some(end) = self.ends.iter().find(|e| Some(e.gen) == live) else {
            return;
        };
        let mut unread = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            match socket::recv(end.theirs.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => unread.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        unread.append(&mut self.to_guest);
        self.to_guest = unread;
    }

    fn drop_ends(&mut self, registry: &Registry, gone: impl Fn(u32) -> bool) {
        for end in self.ends.iter().filter(|e| gone(e.gen)) {
            let _ = registry.deregister(&mut SourceFd(&end.ours.as_raw_fd()));
        }
        self.ends.retain(|e| !gone(e.gen));
    }
}

/// Reads QEMU's output from `end` into `buf` while `buf` holds less than `cap`; returns how
/// many bytes came.
fn recv_into(end: &mut End, buf: &mut Vec<u8>, cap: usize) -> usize {
    let mut chunk = [0u8; 16 << 10];
    let mut got = 0;
    while !end.closed && buf.len() < cap {
        match socket::recv(end.ours.as_raw_fd(), &mut chunk, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => end.closed = true,
            Ok(n) => {
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                got += n;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(_) => end.closed = true,
        }
    }
    got
}

/// Sends input to QEMU through `end`, as much as its socket takes.
fn send_from(end: &mut End, buf: &mut Vec<u8>) {
    let mut at = 0;
    while !end.closed && at < buf.len() {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match socket::send(
            end.ours.as_raw_fd(),
            buf.get(at..).unwrap_or_default(),
            flags,
        ) {
            Ok(n) => at += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(_) => end.closed = true,
        }
    }
    buf.drain(..at);
}

/// Whether nobody has the pty's slave open.
fn hung_up(master: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(master, PollFlags::POLLOUT)];
    nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn register(registry: &Registry, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
    let interest = Interest::READABLE | Interest::WRITABLE;
    registry.register(&mut SourceFd(&fd.as_raw_fd()), token, interest)
}

mod handover;
#[cfg(test)]
mod tests;
