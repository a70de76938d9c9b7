//! Harness for the whole-process tests in `tests/*.rs`.
//!
//! Those tests run the real binaries (`qemu-liveupgrade-shim`, `qemu-liveupgrade`)
//! against real QEMU under TCG and the heartbeat guest of `tests/guest`, which
//! proves from the inside that it keeps running (a serial line about every
//! millisecond) and that its RAM is intact (a rolling pattern check). This crate
//! finds those binaries ([`paths`]), runs and watches processes ([`Vm`]), talks
//! QMP ([`Qmp`]) and cleans up after itself ([`TempDir`]).
//!
//! Every helper fails loudly: a missing binary or QEMU build is a panic that says
//! how to get it, never a silently skipped test.

pub mod des;
pub mod handover;
pub mod libvirt;
pub mod libvirt_upgrade;
pub mod lifecycle;
pub mod lifecycle_domain;
pub mod lifecycle_ops;
pub mod linux;
pub mod liveupgrade;
pub mod paths;
pub mod qmp;
pub mod shim;
pub mod tempdir;
pub mod vhost_user;
pub mod viewers;
pub mod virt_install;
pub mod vm;

use std::thread;
use std::time::{Duration, Instant};

pub use paths::{
    cli_bin, guest_elf, qemu_build, repo_root as repo_root_path, shim_bin, system_qemu,
};
pub use qmp::Qmp;
pub use tempdir::{tempdir, TempDir};
pub use vm::{GuestErrors, Heartbeat, Vm};

/// Calls `f` every 10 ms until it returns true; panics naming `what` if that
/// takes longer than `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// QEMU arguments for the standard test VM: the heartbeat guest on TCG, `pc`
/// machine, `mem_mib` MiB of RAM, serial console on stdout, nothing else.
///
/// The guest is told its RAM size with `mem=` so it tests all of it: the
/// multiboot `mem_upper` QEMU reports stops 128 KiB short of the end. Sizes
/// from 3.5 GiB up are split around the PCI hole on `pc`; there the guest falls
/// back to `mem_upper` (RAM below 4 GiB).
pub fn guest_argv(mem_mib: u64) -> Vec<String> {
    guest_argv_append(mem_mib, "")
}

/// Moves the guest's serial console from stdout to a unix socket server at `path` (chardev
/// `con0`, not waiting for a client), for tests whose VM's stdout is not the console.
pub fn serial_on_socket(argv: &mut Vec<String>, path: &std::path::Path) {
    let serial = argv
        .iter()
        .position(|a| a == "stdio")
        .expect("-serial stdio");
    argv[serial] = "chardev:con0".into();
    argv.extend([
        "-chardev".into(),
        format!("socket,id=con0,path={},server=on,wait=off", path.display()),
    ]);
}

/// [`guest_argv`] with more words for the guest's command line: `stride=<bytes>`
/// (distance between checked words, default 64), `hb_us=<micros>` (heartbeat
/// period, default 1000), `selftest-corrupt` (damage one word after READY).
pub fn guest_argv_append(mem_mib: u64, extra: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["-accel", "tcg", "-machine", "pc", "-m"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(mem_mib.to_string());
    argv.extend(
        ["-nodefaults", "-nographic", "-serial", "stdio", "-kernel"]
            .iter()
            .map(|s| s.to_string()),
    );
    argv.push(guest_elf().display().to_string());
    let mut append = if mem_mib < 3584 {
        format!("mem={mem_mib}M")
    } else {
        String::new()
    };
    if !extra.is_empty() {
        if !append.is_empty() {
            append.push(' ');
        }
        append.push_str(extra);
    }
    if !append.is_empty() {
        argv.push("-append".to_string());
        argv.push(append);
    }
    argv
}
