//! Which qemu-liveupgrade this process is: its release and build, as `status`, the upgrade
//! reports and a supervisor handover ([`crate::handover`]) name it.
//!
//! The release is the crate's version. The build is whatever the packager (or a test that
//! builds the same source twice) sets in `QEMU_LIVEUPGRADE_BUILD` at compile time, so that two
//! builds of one release can be told apart on a host; without it, `dev`.

use serde_json::{json, Value};

/// The release: the launcher crate's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The build, from `QEMU_LIVEUPGRADE_BUILD` at compile time, or `dev`.
pub const BUILD: &str = match option_env!("QEMU_LIVEUPGRADE_BUILD") {
    Some(build) => build,
    None => "dev",
};

/// `{"version": ..., "build": ...}` of this process, with the executable it runs from when
/// `/proc` says.
pub fn describe() -> Value {
    json!({
        "version": VERSION,
        "build": BUILD,
        "exe": std::fs::read_link("/proc/self/exe").ok().map(|p| p.to_string_lossy().into_owned()),
    })
}
