//! The monitor proxy: client connections to QEMU's monitors and chardevs that outlive QEMU.
//!
//! libvirt holds one QMP connection for a domain's whole life and declares the domain crashed
//! on monitor EOF without a SHUTDOWN event; a serial console user holds theirs. So the launcher
//! owns the sockets clients connect to and the connections it accepted, and relays bytes to
//! the current QEMU generation. Each generation gets, per proxied monitor, a listening socket
//! of its own (`-chardev socket,fd=N,server=on,wait=off`, which QEMU accepts as libvirt passes
//! it), and the proxy connects there once per client.
//!
//! A QEMU socket chardev serves one connection at a time and leaves the next in its backlog
//! until the current one closes. The proxy does the same: one client per monitor is served,
//! the others are accepted and wait, unread, until it leaves.
//!
//! A swap moves every served client to the new generation without the client noticing:
//! [`Proxy::hold`] stops forwarding client input at a command boundary, the old generation
//! answers what it already has ([`Proxy::drained`]), [`Proxy::prepare`] opens each client's
//! connection to the new generation and replays its capability negotiation, and
//! [`Proxy::commit`] switches over. Events the swap itself causes are hidden.
//!
//! Fds clients pass with SCM_RIGHTS (`getfd`, `add-fd`) go to QEMU with the command they came
//! with. Every hot-plug command QEMU answers with success is recorded in the [`Journal`], with
//! copies of those fds, for the next generation to be given before the guest moves into it.
//!
//! Everything runs from the supervisor's single `mio::Poll`. Only [`Proxy::flush`] blocks,
//! with a deadline, to relay an exited QEMU's last words before the launcher exits.

mod conn;
mod envelope;
mod framing;
mod handoff;
pub(crate) mod handover;
mod sockets;
mod stream;
mod swap;
#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "fuzzing"))]
pub use framing::check_split_invariance;
pub use framing::hide_migration_state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::journal::Journal;
use conn::{Backend, Conn};
use framing::{Filter, Greeting};
use sockets::{BackendDir, BoundPath};
use stream::Listener;

pub use handoff::Handoff;

/// What a proxied chardev carries, which decides how the proxy frames it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A QMP monitor (`-mon mode=control`, `-qmp`): JSON both ways.
    Qmp,
    /// A human monitor (`-mon mode=readline`, `-monitor`): lines in, text and prompts out.
    Hmp,
    /// Any other chardev (serial, console, channel): bytes only.
    Raw,
}

/// Where clients connect.
#[derive(Debug)]
pub enum Listen {
    /// A unix socket path the launcher binds. A stale socket there is unlinked first, and the
    /// path is unlinked when the proxy is dropped, as QEMU does for `server=on`.
    Path(PathBuf),
    /// An inherited listening unix socket, as libvirt passes with `fd=N,server=on`.
    Fd(OwnedFd),
    /// A listening TCP socket the launcher bound (non-blocking).
    Tcp(std::net::TcpListener),
}

