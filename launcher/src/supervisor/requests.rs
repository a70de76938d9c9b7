//! The control socket's side of the supervisor: requests from `qemu-liveupgrade` clients,
//! the progress and reports of an upgrade sent back to them, and the VM's `status`.

use serde_json::{json, Value};

use super::Supervisor;
use crate::control::{self, Request};

impl Supervisor {
    pub(super) fn on_control_client(&mut self, slot: usize) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let Some((mut client, request)) = control.on_client(self.poll.registry(), slot) else {
            return;
        };
        match request {
            Request::Status => {
                let _ = client.send(&self.status());
            }
            Request::Upgrade(to) => {
                if self.upgrading {
                    // An upgrade is under way: this request is coalesced into it.
                    self.upgrade_requests += 1;
                } else {
                    self.upgrade_requests = 1;
                    self.upgrade_to = to;
                }
                self.waiters.push(client);
            }
            // Run from the loop's top, like an upgrade, never from inside this handler.
            Request::Check(to) => self.check_requests.push((client, to)),
            Request::Handover(to) => self.handovers.requests.push((client, to)),
        }
    }

    /// Prints an upgrade report as one JSON line on stderr, which libvirt keeps in the
    /// domain's log, and keeps it for `status`.
    pub(crate) fn report(&mut self, report: Value) {
        crate::stderr_line(&report.to_string());
        self.handovers.record(&report);
        for mut w in std::mem::take(&mut self.waiters) {
            let _ = w.send(&report);
        }
        self.last_upgrade = Some(report);
    }

    /// Tells control clients waiting on the upgrade which step it has reached.
    pub(crate) fn progress(&mut self, step: &str) {
        let line = control::progress(step);
        self.waiters.retain_mut(|w| w.send(&line).is_ok());
    }

    /// The VM's state, for `qemu-liveupgrade status` and `list`.
    pub fn status(&self) -> Value {
        let name = self
            .config
            .base
            .cmd
            .opts("name")
            .filter_map(|o| o.parse_arg())
            .filter_map(|a| a.get("guest"))
            .last();
        let mut status = json!({
            "pid": std::process::id(),
            "name": name,
            "qemu_pid": self.current.pid.as_raw(),
            "version": self.current.version_string(),
            "binary": self.current.binary.path.to_string_lossy(),
            "generation": self.current.number,
            "machine": self.machine,
            "ram": if self.config.base.unshared.is_none() { "shared" } else { "streamed" },
            "uptime_s": self.started.elapsed().as_secs(),
            "generation_uptime_s": self.current.started.elapsed().as_secs(),
            "last_upgrade": self.last_upgrade,
            "heap_in_use": crate::heap::in_use(),
            "output_dropped_bytes": crate::stdio::dropped(),
            "supervisor": self.handovers.status(),
        });
        if let (Value::Object(status), Value::Object(installed)) = (
            &mut status,
            crate::installed::status(
                &self.config.argv0,
                &self.current.binary,
                self.current.started_from,
                self.current.pid,
            ),
        ) {
            status.extend(installed);
        }
        status
    }
}
