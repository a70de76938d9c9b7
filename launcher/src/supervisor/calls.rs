//! Waiting on generations from inside the loop: monitor commands and their replies, the
//! greeting, the exec status. Every wait serves the loop (and the generation beside the
//! current one, when there is one) until what it waits for arrives or its deadline passes.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Supervisor;
use crate::child::ChildError;
use crate::generation::Generation;
use crate::qmp::{self, QmpError};
use crate::spawn::register_tap_guard;

/// Why [`Supervisor::call`] or another wait returned without what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The command failed, or the monitor broke.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The generation exited while the command was outstanding.
    #[error("QEMU exited")]
    Exited,
    /// The deadline passed.
    #[error("{0} timed out")]
    Timeout(String),
    /// The loop itself failed.
    #[error("event loop failed")]
    Poll(#[source] io::Error),
    /// A signal that ends the VM came while waiting was interruptible.
    #[error("the VM is ending ({0})")]
    Ending(nix::sys::signal::Signal),
}

/// Which generation a command goes to, and which besides the current one the loop serves
/// while it waits.
pub(crate) enum To<'a> {
    /// The generation running the guest; `beside` is one started next to it, served meanwhile.
    Current {
        /// The generation an upgrade is starting, if any.
        beside: Option<&'a mut Generation>,
    },
    /// A generation started next to the current one.
    Beside(&'a mut Generation),
}

impl To<'_> {
    /// The current generation, nothing beside it.
    pub(crate) const CURRENT: To<'static> = To::Current { beside: None };

    /// The same target again, for one more call.
    pub(crate) fn reborrow(&mut self) -> To<'_> {
        match self {
            To::Current { beside } => To::Current {
                beside: beside.as_deref_mut(),
            },
            To::Beside(gen) => To::Beside(gen),
        }
    }
}

impl Supervisor {
    /// Waits for a generation's greeting, negotiates its monitor and reads its version. QEMU
    /// dispatches monitor commands only from its main loop, which it enters after creating
    /// every chardev, so a reply here means every user monitor socket already listens.
    pub(crate) fn handshake(
        &mut self,
        mut to: To<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), CallError> {
        loop {
            let gen = self.target(&mut to);
            if gen.qmp.take_greeting().is_some() {
                break;
            }
            check_alive(gen)?;
            self.serve(beside(&mut to), deadline, "greeting")?;
        }
        self.call(to.reborrow(), "qmp_capabilities", None, deadline)?;
        let version = self.call(to.reborrow(), "query-version", None, deadline)?;
        self.target(&mut to).version = Some(version);
        Ok(())
    }

    /// Serves the loop until a generation's exec status arrives, or `deadline`.
    pub(super) fn await_exec(
        &mut self,
        mut to: To<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), Awaited> {
        loop {
            let gen = self.target(&mut to);
            match gen.on_exec_status() {
                Some(Ok(())) => {
                    let gen = match &to {
                        To::Current { .. } => &self.current,
                        To::Beside(gen) => &**gen,
                    };
                    register_tap_guard(self.poll.registry(), gen)
                        .map_err(|e| Awaited::Call(CallError::Poll(io::Error::other(e))))?;
                    return Ok(());
                }
                Some(Err(e)) => return Err(Awaited::Exec(e)),
                None if gen.exec.is_none() => return Ok(()),
                None => {}
            }
            self.serve(beside(&mut to), deadline, "starting QEMU")
                .map_err(Awaited::Call)?;
        }
    }

    /// Sends a command on a generation's private monitor and waits for its reply, serving
    /// the loop meanwhile.
    pub(crate) fn call(
        &mut self,
        to: To<'_>,
        command: &str,
        args: Option<Value>,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        self.call_with_fd(to, command, args, None, deadline)
    }

