//! The swap, step by step: hold client input, prepare the new generation's connections,
//! wait for the old generation's answers, then commit (or abort).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use mio::{Interest, Registry, Token};
use nix::poll::PollFlags;

use super::conn::{Backend, Conn, Handshake};
use super::framing::{Filter, Greeting};
use super::{sockets, unlink_all, Proxy, ProxyError, Route};

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

    /// Opens each served client's connection to generation `gen`, reads and drops its
    /// greeting (QMP) or banner (HMP), and replays the client's accepted `qmp_capabilities`
    /// exactly, swallowing the answer. A greeting or negotiation the old generation still
    /// owes is waited for first. Until commit, what the new generation says is held back, its
    /// RESUME, MIGRATION and MIGRATION_PASS events dropped. Blocks until `deadline` at most.
    /// Calls [`Proxy::hold`] if the caller did not. On error the caller aborts the swap with
    /// [`Proxy::abort`]. Clients accepted during the swap are not prepared: they wait.
    pub fn prepare(
        &mut self,
        registry: &Registry,
        gen: u32,
        deadline: Instant,
    ) -> Result<(), ProxyError> {
        self.hold(registry);
        let paths = self
            .backends
            .get(&gen)
            .cloned()
            .ok_or(ProxyError::NoBackends { gen })?;
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.back.is_some() && c.next.is_none() && !c.closing)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let token = self.token(Route::Conn(id));
            let interest = Interest::READABLE | Interest::WRITABLE;
            let prepared = self
                .prepare_one(id, &paths, gen, token, deadline)
                .and_then(
                    |mut b| match registry.register(&mut b.stream, token, interest) {
                        Ok(()) => Ok(b),
                        Err(e) => Err(ProxyError::Register(e)),
                    },
                );
            match prepared {
                Ok(b) => self.conns.get_mut(&id).expect("prepared conn exists").next = Some(b),
                Err(e) => {
                    self.routes.remove(&token.0);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn prepare_one(
        &mut self,
        id: u64,
        paths: &[PathBuf],
        gen: u32,
        token: Token,
        deadline: Instant,
    ) -> Result<Backend, ProxyError> {
        let conn = self.conns.get_mut(&id).expect("prepared conn exists");
        let index = conn.monitor;
        // How to prepare depends on what the old generation has yet to say.
        loop {
            conn.pump(true, &mut self.journal);
            let Some(back) = conn.back.as_ref().filter(|_| conn.unsettled()) else {
                break;
            };
            sockets::wait_fd(back.stream.as_fd(), PollFlags::POLLIN, deadline)
                .map_err(|source| ProxyError::Negotiation { index, source })?;
        }
        let mode = self.monitors[index].mode;
        // A client the old generation never greeted (it died first) gets the new greeting.
        let greeting = if conn.greeted() {
            Greeting::Drop
        } else {
            Greeting::Pass
        };
        let mut b = Backend::connect(&paths[index], mode, greeting, Filter::Arriving, token)
            .map_err(|source| ProxyError::Connect { index, gen, source })?;
        b.handshake(conn.caps.as_deref(), deadline)
            .map_err(|e| match e {
                Handshake::Io(source) => ProxyError::Greeting { index, gen, source },
                Handshake::Refused(desc) => ProxyError::Capabilities { index, gen, desc },
            })?;
        Ok(b)
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
