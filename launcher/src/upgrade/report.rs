//! The upgrade's report: one JSON object for the domain log and the control socket.

use serde_json::{json, Value};

use super::UpgradeError;
use crate::generation::Generation;
use crate::json::JsonExt;

/// What a successful swap measured.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) downtime_ms: Option<u64>,
    pub(super) ram_bytes: Option<u64>,
    pub(super) shared: bool,
    pub(super) threads: Value,
    /// Tap ioctls the new QEMU made while the old one ran the guest, answered without effect.
    pub(super) tap_ioctls_held: Option<u32>,
    /// Options of the user's argv the new QEMU got in another form.
    pub(super) translations: Vec<Value>,
    /// The host forwards given back to the new QEMU, and any it refused; null without any.
    pub(super) hostfwd: Value,
    /// When each part of the guest's pause happened ([`super::timeline`]).
    pub(super) pause: Value,
}

/// How an upgrade failed.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) error: Box<UpgradeError>,
    /// The new QEMU's last line on stderr, its own explanation when it gave one.
    pub(super) said: Option<String>,
    /// What the rollback could not put back.
    pub(super) unrestored: Vec<String>,
}

impl From<UpgradeError> for Failure {
    fn from(error: UpgradeError) -> Failure {
        Failure {
            error: Box::new(error),
            said: None,
            unrestored: Vec::new(),
        }
    }
}

/// `{"version", "binary", "generation"}` of a generation, for the report.
pub(super) fn generation(gen: &Generation) -> Value {
    json!({
        "version": gen.version_string(),
        "binary": gen.binary.path.to_string_lossy(),
        "generation": gen.number,
    })
}

/// The report `head` completed with the outcome; `current` runs the guest now.
pub(super) fn complete(
    mut report: Value,
    current: &Generation,
    result: Result<Stats, Failure>,
) -> Value {
    match result {
        Ok(stats) => {
            report.put("result", "ok");
            report.put("to", generation(current));
            report.put("ram", if stats.shared { "shared" } else { "streamed" });
            report.put("downtime_ms", json!(stats.downtime_ms));
            report.put("ram_bytes", json!(stats.ram_bytes));
            report.put("threads", stats.threads);
            report.put("tap_ioctls_held", json!(stats.tap_ioctls_held));
            report.put("translations", json!(stats.translations));
            report.put("pause", stats.pause);
            if !stats.hostfwd.is_null() {
                report.put("hostfwd", stats.hostfwd);
            }
        }
        Err(failure) => {
            report.put("result", "failed");
            let mut reason = crate::error_chain(&failure.error);
            if let Some(line) = failure.said {
                reason.push_str(&format!(" (new QEMU: {line})"));
            }
            report.put("reason", reason);
            if !failure.unrestored.is_empty() {
                report.put("rollback_problems", json!(failure.unrestored));
            }
            report.put("generation", current.number);
        }
    }
    report
}
