//! The ptys as a supervisor handover writes and reads them ([`crate::handover`]): each master,
//! its path and label, the bytes the relay holds each way, and the live generation's socket.

use std::os::fd::AsFd;

use mio::{Registry, Token};

use super::{register, End, Kept, OpenPty, PtyRelay};
use crate::handover::fds::Take;
use crate::handover::state::{self, Bytes, Fd, Text};
use crate::handover::ImportError;

impl PtyRelay {
    /// Its part of the handed-over state; `None` during an upgrade, when input is held for a
    /// generation that is still starting.
    pub(crate) fn export(&self) -> Option<state::Ptys> {
        if self.held {
            return None;
        }
        let ptys = self
            .ptys
            .iter()
            .map(|k| state::Pty {
                master: Fd::of(&k.pty.master),
                path: Text::path(&k.pty.path),
                label: k.pty.label.clone(),
                link: k.pty.link.as_deref().map(Text::path),
                to_guest: Bytes(k.to_guest.clone()),
                to_pty: Bytes(k.to_pty.clone()),
                ends: k
                    .ends
                    .iter()
                    .map(|e| state::PtyEnd {
                        gen: e.gen,
                        ours: Fd::of(&e.ours),
                        theirs: Fd::of(&e.theirs),
                        closed: e.closed,
                    })
                    .collect(),
            })
            .collect();
        Some(state::Ptys {
            live: self.live,
            ptys,
        })
    }

    /// The relay a handover brought, pty `i` registered under `token(i)`, and every pty
    /// published again for `query-chardev`. What the old image held is moved on at once.
    pub(crate) fn import(
        s: state::Ptys,
        take: &mut Take,
        registry: &Registry,
        token: impl Fn(usize) -> Token,
    ) -> Result<PtyRelay, ImportError> {
        let mut ptys = Vec::new();
        for (i, p) in s.ptys.into_iter().enumerate() {
            let token = token(i);
            let master = take.owned(p.master)?;
            register(registry, master.as_fd(), token).map_err(ImportError::io("a pty"))?;
            let mut ends = Vec::new();
            for e in p.ends {
                let ours = take.owned(e.ours)?;
                let theirs = take.owned(e.theirs)?;
                register(registry, ours.as_fd(), token).map_err(ImportError::io("a pty"))?;
                ends.push(End {
                    gen: e.gen,
                    ours,
                    theirs,
                    closed: e.closed,
                });
            }
            ptys.push(Kept {
                pty: OpenPty {
                    master,
                    path: p.path.to_path(),
                    label: p.label,
                    link: p.link.map(|l| l.to_path()),
                },
                token,
                to_guest: p.to_guest.0,
                to_pty: p.to_pty.0,
                ends,
            });
        }
        let mut relay = PtyRelay {
            ptys,
            live: s.live,
            held: false,
            first_output: None,
        };
        let opened: Vec<&OpenPty> = relay.ptys.iter().map(|k| &k.pty).collect();
        super::publish_filenames(
            opened
                .iter()
                .map(|p| (p.label.clone(), p.filename()))
                .collect(),
        );
        relay.pump_all();
        Ok(relay)
    }
}
