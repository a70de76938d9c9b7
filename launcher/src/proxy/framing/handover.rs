//! Framing state as a supervisor handover writes and reads it ([`crate::handover`]): where a
//! scan stands in the middle of a message crosses too, so the new image resumes it mid-value.

use super::*;
use crate::handover::state::{self, Bytes};

impl JsonScan {
    pub(in crate::proxy) fn export(&self) -> state::Scan {
        state::Scan {
            depth: self.depth,
            quote: self.quote,
            escape: self.escape,
            pos: self.pos,
        }
    }

    pub(in crate::proxy) fn import(s: state::Scan) -> JsonScan {
        JsonScan {
            depth: s.depth,
            quote: s.quote,
            escape: s.escape,
            pos: s.pos,
        }
    }
}

impl Inbound {
    /// The scan of a QMP stream; HMP and raw streams keep no state between units.
    pub(in crate::proxy) fn export(&self) -> state::Scan {
        match self {
            Inbound::Qmp(scan) => scan.export(),
            Inbound::Hmp | Inbound::Raw => state::Scan::default(),
        }
    }

    pub(in crate::proxy) fn import(mode: Mode, scan: state::Scan) -> Inbound {
        match mode {
            Mode::Qmp => Inbound::Qmp(JsonScan::import(scan)),
            Mode::Hmp => Inbound::Hmp,
            Mode::Raw => Inbound::Raw,
        }
    }
}

impl Outbound {
    pub(in crate::proxy) fn export(&self) -> state::Outbound {
        state::Outbound {
            mode: crate::proxy::handover::mode_out(self.mode),
            scan: self.scan.export(),
            trailer: self.trailer,
            prompt: self.prompt,
            greeting: match self.greeting {
                Greeting::Pass => state::Greeting::Pass,
                Greeting::Drop => state::Greeting::Drop,
                Greeting::Done => state::Greeting::Done,
            },
            filter: match self.filter {
                Filter::Live => state::Filter::Live,
                Filter::Leaving => state::Filter::Leaving,
                Filter::Arriving => state::Filter::Arriving,
            },
            drop_resume: self.drop_resume,
            hidden_stop: self.hidden_stop,
            swallow: self.swallow,
            replayed: self.replayed.as_ref().map(|r| match r {
                Ok(()) => state::Replayed::Ok,
                Err(desc) => state::Replayed::Error(desc.clone()),
            }),
            echoed: self.echoed,
            printed: Bytes(self.printed.clone()),
        }
    }

    pub(in crate::proxy) fn import(s: state::Outbound) -> Outbound {
        Outbound {
            mode: crate::proxy::handover::mode_in(s.mode),
            scan: JsonScan::import(s.scan),
            trailer: s.trailer,
            // An HMP prompt is shorter than any count a newer writer could mean.
            prompt: s.prompt.min(PROMPT.len().saturating_sub(1)),
            greeting: match s.greeting {
                state::Greeting::Pass => Greeting::Pass,
                state::Greeting::Drop => Greeting::Drop,
                state::Greeting::Done => Greeting::Done,
            },
            filter: match s.filter {
                state::Filter::Live => Filter::Live,
                state::Filter::Leaving => Filter::Leaving,
                state::Filter::Arriving => Filter::Arriving,
            },
            drop_resume: s.drop_resume,
            hidden_stop: s.hidden_stop,
            swallow: s.swallow,
            replayed: s.replayed.map(|r| match r {
                state::Replayed::Ok => Ok(()),
                state::Replayed::Error(desc) => Err(desc),
            }),
            echoed: s.echoed,
            printed: s.printed.0,
        }
    }
}

impl Request {
    /// Its envelope and command; `caps` are the bytes of a `qmp_capabilities`.
    pub(in crate::proxy) fn export(&self, caps: Option<&[u8]>) -> state::Pending {
        state::Pending {
            id: self.id.clone(),
            oob: self.oob,
            caps: caps.map(|b| Bytes(b.to_vec())),
            command: self.command.as_ref().map(Command::export),
            fd: None,
        }
    }

    pub(in crate::proxy) fn import(s: &state::Pending) -> Request {
        Request {
            id: s.id.clone(),
            oob: s.oob,
            caps: s.caps.is_some(),
            command: s.command.clone().and_then(Command::import),
        }
    }
}
