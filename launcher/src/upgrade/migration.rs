//! What the upgrade asks QEMU and concludes from its answers: migration capabilities and
//! states, guest RAM's size.

use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::json::JsonExt;

/// Migration states of the source that mean it is over and did not succeed.
pub(super) const SOURCE_FAILED: [&str; 2] = ["failed", "cancelled"];

/// Total bytes of guest RAM the launcher owns, or the `-m` size when RAM is streamed.
pub(super) fn ram_size(config: &Config) -> u64 {
    let owned: u64 = config
        .ram
        .iter()
        .filter_map(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).ok())
        .map(|st| st.st_size as u64)
        .sum();
    if owned > 0 {
        return owned;
    }
    crate::resources::resources(&config.base.cmd)
        .memory
        .iter()
        .filter_map(|m| m.size)
        .sum()
}

/// `[(name, enabled)]` from a `query-migrate-capabilities` reply.
pub(super) fn capabilities(reply: &Value) -> Vec<(String, bool)> {
    reply
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| {
                    Some((
                        c.at("/capability").as_str()?.to_owned(),
                        c.at("/state").as_bool()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The arguments of `migrate-set-capabilities` setting `names` to `state`.
pub(super) fn caps_arg(names: &[String], state: bool) -> Value {
    let caps: Vec<Value> = names
        .iter()
        .map(|c| json!({"capability": c, "state": state}))
        .collect();
    json!({ "capabilities": caps })
}

/// The status a MIGRATION event reports.
pub(super) fn migration_status(event: &Value) -> Option<&str> {
    if event.at("/event") != "MIGRATION" {
        return None;
    }
    event.at("/data/status").as_str()
}

/// Whether a migration in `status` is still under way.
pub(super) fn is_active(status: &str) -> bool {
    !matches!(status, "none" | "completed" | "failed" | "cancelled")
}

/// Milliseconds, to the microsecond, for reports.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
