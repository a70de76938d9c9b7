//! Everything one VM's supervisor is started with, decided before its loop runs.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::child::InheritedSignals;
use crate::daemonize::{Daemon, Pidfile};
use crate::generation::Base;
use crate::ptys::OpenPty;
use crate::resolve::Binary;
use crate::taps::OpenTap;

/// Everything needed to supervise one VM.
#[derive(Debug)]
pub struct Config {
    /// `argv[0]` the launcher was invoked with; QEMU gets the same, so its messages read the same.
    pub argv0: OsString,
    /// The command line, fd layout, RAM regions and proxied sockets every generation shares.
    pub base: Base,
    /// The memfds of guest RAM, in layout order.
    pub ram: Vec<OwnedFd>,
    /// The taps the launcher opened by name, in layout order.
    pub taps: Vec<OpenTap>,
    /// The ptys the launcher opened, in layout order; the supervisor relays them.
    pub ptys: Vec<OpenPty>,
    /// The real QEMU for the first generation.
    pub binary: Binary,
    /// The signal state to give every QEMU.
    pub signals: InheritedSignals,
    /// Set when `-daemonize` was given and the foreground waits for a start-up report.
    pub daemon: Option<Daemon>,
    /// Timeouts and the test fault hook, from the environment.
    pub settings: Settings,
    /// The `-pidfile`, locked for the VM's life and removed when it ends.
    pub pidfile: Option<Pidfile>,
}

/// What every generation is started from: the part of [`Config`] spawning needs.
#[derive(Debug, Clone, Copy)]
pub struct Template<'a> {
    /// `argv[0]` for QEMU.
    pub argv0: &'a OsString,
    /// The command line and fd layout.
    pub base: &'a Base,
    /// Guest RAM, placed at the layout's numbers.
    pub ram: &'a [OwnedFd],
    /// Taps opened by name, placed at the layout's numbers.
    pub taps: &'a [OpenTap],
    /// The signal state QEMU gets.
    pub signals: &'a InheritedSignals,
}

impl Config {
    /// The template every generation is started from.
    pub fn template(&self) -> Template<'_> {
        Template {
            argv0: &self.argv0,
            base: &self.base,
            ram: &self.ram,
            taps: &self.taps,
            signals: &self.signals,
        }
    }
}

/// How long each wait of an upgrade may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// A new QEMU's start: fork to executing QEMU to its monitor's answers.
    pub start: Duration,
    /// Any single monitor command.
    pub step: Duration,
    /// From holding monitor clients to the new QEMU running the guest, when RAM is shared
    /// and the stream carries device state only: it bounds the guest's pause when a new
    /// QEMU hangs.
    pub migration: Duration,
    /// Added to [`Timeouts::migration`] per GiB of guest RAM when RAM crosses in the stream.
    pub per_gib: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            start: Duration::from_secs(30),
            step: Duration::from_secs(10),
            migration: Duration::from_secs(5),
            per_gib: Duration::from_secs(30),
        }
    }
}

/// Environment variable: [`Timeouts::start`] in seconds.
pub const ENV_START_TIMEOUT: &str = "QEMU_LIVEUPGRADE_START_TIMEOUT";
/// Environment variable: [`Timeouts::migration`] in seconds.
pub const ENV_MIGRATION_TIMEOUT: &str = "QEMU_LIVEUPGRADE_MIGRATION_TIMEOUT";
/// The longest timeout accepted: an hour.
const MAX_TIMEOUT_S: f64 = 3600.0;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A timeout is not a number of seconds above 0 and at most an hour.
    #[error("{name}={value}: expected seconds, more than 0 and at most 3600")]
    Timeout {
        /// The variable.
        name: &'static str,
        /// What it held.
        value: String,
    },
    /// The test fault hook is malformed.
    #[error(transparent)]
    Fault(#[from] crate::fault::FaultError),
}

/// What the supervisor takes from its environment, parsed once at start so that a bad value
/// is an error the caller sees, never a surprise during an upgrade.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Deadlines of the upgrade's waits.
    pub timeouts: Timeouts,
    /// A fault the tests inject at one phase of the first upgrade.
    pub fault: Option<crate::fault::Fault>,
}

impl Settings {
    /// Reads the settings from `var` (the process environment: `std::env::var_os`).
    pub fn from_env(var: impl Fn(&str) -> Option<OsString>) -> Result<Settings, SettingsError> {
        let mut timeouts = Timeouts::default();
        if let Some(t) = seconds(&var, ENV_START_TIMEOUT)? {
            timeouts.start = t;
        }
        if let Some(t) = seconds(&var, ENV_MIGRATION_TIMEOUT)? {
            timeouts.migration = t;
        }
        let fault = match var(crate::fault::ENV_FAULT).filter(|v| !v.is_empty()) {
            Some(v) => Some(crate::fault::Fault::parse(&v.to_string_lossy())?),
            None => None,
        };
        Ok(Settings { timeouts, fault })
    }
}

/// A duration in seconds from variable `name`, if set.
fn seconds(
    var: &impl Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<Option<Duration>, SettingsError> {
    let Some(raw) = var(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value = raw.to_string_lossy().into_owned();
    match value.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= MAX_TIMEOUT_S => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(SettingsError::Timeout { name, value }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn timeouts_parse_or_fail_with_the_variable_named() {
        let s = Settings::from_env(env(&[(ENV_START_TIMEOUT, "2.5")])).unwrap();
        assert_eq!(s.timeouts.start, Duration::from_millis(2500));
        assert_eq!(s.timeouts.migration, Timeouts::default().migration);
        for bad in ["inf", "1e300", "0", "-1", "NaN", "ten", "3601"] {
            let err = Settings::from_env(env(&[(ENV_MIGRATION_TIMEOUT, bad)])).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(ENV_MIGRATION_TIMEOUT), "{text}");
            assert!(text.contains(bad), "{text}");
        }
        assert_eq!(
            Settings::from_env(env(&[])).unwrap().timeouts,
            Timeouts::default()
        );
    }
}
