//! The hot-plug journal replayed into a new generation, for an upgrade and for `check`.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use serde_json::Value;

use super::UpgradeError;
use crate::generation::Generation;
use crate::supervisor::{Supervisor, To};

impl Supervisor {
    /// Replays the hot-plug journal into `new` through its private monitor. QEMU keeps
    /// `getfd` names per monitor, so fds and the commands that use them both go through this
    /// one monitor.
    pub(crate) fn replay_hotplug(
        &mut self,
        new: &mut Generation,
        until: Option<Instant>,
    ) -> Result<(), UpgradeError> {
        // What the new generation's command line does not already carry, by index.
        let journal = self.proxy.journal();
        let entries: Vec<(usize, String, Value, Option<OwnedFd>)> = journal
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| journal.replays(e))
            .map(|(i, e)| {
                let fd = e.fds.first().and_then(|fd| fd.try_clone().ok());
                (i, e.command.clone(), e.arguments.clone(), fd)
            })
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.progress("replaying hot-plugged devices");
        for (i, command, arguments, fd) in entries.iter() {
            let fd = fd.as_ref().map(|f| f.as_fd());
            let ret = self
                .call_with_fd(
                    To::Beside(new),
                    command,
                    Some(arguments.clone()),
                    fd,
                    self.step_deadline().map(|d| until.map_or(d, |u| u.min(d))),
                )
                .map_err(|e| {
                    UpgradeError::Replay(format!(
                        "{command} {arguments}: {}",
                        crate::error_chain(&e)
                    ))
                })?;
            let ok = self
                .proxy
                .journal()
                .entries()
                .get(*i)
                .is_none_or(|e| e.succeeded(&ret));
            if !ok {
                return Err(UpgradeError::Replay(format!(
                    "{command} {arguments}: {ret}"
                )));
            }
        }
        Ok(())
    }
}
