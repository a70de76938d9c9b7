//! The swap, step by step: hold client input, prepare the new generation's connections,
//! wait for the old generation's answers, then commit (or abort). Nothing here blocks: the
//! supervisor's loop moves every connection, and the upgrade asks [`Proxy::prepared`] and
//! [`Proxy::drained`] after each turn.

use std::path::PathBuf;

use mio::{Interest, Registry};

use super::conn::{Backend, Conn, Handshake};
use super::framing::{Filter, Greeting};
use super::{unlink_all, Proxy, ProxyError, Route};

impl Proxy {
    /// Says whether the guest was running when the swap began: then the new generation's
    /// first RESUME after commit is the swap's own and is hidden.
    pub fn set_swap_running(&mut self, running: bool) {
        self.swap_running = running;
    }

    /// Swap step 1, before migration starts: stops forwarding client input (it waits in the
    /// proxy's buffers and the kernel, unanswered, never failed) while QEMU's answers and
    /// events still reach the clients, and hides the old generation's STOP, RESUME,
    /// MIGRATION, MIGRATION_PASS and SHUTDOWN events until the swap ends. Unforwarded input
    /// is kept whole: a half-sent command is never split between generations.
    pub fn hold(&mut self, _registry: &Registry) {
        if self.swapping {
            return;
        }
        self.swapping = true;
        for conn in self.conns.values_mut() {
            if let Some(b) = &mut conn.back {
                b.out.filter = Filter::Leaving;
            }
        }
    }

    /// Starts moving each served client to generation `gen`: a connection to `gen` is
    /// opened for it, its greeting (QMP) or banner (HMP) read and dropped, and the client's
    /// accepted `qmp_capabilities` replayed exactly, the answer swallowed. A greeting or
    /// negotiation the old generation still owes is waited for first. Nothing here waits:
    /// it all moves as the loop serves the connections, and [`Proxy::prepared`], called after
    /// every turn, opens what can be opened and says when every client is ready. Until
    /// commit, what the new generation says is held back, its RESUME, MIGRATION and
    /// MIGRATION_PASS events dropped. Calls [`Proxy::hold`] if the caller did not. On error
    /// the caller aborts the swap with [`Proxy::abort`]. Clients accepted during the swap
    /// are not prepared: they wait.
    pub fn prepare(&mut self, registry: &Registry, gen: u32) -> Result<(), ProxyError> {
        self.hold(registry);
        let paths = self
            .backends
            .get(&gen)
            .cloned()
            .ok_or(ProxyError::NoBackends { gen })?;
        self.preparing = Some((gen, paths));
        self.prepared(registry).map(|_| ())
    }

    /// Whether every client [`Proxy::prepare`] moves has its connection to the new
    /// generation ready; opens those whose old generation has settled meanwhile. `Err` when
    /// one cannot be made ready.
    pub fn prepared(&mut self, registry: &Registry) -> Result<bool, ProxyError> {
        let Some((gen, paths)) = self.preparing.clone() else {
            return Ok(true);
        };
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.back.is_some() && !c.closing)
            .map(|(&id, _)| id)
            .collect();
        let mut ready = true;
        for id in ids {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            let index = conn.monitor;
            if conn.next.is_none() {
                // How to prepare depends on what the old generation has yet to say.
                if conn.unsettled() {
                    ready = false;
                    continue;
                }
                self.open_next(registry, id, &paths, gen)?;
            }
            let Some(next) = self.conns.get(&id).and_then(|c| c.next.as_ref()) else {
                continue;
            };
            match next.handshake() {
                Ok(true) => {}
                Ok(false) => ready = false,
                Err(Handshake::Io(source)) => {
                    return Err(ProxyError::Greeting { index, gen, source })
                }
                Err(Handshake::Refused(desc)) => {
                    return Err(ProxyError::Capabilities { index, gen, desc })
                }
            }
        }
        Ok(ready)
    }

    /// Opens client `id`'s connection to generation `gen` and starts its handshake.
    fn open_next(
        &mut self,
        registry: &Registry,
        id: u64,
        paths: &[PathBuf],
        gen: u32,
    ) -> Result<(), ProxyError> {
        let token = self.token(Route::Conn(id));
        let Some(conn) = self.conns.get_mut(&id) else {
            self.routes.remove(&token.0);
            return Ok(());
        };
        let index = conn.monitor;
        let mode = self
            .monitors
            .get(index)
            .map_or(super::Mode::Raw, |m| m.mode);
        // A client the old generation never greeted (it died first) gets the new greeting.
        let greeting = if conn.greeted() {
            Greeting::Drop
        } else {
            Greeting::Pass
        };
        let path = paths.get(index).ok_or(ProxyError::NoBackends { gen })?;
        let opened = Backend::connect(path, mode, greeting, Filter::Arriving, token)
            .map_err(|source| ProxyError::Connect { index, gen, source })
            .and_then(
                |mut b| match registry.register(&mut b.stream, token, Interest::READABLE) {
                    Ok(()) => Ok(b),
                    Err(e) => Err(ProxyError::Register(e)),
                },
            );
        let mut b = match opened {
            Ok(b) => b,
            Err(e) => {
                self.routes.remove(&token.0);
                return Err(e);
            }
        };
        b.start_handshake(conn.caps.clone());
        conn.next = Some(b);
        // What the new generation has sent already is read now; later, its events.
        conn.pump(true, &mut self.journal);
        if conn.watch_writes(registry).is_err() {
            conn.dead = true;
        }
        Ok(())
    }

    /// True once every command forwarded to the old generation has been written and
    /// answered (or that QEMU is gone). QMP counts one answer per JSON value sent, HMP one
    /// prompt per line.
    pub fn drained(&self) -> bool {
        self.conns.values().all(Conn::drained)
    }

    /// Swap step 2, once the new generation runs the guest: every served client continues on
    /// its prepared connection to `gen` (after the old generation's last output, then what the
    /// new one said meanwhile), the old connections and backend sockets go, and held client
    /// input flows to the new generation in order. Clients that came during the swap are
    /// served now, with the new generation's greeting. Assumes [`Proxy::drained`]: answers
    /// the old generation still owed are lost.
    pub fn commit(&mut self, registry: &Registry, gen: u32) {
        let resumed_by_swap = self.swap_running;
        let mut old = Vec::new();
        for conn in self.conns.values_mut().filter(|c| c.back.is_some()) {
            old.extend(conn.switch(resumed_by_swap, &mut self.journal));
        }
        for b in old {
            self.drop_backend(registry, b);
        }
        self.live = Some(gen);
        self.end_swap(registry);
    }

    /// The upgrade failed: drops the connections and backend sockets of the new generation,
    /// and resumes forwarding client input to the old one. A client whose old connection
    /// ended meanwhile is closed, as QEMU's exit would have.
    pub fn abort(&mut self, registry: &Registry) {
        let mut prepared = Vec::new();
        for conn in self.conns.values_mut() {
            prepared.extend(conn.unswitch());
        }
        for b in prepared {
            self.drop_backend(registry, b);
        }
        self.end_swap(registry);
    }

    fn end_swap(&mut self, registry: &Registry) {
        self.swapping = false;
        self.preparing = None;
        let live = self.live;
        for by_gen in [&mut self.backends, &mut self.displays] {
            by_gen.retain(|&gen, paths| {
                let keep = Some(gen) == live;
                if !keep {
                    unlink_all(paths);
                }
                keep
            });
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.service(registry, id);
        }
        for m in 0..self.monitors.len() {
            self.promote(registry, m);
        }
    }
}
