//! What a failed upgrade puts back on the old QEMU and in the proxy, step by step.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::migration::{caps_arg, is_active};
use super::{Guest, FD_OUT};
use crate::json::JsonExt;
use crate::supervisor::{CallError, Supervisor, To};

/// What one step changed on the old QEMU or in the proxy, for a failure later to put back.
/// A failed upgrade kills the new QEMU first, then undoes these in reverse order.
#[derive(Debug)]
pub(super) enum Undo {
    /// Migration capabilities turned on on the old QEMU: off again.
    Capabilities(Vec<String>),
    /// Migration parameters changed on the old QEMU: their values before.
    Parameters(Value),
    /// Monitor clients' input held and their connections to the new QEMU prepared: back to
    /// the old one, with what they sent meanwhile.
    Monitors,
    /// The stream's write end handed to the old QEMU (`getfd`) and not taken by `migrate`.
    OutFd,
    /// `migrate` issued: cancelled, and the guest running again if it ran before.
    Migration,
}

impl Supervisor {
    /// Undoes one step on the old QEMU; `Err` says what could not be put back. Nothing is
    /// sent to an old QEMU that has exited.
    pub(super) fn undo(&mut self, step: Undo, guest: &Guest) -> Result<(), String> {
        if let Undo::Monitors = step {
            self.proxy.abort(self.poll.registry());
            return Ok(());
        }
        if self.has_exited() {
            return Ok(());
        }
        match step {
            Undo::Monitors => {}
            Undo::Migration => {
                let cancelled =
                    self.call(To::CURRENT, "migrate_cancel", None, self.step_deadline());
                let settle = Instant::now() + self.config.settings.timeouts.step;
                while Instant::now() < settle {
                    match self.call(To::CURRENT, "query-migrate", None, self.step_deadline()) {
                        Ok(info) if info.at("/status").as_str().is_some_and(is_active) => {
                            let pause = Instant::now() + Duration::from_millis(2);
                            let _ = self.wait_until(None, "cancel", pause, |_, _| false);
                        }
                        _ => break,
                    }
                }
                // QEMU resumes a source whose migration failed by itself, but not one that
                // finished sending and then lost its destination: `cont` takes its disks
                // back and runs it.
                if guest.status == "running" {
                    let now = self.call(To::CURRENT, "query-status", None, self.step_deadline());
                    if now.is_ok_and(|s| s.at("/status") != "running") {
                        self.call(To::CURRENT, "cont", None, self.step_deadline())
                            .map_err(note("cont"))?;
                    }
                }
                cancelled.map_err(note("migrate_cancel"))?;
            }
            Undo::OutFd => {
                let args = json!({"fdname": FD_OUT});
                self.call(To::CURRENT, "closefd", Some(args), self.step_deadline())
                    .map_err(note("closefd"))?;
            }
            Undo::Capabilities(names) => {
                if !names.is_empty() {
                    let args = caps_arg(&names, false);
                    self.call(
                        To::CURRENT,
                        "migrate-set-capabilities",
                        Some(args),
                        self.step_deadline(),
                    )
                    .map_err(note("migrate-set-capabilities"))?;
                }
            }
            Undo::Parameters(params) => {
                self.call(
                    To::CURRENT,
                    "migrate-set-parameters",
                    Some(params),
                    self.step_deadline(),
                )
                .map_err(note("migrate-set-parameters"))?;
            }
        }
        Ok(())
    }
}

/// What could not be put back, for the report.
fn note(what: &'static str) -> impl Fn(CallError) -> String {
    move |e| format!("{what}: {}", crate::error_chain(&e))
}