/// A failure to prepare a swap; the supervisor then aborts the upgrade.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// [`Proxy::backends_for`] was not called for the generation.
    #[error("no backend sockets for generation {gen}")]
    NoBackends {
        /// The generation.
        gen: u32,
    },
    /// Connecting to the new generation's backend failed.
    #[error("monitor {index}: cannot connect to generation {gen}")]
    Connect {
        /// The monitor, in `add` order.
        index: usize,
        /// The new generation.
        gen: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The new generation's greeting, or its answer to the replayed `qmp_capabilities`, did
    /// not come.
    #[error("monitor {index}: no greeting from generation {gen}")]
    Greeting {
        /// The monitor, in `add` order.
        index: usize,
        /// The new generation.
        gen: u32,
        /// A timeout, EOF, or I/O error.
        #[source]
        source: io::Error,
    },
    /// The new generation refused the capabilities the old one accepted.
    #[error("monitor {index}: generation {gen} refused qmp_capabilities: {desc}")]
    Capabilities {
        /// The monitor, in `add` order.
        index: usize,
        /// The new generation.
        gen: u32,
        /// QEMU's error description.
        desc: String,
    },
    /// Registering a new connection with the event loop failed.
    #[error("cannot register a monitor connection")]
    Register(#[source] io::Error),
}

#[derive(Debug)]
struct Monitor {
    mode: Mode,
    listener: Listener,
    _path: Option<BoundPath>,
    /// The client being served.
    active: Option<u64>,
    /// Accepted clients waiting their turn, oldest first.
    waiting: VecDeque<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Route {
    Listener(usize),
    Conn(u64),
    /// A display's listener, by display and socket.
    Handoff(usize, usize),
}

/// All proxied monitors and chardevs of one VM, and their clients.
#[derive(Debug)]
pub struct Proxy {
    token_base: usize,
    next_token: usize,
    routes: HashMap<usize, Route>,
    monitors: Vec<Monitor>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// Backend socket paths by generation, one per monitor in `add` order.
    backends: BTreeMap<u32, Vec<PathBuf>>,
    /// Display socket paths by generation (QEMU binds them).
    displays: BTreeMap<u32, Vec<PathBuf>>,
    dir: BackendDir,
    live: Option<u32>,
    /// A swap is under way (from `hold` to `commit` or `abort`).
    swapping: bool,
    swap_running: bool,
    /// The generation [`Proxy::prepare`] moves clients to, and its backend sockets.
    preparing: Option<(u32, Vec<PathBuf>)>,
    journal: Journal,
    /// Display listeners whose connections QEMU takes over itself.
    handoff: Handoff,
}

impl Proxy {
    /// A proxy with no monitors. It uses tokens `token_base` and up, one per socket, never
    /// reused; the supervisor routes every token at or above `token_base` to [`Proxy::handle`].
    /// Backend sockets go in a private directory under `$XDG_RUNTIME_DIR`, or the temporary
    /// directory, unless [`Proxy::set_backend_dir`] says otherwise.
    pub fn new(token_base: usize) -> Proxy {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_absolute() && d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        Proxy {
            token_base,
            next_token: token_base,
            routes: HashMap::new(),
            monitors: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            backends: BTreeMap::new(),
            displays: BTreeMap::new(),
            dir: BackendDir::new(base),
            live: None,
            swapping: false,
            swap_running: false,
            preparing: None,
            journal: Journal::default(),
            handoff: Handoff::default(),
        }
    }

    /// Puts the private directory of backend sockets under `base` instead. Call before the
    /// first [`Proxy::backends_for`]; socket paths must stay under 108 bytes.
    pub fn set_backend_dir(&mut self, base: &Path) {
        self.dir = BackendDir::new(base.to_owned());
    }

    /// Starts listening for clients of one monitor or chardev and returns its index. Add every
    /// monitor before the first [`Proxy::backends_for`].
    pub fn add(&mut self, registry: &Registry, listen: Listen, mode: Mode) -> io::Result<usize> {
        let (mut listener, path) = listener(listen)?;
        let index = self.monitors.len();
        let token = self.token(Route::Listener(index));
        registry.register(&mut listener, token, Interest::READABLE)?;
        self.monitors.push(Monitor {
            mode,
            listener,
            _path: path,
            active: None,
            waiting: VecDeque::new(),
        });
        Ok(index)
    }

    /// How many monitors and chardevs are proxied.
    pub fn len(&self) -> usize {
        self.monitors.len()
    }

    /// Whether nothing is proxied.
    pub fn is_empty(&self) -> bool {
        self.monitors.is_empty()
    }

    /// The generation clients are served by.
    pub fn live(&self) -> Option<u32> {
        self.live
    }

    /// Makes the listening backend sockets for generation `gen`, one per monitor in `add`
    /// order, and returns them for that QEMU as `-chardev socket,fd=N,server=on,wait=off`.
    /// They are close-on-exec; the supervisor places them for the child and then drops its
    /// copies, so that a dead QEMU refuses connections instead of leaving them queued.
    pub fn backends_for(&mut self, gen: u32) -> io::Result<Vec<OwnedFd>> {
        let mut paths = Vec::new();
        let mut fds = Vec::new();
        for index in 0..self.monitors.len() {
            match self.dir.listener(gen, index) {
                Ok((path, fd)) => {
                    paths.push(path);
                    fds.push(fd);
                }
                Err(e) => {
                    unlink_all(&paths);
                    return Err(e);
                }
            }
        }
        if let Some(old) = self.backends.insert(gen, paths) {
            unlink_all(&old);
        }
        if let Some(old) = self.displays.remove(&gen) {
            unlink_all(&old);
        }
        Ok(fds)
    }

    /// Unlinks generation `gen`'s backend sockets unless it is live: it ended without clients
    /// being switched to it (it failed to start, or only a check started it). Connections a
    /// swap already prepared to it stay until [`Proxy::abort`].
    pub fn discard(&mut self, gen: u32) {
        if self.live == Some(gen) {
            return;
        }
        if let Some(paths) = self.backends.remove(&gen) {
            unlink_all(&paths);
        }
    }

    /// Makes `gen` the live generation at start: clients accepted so far and from now on are
    /// connected to it.
    pub fn activate_first(&mut self, registry: &Registry, gen: u32) -> io::Result<()> {
        if !self.backends.contains_key(&gen) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no backend sockets for generation {gen}"),
            ));
        }
        self.live = Some(gen);
        for m in 0..self.monitors.len() {
            self.promote(registry, m);
        }
        Ok(())
    }

    /// What clients hot-plugged into the VM and did not undo, from every QMP and HMP monitor
    /// proxied: replay these into a new generation, in order, before `migrate-incoming`.
    /// Commands held during a swap run on the new generation after commit, and are journaled
    /// as they succeed there.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Takes note of an event read elsewhere, such as on the launcher's own monitor, for the
    /// journal: a DEVICE_DELETED completes a `device_del` even when no client's monitor
    /// was connected to see it. An event seen twice counts once.
    pub fn note_event(&mut self, event: &serde_json::Value) {
        self.journal.event(event);
    }

    /// When the connections serving clients now first relayed something: a byte of a
    /// chardev (console), and an answer on a monitor. After a swap's commit, what the new
    /// generation relayed; `None` while nothing was.
    pub fn first_relayed(&self) -> (Option<Instant>, Option<Instant>) {
        let (mut console, mut monitor) = (None::<Instant>, None::<Instant>);
        for conn in self.conns.values() {
            let Some(at) = conn.back.as_ref().and_then(|b| b.first_out) else {
                continue;
            };
            let slot = match self.monitors.get(conn.monitor).map(|m| m.mode) {
                Some(Mode::Raw) => &mut console,
                _ => &mut monitor,
            };
            *slot = Some(slot.map_or(at, |s| s.min(at)));
        }
        (console, monitor)
    }

    /// Whether `token` is one of the proxy's.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base
    }

    /// Handles one readiness event for one of the proxy's tokens.
    pub fn handle(&mut self, registry: &Registry, event: &mio::event::Event) {
        match self.routes.get(&event.token().0).copied() {
            Some(Route::Listener(m)) => self.accept(registry, m),
            Some(Route::Conn(id)) => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    let closed = event.is_read_closed() || event.is_error();
                    conn.ready(event.token(), event.is_readable(), closed);
                }
                self.service(registry, id)
            }
            Some(Route::Handoff(d, l)) => self.handoff.accept(d, l),
            // A socket closed earlier in the same batch of events.
            None => {}
        }
    }

    /// Relays what QEMU said before it exited to the clients, until `deadline` at most. Call
    /// when the last generation is gone, before the launcher exits: libvirt must read the
    /// SHUTDOWN event before the monitor's EOF, or it declares the domain crashed. Client
    /// input is no longer read.
    pub fn flush(&mut self, deadline: Instant) {
        loop {
            for conn in self.conns.values_mut() {
                conn.assume_readable();
                conn.pump(true, &mut self.journal);
            }
            let mut fds = Vec::new();
            for (read, write) in self.conns.values().filter_map(Conn::unflushed) {
                fds.extend(read.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
                fds.extend(write.map(|fd| PollFd::new(fd, PollFlags::POLLOUT)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if fds.is_empty() || left.is_zero() {
                return;
            }
            let left = left
                .max(Duration::from_millis(1))
                .min(Duration::from_secs(1));
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            if let Err(e) = nix::poll::poll(&mut fds, timeout) {
                if e != nix::errno::Errno::EINTR {
                    return;
                }
            }
        }
    }

    fn token(&mut self, route: Route) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        self.routes.insert(t, route);
        Token(t)
    }

    fn accept(&mut self, registry: &Registry, m: usize) {
        loop {
            let Some(monitor) = self.monitors.get(m) else {
                return;
            };
            let mode = monitor.mode;
            match monitor.listener.accept() {
                Ok(mut stream) => {
                    let id = self.next_conn;
                    self.next_conn += 1;
                    let token = self.token(Route::Conn(id));
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_err()
                    {
                        self.routes.remove(&token.0);
                        continue;
                    }
                    self.conns.insert(id, Conn::new(m, mode, stream, token));
                    if let Some(monitor) = self.monitors.get_mut(m) {
                        monitor.waiting.push_back(id);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                // Out of fds or memory: the rest stay in the backlog until the next client
                // arrives, as they would with QEMU itself.
                Err(_) => break,
            }
        }
        self.promote(registry, m);
    }

    fn service(&mut self, registry: &Registry, id: u64) {
        let Some(m) = self.conns.get(&id).map(|c| c.monitor) else {
            return;
        };
        if self.settle(registry, id) {
            self.promote(registry, m);
        }
    }

    /// Moves what can move for one client; closes it when it is finished. Returns whether it
    /// was removed.
    fn settle(&mut self, registry: &Registry, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        if conn.back.is_none() && !conn.closing {
            // Waiting its turn: left unread, as in QEMU's backlog.
            return false;
        }
        conn.pump(self.swapping, &mut self.journal);
        // QEMU closed the connection, so it exited: close the client too, once it has all
        // QEMU said. During a swap the old generation's end is expected.
        if !self.swapping && conn.back.as_ref().is_some_and(|b| b.eof) {
            conn.closing = true;
        }
        if !conn.done() {
            // A socket that cannot be watched for room would stall its output for good.
            if conn.watch_writes(registry).is_err() {
                conn.dead = true;
            } else {
                return false;
            }
        }
        self.remove(registry, id);
        true
    }

    /// Serves the next waiting client of monitor `m` if none is served.
    fn promote(&mut self, registry: &Registry, m: usize) {
        loop {
            let Some(gen) = self.live.filter(|_| !self.swapping) else {
                return;
            };
            let Some(monitor) = self.monitors.get_mut(m) else {
                return;
            };
            if monitor.active.is_some() {
                return;
            }
            let mode = monitor.mode;
            let Some(id) = monitor.waiting.pop_front() else {
                return;
            };
            let token = self.token(Route::Conn(id));
            let path = self.backends.get(&gen).and_then(|p| p.get(m));
            let backend = match path {
                Some(p) => Backend::connect(p, mode, Greeting::Pass, Filter::Live, token),
                None => Err(io::ErrorKind::NotFound.into()),
            };
            match backend.and_then(|mut b| {
                registry
                    .register(&mut b.stream, token, Interest::READABLE)
                    .map(|()| b)
            }) {
                Ok(b) => {
                    let Some(conn) = self.conns.get_mut(&id) else {
                        self.drop_backend(registry, b);
                        continue;
                    };
                    conn.back = Some(b);
                    if let Some(monitor) = self.monitors.get_mut(m) {
                        monitor.active = Some(id);
                    }
                    if !self.settle(registry, id) {
                        return;
                    }
                }
                // The generation is gone: its socket refuses connections. QEMU's exit would
                // have closed the clients in its backlog.
                Err(_) => {
                    self.routes.remove(&token.0);
                    self.remove(registry, id);
                }
            }
        }
    }

    fn remove(&mut self, registry: &Registry, id: u64) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        let _ = registry.deregister(&mut conn.client);
        self.routes.remove(&conn.token.0);
        for b in [conn.back.take(), conn.next.take()].into_iter().flatten() {
            self.drop_backend(registry, b);
        }
        if let Some(mon) = self.monitors.get_mut(conn.monitor) {
            if mon.active == Some(id) {
                mon.active = None;
            }
            mon.waiting.retain(|&w| w != id);
        }
    }

    fn drop_backend(&mut self, registry: &Registry, mut b: Backend) {
        let _ = registry.deregister(&mut b.stream);
        self.routes.remove(&b.token.0);
    }
}

/// A non-blocking listener for `listen`, and the path it bound, if it bound one.
fn listener(listen: Listen) -> io::Result<(Listener, Option<BoundPath>)> {
    Ok(match listen {
        Listen::Path(p) => {
            let (l, bound) = BoundPath::bind(&p)?;
            l.set_nonblocking(true)?;
            (
                Listener::Unix(mio::net::UnixListener::from_std(l)),
                Some(bound),
            )
        }
        Listen::Fd(fd) => {
            let l = sockets::inherited(fd)?;
            l.set_nonblocking(true)?;
            (Listener::Unix(mio::net::UnixListener::from_std(l)), None)
        }
        Listen::Tcp(l) => {
            l.set_nonblocking(true)?;
            (Listener::Tcp(mio::net::TcpListener::from_std(l)), None)
        }
    })
}

fn unlink_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}