    /// [`Supervisor::call`] passing an fd with SCM_RIGHTS (`getfd`).
    pub(crate) fn call_with_fd(
        &mut self,
        mut to: To<'_>,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        let gen = self.target(&mut to);
        check_alive(gen)?;
        let id = gen.qmp.send_with_fd(command, args, fd)?;
        loop {
            let gen = self.target(&mut to);
            if let Some(result) = gen.qmp.take_reply(id) {
                return result.map_err(|e| qmp::command_error(command, &e).into());
            }
            check_alive(gen)?;
            self.serve(beside(&mut to), deadline, command)?;
        }
    }

    /// Serves the loop (and `beside`) until `done` holds or the deadline passes.
    pub(crate) fn wait_until(
        &mut self,
        mut beside: Option<&mut Generation>,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&mut Supervisor, Option<&mut Generation>) -> bool,
    ) -> Result<(), CallError> {
        while !done(self, beside.as_deref_mut()) {
            self.serve(beside.as_deref_mut(), Some(deadline), what)?;
        }
        Ok(())
    }

    /// One request to the placer service ([`crate::placer`]), answered within
    /// [`crate::placer::TIMEOUT`] in all while the loop serves the VM (`beside` too): its
    /// consoles, monitors and signals never wait for a placer that is slow, stopped or stuck.
    pub(crate) fn ask_placer(
        &mut self,
        beside: Option<&mut Generation>,
        req: &Value,
    ) -> Result<Value, String> {
        use mio::{unix::SourceFd, Interest};
        let mut asking = crate::placer::Asking::start(req)?;
        let fd = asking.raw_fd();
        self.poll
            .registry()
            .register(
                &mut SourceFd(&fd),
                crate::token::Token::Placer.to_mio(),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("cannot wait for the placer: {e}"))?;
        let mut answer = None;
        let deadline = Instant::now() + crate::placer::TIMEOUT;
        let waited = self.wait_until(beside, "the placer's answer", deadline, |_, _| {
            answer = asking.step();
            answer.is_some()
        });
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        match (answer, waited) {
            (Some(answer), _) => answer,
            (None, Err(CallError::Timeout(_))) | (None, Ok(())) => Err(asking.timed_out()),
            (None, Err(e)) => Err(format!("the placer's answer: {e}")),
        }
    }

    /// One turn of a wait for `what`: the loop served once, `beside` too, until `deadline`
    /// at most. A wait the upgrade made interruptible ends as soon as a signal to end the VM
    /// is held back.
    pub(crate) fn serve(
        &mut self,
        beside: Option<&mut Generation>,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<(), CallError> {
        if let Some(sig) = self.ending_signal().filter(|_| self.interruptible) {
            return Err(CallError::Ending(sig));
        }
        let left = remaining(deadline, what)?;
        self.pump(beside, left).map_err(CallError::Poll)
    }

    pub(super) fn target<'g>(&'g mut self, to: &'g mut To<'_>) -> &'g mut Generation {
        match to {
            To::Current { .. } => &mut self.current,
            To::Beside(gen) => gen,
        }
    }
}

/// Why waiting for an exec status ended without one.
pub(super) enum Awaited {
    /// The child reported that it could not execute QEMU.
    Exec(ChildError),
    /// The deadline passed, the loop failed, or the child exited.
    Call(CallError),
}

pub(super) fn check_alive(gen: &Generation) -> Result<(), CallError> {
    if gen.exit.is_some() {
        return Err(CallError::Exited);
    }
    if gen.qmp.is_closed() {
        return Err(QmpError::Closed.into());
    }
    Ok(())
}

/// The generation besides the current one that a wait for `to` must serve.
pub(super) fn beside<'g>(to: &'g mut To<'_>) -> Option<&'g mut Generation> {
    match to {
        To::Current { beside } => beside.as_deref_mut(),
        To::Beside(gen) => Some(gen),
    }
}

/// Time left until `deadline`, or a timeout error naming `what`.
fn remaining(deadline: Option<Instant>, what: &str) -> Result<Option<Duration>, CallError> {
    match deadline {
        None => Ok(None),
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(CallError::Timeout(what.to_owned())),
        },
    }
}
