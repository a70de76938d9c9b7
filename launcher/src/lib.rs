//! The engine behind qemu-liveupgrade.
//!
//! A thin supervisor stands where `qemu-system-*` stood. It starts the real QEMU as its child,
//! keeps what the guest and its managers see stable (pid, fds, monitors), and on SIGUSR2 moves
//! the running guest into a freshly started QEMU by local migration.
//!
//! Modules, one concern each:
//! - [`cmdline`]: QEMU's command-line grammar, parsed losslessly and printed back.
//! - [`resources`]: what a command line refers to that must stay stable (fds, sockets, RAM).
//! - [`resolve`]: finding the real QEMU binary; [`installed`]: whether a VM runs the one
//!   installed now.
//! - [`child`]: fork/exec of one QEMU generation with an explicit fd layout.
//! - [`qmp`]: QMP framing over the launcher's private monitor.
//! - [`relay`]: QEMU output copied through the launcher; [`stdio`]: the launcher's own
//!   stdout and stderr, written without waiting.
//! - [`tapguard`]: a starting QEMU kept from resetting the VM's taps; [`taps`]: taps opened
//!   by name once, for every generation.
//! - [`generation`]: the argv and fds one QEMU generation gets.
//! - [`memfd`]: guest RAM the launcher owns and every generation maps.
//! - [`monitors`], [`proxy`]: monitor and chardev sockets the launcher serves across generations;
//!   [`listeners`]: every listening socket of the VM (displays, TCP ports, host forwards) and
//!   what cannot be kept.
//! - [`ptys`]: ptys the launcher holds and relays, so that their path outlives each QEMU.
//! - [`supervisor`]: the event loop: signals, reaping, exit-status mirroring; [`spawn`]: a
//!   generation started from it with every owner's fds; [`token`]: what wakes the loop;
//!   [`config`]: what the supervisor is started with.
//! - [`fdio`]: fd plumbing written once: SCM_RIGHTS, EINTR retries, waiting with a deadline.
//! - [`signals`]: what the launcher does with each signal, as QEMU does.
//! - [`daemonize`]: `-daemonize` and `-pidfile` done by the launcher itself.
//! - [`upgrade`]: the live upgrade, step by step; [`threads`]: vCPU placement carried over,
//!   by the [`placer`] service where the launcher is not root;
//!   [`translate`]: a later generation's argv for another QEMU version; [`blockstats`]: disk
//!   counters carried over.
//! - [`control`]: the per-VM control socket behind `qemu-liveupgrade upgrade|status|list`;
//!   [`rundir`]: the directory it lives in, checked before use; [`discover`]: the VMs a
//!   command can reach.
//! - `props`: the properties every parser of outside input keeps, for fuzzing and property
//!   tests.
//! - [`plan`]: the `plan` report; [`verdict`]: whether a VM can be upgraded, and why not.
//! - [`handover`]: the supervisor upgrading itself, by `execve` in place, its whole state
//!   handed to the new binary; [`identity`]: which release and build this launcher is.

pub mod blockstats;
pub mod child;
pub mod cmdline;
pub mod config;
pub mod control;
pub mod daemonize;
pub mod discover;
pub mod fault;
pub mod fdio;
pub mod generation;
pub mod handover;
pub mod heap;
pub mod identity;
pub mod installed;
pub mod journal;
pub mod json;
pub mod listeners;
pub mod memfd;
pub mod monitors;
pub mod placer;
pub mod plan;
pub mod preflight;
#[cfg(any(test, feature = "fuzzing"))]
pub mod props;
pub mod proxy;
pub mod ptys;
pub mod qmp;
pub mod relay;
pub mod resolve;
pub mod resources;
pub mod rundir;
pub mod signals;
pub mod spawn;
pub mod stdio;
pub mod supervisor;
pub mod tapguard;
pub mod taps;
pub mod threads;
pub mod token;
pub mod translate;
pub mod upgrade;
pub mod verdict;

/// An error and its causes on one line, `outer: inner: innermost`, as the launcher reports
/// failures (one line, QEMU-style).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Writes `line` and a line end to stderr. Unlike `eprintln!`, it never panics (stderr
/// closed, full disk, a reader gone) and never blocks the caller: a stderr nobody drains
/// keeps the line in a bounded queue, or drops it, counted ([`stdio`]). Returns whether the
/// line went out or waits to.
pub fn stderr_line(line: &str) -> bool {
    stdio::line(line)
}
