//! The proxy as a supervisor handover writes and reads it ([`crate::handover`]).
//!
//! Between upgrades every client is served by the live generation, or waits its turn; a
//! handover never starts during a swap ([`Proxy::export`] says so). The new image registers
//! every socket in its own loop under fresh tokens and moves what can move at once: bytes that
//! arrived during the exec wait in the kernel, and epoll reports a socket already readable
//! when it is added, but nothing is left to that.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use mio::{Interest, Registry};

use super::conn::Conn;
use super::sockets::{BackendDir, BoundPath};
use super::stream::Listener;
use super::{Mode, Monitor, Proxy, Route};
use crate::handover::fds::Take;
use crate::handover::state::{self, Text};
use crate::handover::ImportError;
use crate::journal::Journal;

pub(super) fn mode_out(m: Mode) -> state::Mode {
    match m {
        Mode::Qmp => state::Mode::Qmp,
        Mode::Hmp => state::Mode::Hmp,
        Mode::Raw => state::Mode::Raw,
    }
}

pub(super) fn mode_in(m: state::Mode) -> Mode {
    match m {
        state::Mode::Qmp => Mode::Qmp,
        state::Mode::Hmp => Mode::Hmp,
        state::Mode::Raw => Mode::Raw,
    }
}

fn paths_out(by_gen: &BTreeMap<u32, Vec<PathBuf>>) -> BTreeMap<u32, Vec<Text>> {
    by_gen
        .iter()
        .map(|(g, paths)| (*g, paths.iter().map(|p| Text::path(p)).collect()))
        .collect()
}

fn paths_in(by_gen: BTreeMap<u32, Vec<Text>>) -> BTreeMap<u32, Vec<PathBuf>> {
    by_gen
        .into_iter()
        .map(|(g, paths)| (g, paths.iter().map(Text::to_path).collect()))
        .collect()
}

impl Proxy {
    /// Its part of the handed-over state; `Err` says why not now (a swap is under way).
    pub(crate) fn export(&self) -> Result<state::Proxy, &'static str> {
        if self.swapping {
            return Err("monitor clients are being moved to another QEMU");
        }
        let mut conns = Vec::new();
        for (&id, conn) in &self.conns {
            conns.push(
                conn.export(id)
                    .ok_or("monitor clients are being moved to another QEMU")?,
            );
        }
        let monitors = self
            .monitors
            .iter()
            .map(|m| {
                let (fd, family) = m.listener.export();
                state::Monitor {
                    mode: mode_out(m.mode),
                    listener: state::Listener {
                        fd,
                        family,
                        bound: m._path.as_ref().map(BoundPath::export),
                    },
                    active: m.active,
                    waiting: m.waiting.iter().copied().collect(),
                }
            })
            .collect();
        let (dir_base, dir, serial) = self.dir.export();
        let (handoff, viewers) = self.export_handoff();
        Ok(state::Proxy {
            dir_base: Text::path(&dir_base),
            dir: dir.as_deref().map(Text::path),
            serial,
            live: self.live,
            backends: paths_out(&self.backends),
            displays: paths_out(&self.displays),
            monitors,
            conns,
            next_conn: self.next_conn,
            journal: self.journal.export(),
            handoff,
            viewers,
        })
    }

    /// The proxy a handover brought, every socket registered under tokens from `token_base`
    /// up, and whatever can move moved.
    pub(crate) fn import(
        s: state::Proxy,
        take: &mut Take,
        registry: &Registry,
        token_base: usize,
    ) -> Result<Proxy, ImportError> {
        let mut proxy = Proxy {
            token_base,
            next_token: token_base,
            routes: HashMap::new(),
            monitors: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: s.next_conn,
            backends: paths_in(s.backends),
            displays: paths_in(s.displays),
            dir: BackendDir::import(
                s.dir_base.to_path(),
                s.dir.as_ref().map(Text::to_path),
                s.serial,
            ),
            live: s.live,
            swapping: false,
            swap_running: false,
            preparing: None,
            journal: Journal::import(s.journal, take)?,
            handoff: Default::default(),
        };
        let mut modes = Vec::new();
        for (index, m) in s.monitors.into_iter().enumerate() {
            let fd = take.owned(m.listener.fd)?;
            let mut listener = Listener::import(fd, m.listener.family)
                .map_err(ImportError::io("a monitor listener"))?;
            let token = proxy.token(Route::Listener(index));
            registry
                .register(&mut listener, token, Interest::READABLE)
                .map_err(ImportError::io("a monitor listener"))?;
            let mode = mode_in(m.mode);
            modes.push(mode);
            proxy.monitors.push(Monitor {
                mode,
                listener,
                _path: m.listener.bound.as_ref().map(BoundPath::import),
                active: m.active,
                waiting: m.waiting.into_iter().collect::<VecDeque<u64>>(),
            });
        }
        for c in s.conns {
            let id = c.id;
            let mode = modes
                .get(c.monitor)
                .copied()
                .ok_or_else(|| ImportError::Invalid(format!("client {id} of no monitor")))?;
            let token = proxy.token(Route::Conn(id));
            let back_token = proxy.token(Route::Conn(id));
            let mut conn = Conn::import(c, mode, take, token, back_token)?;
            // Writability is asked for once output waits ([`Conn::watch_writes`]).
            let interest = Interest::READABLE;
            registry
                .register(&mut conn.client, token, interest)
                .map_err(ImportError::io("a monitor client"))?;
            if let Some(b) = conn.back.as_mut() {
                registry
                    .register(&mut b.stream, back_token, interest)
                    .map_err(ImportError::io("a monitor connection"))?;
            }
            proxy.conns.insert(id, conn);
        }
        proxy.import_handoff(s.handoff, s.viewers, take, registry)?;
        // Bytes the old image had read and not yet passed on go now; so do clients accepted
        // meanwhile, whose turn may have come.
        let ids: Vec<u64> = proxy.conns.keys().copied().collect();
        for id in ids {
            proxy.service(registry, id);
        }
        for m in 0..proxy.monitors.len() {
            proxy.accept(registry, m);
        }
        Ok(proxy)
    }
}
