//! Display listeners: sockets whose connections the launcher accepts and QEMU then takes
//! over whole, with `getfd` and `add_client` (see [`crate::listeners::graphics`]). Nothing is
//! relayed: the proxy only accepts, and queues each connection for the supervisor to hand to
//! the generation running the guest.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use mio::{Interest, Registry};

use super::sockets::BoundPath;
use super::stream::Listener;
use super::{listener, Listen, Proxy, Route};
use crate::handover::fds::Take;
use crate::handover::state;
use crate::handover::ImportError;
use crate::listeners::graphics::Protocol;

/// Most accepted connections kept waiting for QEMU; the rest wait in the kernel's backlog,
/// as they would with QEMU busy.
const QUEUE: usize = 64;

#[derive(Debug)]
struct Display {
    protocol: &'static str,
    listeners: Vec<Listener>,
    _paths: Vec<BoundPath>,
}

/// The display listeners of one VM and the connections accepted on them.
#[derive(Debug, Default)]
pub struct Handoff {
    displays: Vec<Display>,
    accepted: VecDeque<(&'static str, OwnedFd)>,
}

impl Handoff {
    /// Accepts what listener `l` of display `d` has, up to the queue's bound.
    pub(super) fn accept(&mut self, d: usize, l: usize) {
        let Some(display) = self.displays.get(d) else {
            return;
        };
        let Some(listener) = display.listeners.get(l) else {
            return;
        };
        while self.accepted.len() < QUEUE {
            match listener.accept() {
                Ok(stream) => self
                    .accepted
                    .push_back((display.protocol, OwnedFd::from(stream))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                // WouldBlock, or out of fds: the rest wait in the backlog.
                Err(_) => break,
            }
        }
    }
}

impl Proxy {
    /// Starts listening for viewers of one display on every socket of `listens`; their
    /// connections are queued for [`Proxy::take_viewers`] under `protocol`, the name
    /// `add_client` takes.
    pub fn add_display(
        &mut self,
        registry: &Registry,
        listens: Vec<Listen>,
        protocol: &'static str,
    ) -> io::Result<()> {
        let d = self.handoff.displays.len();
        let mut listeners = Vec::new();
        let mut paths = Vec::new();
        for (l, listen) in listens.into_iter().enumerate() {
            let (mut socket, path) = listener(listen)?;
            let token = self.token(Route::Handoff(d, l));
            registry.register(&mut socket, token, Interest::READABLE)?;
            listeners.push(socket);
            paths.extend(path);
        }
        self.handoff.displays.push(Display {
            protocol,
            listeners,
            _paths: paths,
        });
        Ok(())
    }

    /// Whether viewers wait to be handed to QEMU.
    pub fn has_viewers(&self) -> bool {
        !self.handoff.accepted.is_empty()
    }

    /// The viewers accepted so far, oldest first, each with its display's protocol; then
    /// accepts those left in the backlog while the queue was full.
    pub fn take_viewers(&mut self) -> Vec<(&'static str, OwnedFd)> {
        let taken = self.handoff.accepted.drain(..).collect();
        for d in 0..self.handoff.displays.len() {
            let listeners = self
                .handoff
                .displays
                .get(d)
                .map_or(0, |x| x.listeners.len());
            for l in 0..listeners {
                self.handoff.accept(d, l);
            }
        }
        taken
    }

    /// A path for generation `gen`'s own `name` display socket (QEMU binds it), in the
    /// proxy's private directory; it goes with the generation's backend sockets.
    pub fn display_socket(&mut self, gen: u32, name: &str) -> io::Result<PathBuf> {
        let path = self.dir.path_for(gen, name)?;
        self.displays.entry(gen).or_default().push(path.clone());
        Ok(path)
    }

    /// The proxy's private directory, made now if it was not yet.
    pub fn private_dir(&mut self) -> io::Result<PathBuf> {
        self.dir.path()
    }
}

/// Display listeners and accepted viewers as a supervisor handover writes and reads them
/// ([`crate::handover`]).
impl Proxy {
    pub(super) fn export_handoff(&self) -> (Vec<state::Display>, Vec<(String, state::Fd)>) {
        let displays = self
            .handoff
            .displays
            .iter()
            .map(|d| state::Display {
                protocol: d.protocol.to_owned(),
                listeners: d
                    .listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let (fd, family) = l.export();
                        state::Listener {
                            fd,
                            family,
                            bound: d._paths.get(i).map(BoundPath::export),
                        }
                    })
                    .collect(),
            })
            .collect();
        let viewers = self
            .handoff
            .accepted
            .iter()
            .map(|(p, fd)| ((*p).to_owned(), state::Fd::of(fd)))
            .collect();
        (displays, viewers)
    }

    pub(super) fn import_handoff(
        &mut self,
        displays: Vec<state::Display>,
        viewers: Vec<(String, state::Fd)>,
        take: &mut Take,
        registry: &Registry,
    ) -> Result<(), ImportError> {
        for (d, s) in displays.into_iter().enumerate() {
            let protocol = protocol_name(&s.protocol)?;
            let mut listeners = Vec::new();
            let mut paths = Vec::new();
            for (l, ls) in s.listeners.into_iter().enumerate() {
                let mut socket = Listener::import(take.owned(ls.fd)?, ls.family)
                    .map_err(ImportError::io("a display listener"))?;
                let token = self.token(Route::Handoff(d, l));
                registry
                    .register(&mut socket, token, Interest::READABLE)
                    .map_err(ImportError::io("a display listener"))?;
                listeners.push(socket);
                paths.extend(ls.bound.as_ref().map(BoundPath::import));
            }
            self.handoff.displays.push(Display {
                protocol,
                listeners,
                _paths: paths,
            });
        }
        for (p, fd) in viewers {
            let protocol = protocol_name(&p)?;
            self.handoff.accepted.push_back((protocol, take.owned(fd)?));
        }
        Ok(())
    }
}

/// The name `add_client` takes for a display protocol the state names.
fn protocol_name(name: &str) -> Result<&'static str, ImportError> {
    [Protocol::Vnc, Protocol::Spice]
        .into_iter()
        .map(Protocol::name)
        .find(|p| *p == name)
        .ok_or_else(|| ImportError::Invalid(format!("unknown display protocol {name}")))
}
