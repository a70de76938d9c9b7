//! What the supervisor does for the listeners it holds: hands each accepted viewer to the QEMU
//! running the guest, and gives a new generation the host forwards the old one let go of.
//!
//! Both go through the launcher's private monitor of the current generation: `getfd` names
//! a connection on that monitor, and `add_client` (which QEMU resolves on the monitor it runs
//! on) takes it.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::hostfwd;
use crate::supervisor::{Supervisor, To};

/// Time each monitor command here gets.
const STEP: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Hands every viewer accepted on a display port to the current generation. Called from
    /// the main loop between upgrades, so that a viewer arriving during one is served by the
    /// QEMU that runs the guest afterwards. A connection QEMU refuses is closed, as QEMU
    /// closes one it cannot serve.
    pub(crate) fn hand_over_viewers(&mut self) {
        for (serial, (protocol, fd)) in self.proxy.take_viewers().into_iter().enumerate() {
            let name = format!("qemu-liveupgrade-viewer-{serial}");
            let deadline = Some(Instant::now() + STEP);
            let named = self.call_with_fd(
                To::CURRENT,
                "getfd",
                Some(json!({ "fdname": name })),
                Some(fd.as_fd()),
                deadline,
            );
            // QEMU holds its own copy now; this one goes either way.
            drop(fd);
            if named.is_err() {
                continue;
            }
            let args = json!({ "protocol": protocol, "fdname": name, "skipauth": false });
            if self
                .call(To::CURRENT, "add_client", Some(args), deadline)
                .is_err()
            {
                let _ = self.call(
                    To::CURRENT,
                    "closefd",
                    Some(json!({ "fdname": name })),
                    deadline,
                );
            }
        }
    }

    /// Gives the current generation, started without them, the host forwards of user-mode
    /// networking, now that the old one has exited and its ports are free. Returns the
    /// report's `hostfwd` entry: the forwards added, and what QEMU said of any it could not
    /// add (another process took the port meanwhile); `Value::Null` without forwards.
    pub(crate) fn restore_forwards(&mut self) -> Value {
        let forwards = hostfwd::find(&self.config.base.cmd);
        if forwards.is_empty() {
            return Value::Null;
        }
        let mut problems = Vec::new();
        for f in &forwards {
            let args = json!({ "command-line": f.hmp() });
            let deadline = Some(Instant::now() + STEP);
            // HMP reports failure as text only; success prints nothing.
            match self.call(To::CURRENT, "human-monitor-command", Some(args), deadline) {
                Ok(Value::String(text)) if text.trim().is_empty() => {}
                Ok(other) => problems.push(format!(
                    "{}: {}",
                    f.rule,
                    other.as_str().unwrap_or_default().trim()
                )),
                Err(e) => problems.push(format!("{}: {}", f.rule, crate::error_chain(&e))),
            }
        }
        json!({ "forwards": forwards.len(), "problems": problems })
    }
}
