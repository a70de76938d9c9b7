//! The rollout policy: what happens to running VMs after a package upgrade, QEMU's or this
//! package's own.
//!
//! It lives in the same config file the shim reads (`/etc/qemu-liveupgrade/config.json`, a
//! conffile of the package, or `$QEMU_LIVEUPGRADE_CONFIG`), under `"rollout"`:
//!
//! ```json
//! { "rollout": { "after_self_upgrade": "upgrade-supervisors",
//!                "after_qemu_upgrade": "upgrade-all", "max_parallel": 2 } }
//! ```
//!
//! `after_qemu_upgrade` is `"upgrade-all"` (every VM whose QEMU is not the installed one is
//! upgraded, `max_parallel` at a time) or `"nothing"` (the admin runs `qemu-liveupgrade
//! upgrade --all --outdated` when it suits). `after_self_upgrade` is `"upgrade-supervisors"`
//! (every VM whose launcher is not the installed shim hands itself over to it, one VM at a
//! time) or `"nothing"` (the admin runs `qemu-liveupgrade upgrade --supervisor --all
//! --outdated`). A key the file does not have means `"nothing"`: only the package's own config
//! file, or an admin, turns either on.

use std::path::{Path, PathBuf};

use launcher::resolve::{DEFAULT_CONFIG, ENV_CONFIG};
use serde_json::Value;

/// How many swaps run at once when neither the command line nor the config says.
pub const DEFAULT_MAX_PARALLEL: usize = 2;

/// What to do with running VMs once a new QEMU is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Nothing: they keep their QEMU until someone upgrades them.
    Nothing,
    /// Upgrade every outdated VM.
    UpgradeAll,
}

impl After {
    /// The word the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            After::Nothing => "nothing",
            After::UpgradeAll => "upgrade-all",
        }
    }
}

/// What to do with running VMs' launchers once a new qemu-liveupgrade is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSelf {
    /// Nothing: each keeps the launcher it runs until someone hands it over.
    Nothing,
    /// Hand every outdated launcher over to the installed shim.
    UpgradeSupervisors,
}

impl AfterSelf {
    /// The word the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSelf::Nothing => "nothing",
            AfterSelf::UpgradeSupervisors => "upgrade-supervisors",
        }
    }
}

/// The `"rollout"` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What happens after this package's own upgrade.
    pub after_self_upgrade: AfterSelf,
    /// What happens after a QEMU package upgrade.
    pub after_qemu_upgrade: After,
    /// Upgrades running at once.
    pub max_parallel: usize,
    /// The file it came from.
    pub config: PathBuf,
}

