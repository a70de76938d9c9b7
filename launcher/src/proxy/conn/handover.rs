//! A connection as a supervisor handover writes and reads it ([`crate::handover`]): every
//! buffer each way, the fds waiting to go with them, the commands QEMU owes answers to, and
//! where the framing stands. Nothing is read or written here: the kernel keeps what is still
//! in the sockets, and the new image reads on from there.

use super::*;
use crate::handover::fds::Take;
use crate::handover::state::{self, Bytes, Fd};
use crate::handover::ImportError;

fn batches_out(batches: &VecDeque<Batch>) -> Vec<state::Batch> {
    batches
        .iter()
        .map(|b| state::Batch {
            at: b.at,
            fds: b.fds.iter().map(Fd::of).collect(),
        })
        .collect()
}

fn batches_in(s: Vec<state::Batch>, take: &mut Take) -> Result<VecDeque<Batch>, ImportError> {
    s.into_iter()
        .map(|b| {
            let fds = b
                .fds
                .into_iter()
                .map(|fd| take.owned(fd))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Batch { at: b.at, fds })
        })
        .collect()
}

impl Backend {
    pub(in crate::proxy) fn export(&self) -> state::Backend {
        state::Backend {
            fd: Fd::of(&self.stream),
            rx: Bytes(self.rx.clone()),
            out: self.out.export(),
            to_qemu: Bytes(self.to_qemu.clone()),
            fds_out: batches_out(&self.fds_out),
            qemu_fd: self.qemu_fd.as_ref().map(Fd::of),
            pending: self
                .pending
                .iter()
                .map(|p| {
                    let mut s = p.request.export(p.caps.as_deref());
                    s.fd = p.fd.as_ref().map(Fd::of);
                    s
                })
                .collect(),
            held: Bytes(self.held.clone()),
            eof: self.eof,
            shut: self.shut,
        }
    }

    pub(in crate::proxy) fn import(
        s: state::Backend,
        take: &mut Take,
        token: Token,
    ) -> Result<Backend, ImportError> {
        let stream = StdStream::from(take.owned(s.fd)?);
        stream
            .set_nonblocking(true)
            .map_err(ImportError::io("a monitor connection"))?;
        let mut pending = VecDeque::new();
        for p in &s.pending {
            pending.push_back(Pending {
                request: Request::import(p),
                caps: p.caps.as_ref().map(|b| b.0.clone()),
                fd: p.fd.map(|fd| take.owned(fd)).transpose()?,
            });
        }
        Ok(Backend {
            stream: UnixStream::from_std(stream),
            token,
            rx: s.rx.0,
            out: Outbound::import(s.out),
            to_qemu: s.to_qemu.0,
            fds_out: batches_in(s.fds_out, take)?,
            qemu_fd: s.qemu_fd.map(|fd| take.owned(fd)).transpose()?,
            pending,
            held: s.held.0,
            eof: s.eof,
            shut: s.shut,
            // What came during the exec raised no event of this loop's: read to EAGAIN.
            readable: true,
            drain: true,
            watch_out: false,
            first_out: None,
            handshaking: false,
            replay: None,
            replayed: false,
        })
    }
}

impl Conn {
    /// `None` while a swap has a connection prepared to a new generation: a handover
    /// waits for the swap to end.
    pub(in crate::proxy) fn export(&self, id: u64) -> Option<state::Conn> {
        if self.next.is_some() {
            return None;
        }
        let (client, family) = self.client.export();
        Some(state::Conn {
            id,
            monitor: self.monitor,
            client,
            family,
            to_client: Bytes(self.to_client.clone()),
            from_client: Bytes(self.from_client.clone()),
            fds_in: batches_out(&self.fds_in),
            inbound: self.inbound.export(),
            client_eof: self.client_eof,
            dead: self.dead,
            closing: self.closing,
            back: self.back.as_ref().map(Backend::export),
            caps: self.caps.as_ref().map(|c| Bytes(c.clone())),
        })
    }

    /// The connection a handover brought; `back_token` for its backend, if it has one.
    pub(in crate::proxy) fn import(
        s: state::Conn,
        mode: Mode,
        take: &mut Take,
        token: Token,
        back_token: Token,
    ) -> Result<Conn, ImportError> {
        let client = Stream::import(take.owned(s.client)?, s.family)
            .map_err(ImportError::io("a monitor client"))?;
        let back = s
            .back
            .map(|b| Backend::import(b, take, back_token))
            .transpose()?;
        Ok(Conn {
            monitor: s.monitor,
            client,
            token,
            to_client: s.to_client.0,
            from_client: s.from_client.0,
            fds_in: batches_in(s.fds_in, take)?,
            inbound: Inbound::import(mode, s.inbound),
            client_eof: s.client_eof,
            dead: s.dead,
            closing: s.closing,
            back,
            next: None,
            caps: s.caps.map(|c| c.0),
            client_readable: true,
            client_drain: true,
            client_watch_out: false,
        })
    }
}
