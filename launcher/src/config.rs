//! Everything one VM's supervisor is started with, decided before its loop runs.

use std::ffi::OsString;
use std::os::fd::OwnedFd;

use crate::child::InheritedSignals;
use crate::daemonize::Daemon;
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