/// The config file this process would read: `$QEMU_LIVEUPGRADE_CONFIG` or the default.
pub fn config_path() -> PathBuf {
    std::env::var_os(ENV_CONFIG)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The keys of the `"rollout"` section.
const KEYS: [&str; 3] = ["after_self_upgrade", "after_qemu_upgrade", "max_parallel"];

/// Reads the policy from `config`. A missing file, section or key is the default (`nothing`,
/// 2 at a time); a malformed one is an error naming the file, never a silent default.
pub fn read(config: &Path) -> Result<Policy, String> {
    let mut policy = Policy {
        after_self_upgrade: AfterSelf::Nothing,
        after_qemu_upgrade: After::Nothing,
        max_parallel: DEFAULT_MAX_PARALLEL,
        config: config.to_owned(),
    };
    let text = match std::fs::read(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(policy),
        Err(e) => return Err(format!("cannot read {}: {e}", config.display())),
    };
    let bad = |why: String| format!("{}: {why}", config.display());
    let value: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let Some(rollout) = value.get("rollout") else {
        return Ok(policy);
    };
    let rollout = rollout
        .as_object()
        .ok_or_else(|| bad("\"rollout\" must be an object".into()))?;
    for key in rollout.keys() {
        if !KEYS.contains(&key.as_str()) {
            return Err(bad(format!(
                "unknown key \"rollout\".\"{key}\" (known: {})",
                KEYS.join(", ")
            )));
        }
    }
    match rollout.get("after_self_upgrade").map(|v| v.as_str()) {
        None => {}
        Some(Some("nothing")) => policy.after_self_upgrade = AfterSelf::Nothing,
        Some(Some("upgrade-supervisors")) => {
            policy.after_self_upgrade = AfterSelf::UpgradeSupervisors
        }
        Some(_) => {
            return Err(bad(
                "\"rollout\".\"after_self_upgrade\" must be \"nothing\" or \"upgrade-supervisors\""
                    .into(),
            ))
        }
    }
    match rollout.get("after_qemu_upgrade").map(|v| v.as_str()) {
        None => {}
        Some(Some("nothing")) => policy.after_qemu_upgrade = After::Nothing,
        Some(Some("upgrade-all")) => policy.after_qemu_upgrade = After::UpgradeAll,
        Some(_) => {
            return Err(bad(
                "\"rollout\".\"after_qemu_upgrade\" must be \"nothing\" or \"upgrade-all\"".into(),
            ))
        }
    }
    if let Some(n) = rollout.get("max_parallel") {
        policy.max_parallel = n
            .as_u64()
            .filter(|&n| n >= 1)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("\"rollout\".\"max_parallel\" must be a number from 1 up".into()))?;
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(text: &str) -> Result<Policy, String> {
        let dir = std::env::temp_dir().join(format!("qlu-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: the tests run in parallel threads.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.join(format!("{n}.json"));
        std::fs::write(&file, text).unwrap();
        let got = read(&file);
        std::fs::remove_file(&file).unwrap();
        got
    }

    #[test]
    fn the_packaged_config_upgrades_supervisors_then_all_two_at_a_time() {
        let packaged = include_str!("../../../debian/config.json");
        let p = with(packaged).unwrap();
        assert_eq!(p.after_self_upgrade, AfterSelf::UpgradeSupervisors);
        assert_eq!(p.after_qemu_upgrade, After::UpgradeAll);
        assert_eq!(p.max_parallel, 2);
    }

    #[test]
    fn no_file_or_no_section_means_nothing() {
        let p = read(Path::new("/nonexistent/config.json")).unwrap();
        assert_eq!(p.after_qemu_upgrade, After::Nothing);
        let p = with(r#"{"binary": "/usr/bin/qemu-system-x86_64.real"}"#).unwrap();
        assert_eq!(p.after_qemu_upgrade, After::Nothing);
        assert_eq!(p.after_self_upgrade, AfterSelf::Nothing);
        assert_eq!(p.max_parallel, DEFAULT_MAX_PARALLEL);
        // A config file from before the key (an admin's, kept by dpkg): nothing.
        let p = with(r#"{"rollout": {"after_qemu_upgrade": "upgrade-all"}}"#).unwrap();
        assert_eq!(p.after_qemu_upgrade, After::UpgradeAll);
        assert_eq!(p.after_self_upgrade, AfterSelf::Nothing);
    }

    #[test]
    fn values_are_checked_not_guessed() {
        let p = with(r#"{"rollout": {"after_qemu_upgrade": "nothing", "max_parallel": 5}}"#);
        assert_eq!(p.unwrap().max_parallel, 5);
        let p = with(r#"{"rollout": {"after_self_upgrade": "nothing"}}"#);
        assert_eq!(p.unwrap().after_self_upgrade, AfterSelf::Nothing);
        for bad in [
            r#"{"rollout": {"after_qemu_upgrade": "upgrade_all"}}"#,
            r#"{"rollout": {"after_self_upgrade": "upgrade-all"}}"#,
            r#"{"rollout": {"after_self_upgrade": true}}"#,
            r#"{"rollout": {"max_parallel": 0}}"#,
            r#"{"rollout": {"max_paralel": 3}}"#,
            r#"{"rollout": []}"#,
            r#"{"rollout": "#,
        ] {
            let err = with(bad).unwrap_err();
            assert!(err.contains(".json"), "names the file: {err}");
        }
    }
}
