//! The engine behind qemu-liveupgrade.
//!
//! A thin supervisor stands where `qemu-system-*` stood. It starts the real QEMU as its child,
//! keeps what the guest and its managers see stable (pid, fds, monitors), and on SIGUSR2 moves
//! the running guest into a freshly started QEMU by local migration.
//!
//! Modules, one concern each:
//! - [`cmdline`]: QEMU's command-line grammar, parsed losslessly and printed back.
//! - [`resources`]: what a command line refers to that must stay stable (fds, sockets, RAM).
//! - [`resolve`]: finding the real QEMU binary.
//! - [`child`]: fork/exec of one QEMU generation with an explicit fd layout.
//! - [`qmp`]: QMP framing over the launcher's private monitor.
//! - [`generation`]: the argv and fds one QEMU generation gets.
//! - [`supervisor`]: the event loop: signals, reaping, exit-status mirroring.
//! - [`daemonize`]: `-daemonize` and `-pidfile` done by the launcher itself.
//! - [`plan`]: the `plan` report.

pub mod child;
pub mod cmdline;
pub mod daemonize;
pub mod generation;
pub mod plan;
pub mod qmp;
pub mod resolve;
pub mod resources;
pub mod supervisor;
