//! Upgrades that must fail, and leave the guest exactly where it was: on the old QEMU, in the
//! state it had, memory intact, heartbeats flowing, migration settings as the user had them,
//! and one report saying why.
//!
//! The broken "new QEMU"s are small scripts only where a real QEMU cannot be made to fail that
//! way (missing, crashing at start, hanging); a failed migration and an incompatible machine
//! type come from real QEMU builds.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use qemu_liveupgrade_tests::liveupgrade::{capabilities, version, UpgradeVm};
use qemu_liveupgrade_tests::shim::{children, qemu_child};
use qemu_liveupgrade_tests::{guest_argv, qemu_build};
use serde_json::{json, Value};

/// Asserts the upgrade failed with `reason` in its report and the VM is untouched.
fn assert_rolled_back(vm: &UpgradeVm, report: &Value, reason: &str, running_version: &str) {
    assert_eq!(report["result"], "failed", "{report}");
    let why = report["reason"].as_str().unwrap_or_default();
    assert!(why.contains(reason), "reason {why:?} lacks {reason:?}");
    assert_eq!(report["generation"], 1, "{report}");
    let mut qmp = vm.connect();
    assert_eq!(
        version(&qmp.execute("query-version", json!({}))),
        running_version
    );
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    let caps = capabilities(&mut qmp);
    assert_eq!(
        caps["x-ignore-shared"], false,
        "launcher's capability left behind"
    );
    assert_eq!(caps["events"], false, "launcher's capability left behind");
    assert_eq!(
        children(vm.vm.pid()).len(),
        1,
        "exactly one QEMU runs the guest"
    );
    vm.assert_guest_healthy(500);
}

/// An executable script in the test's directory.
fn script(vm: &UpgradeVm, name: &str, body: &str) -> PathBuf {
    let path = vm.dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn new_binary_missing() {
    let vm = UpgradeVm::start("7.2.22", 256, &[]);
    vm.install_path(&vm.dir.join("no-such-qemu"));
    let report = vm.upgrade();
    assert_rolled_back(&vm, &report, "cannot find the new QEMU", "7.2.22");
}

#[test]
fn new_binary_crashes_at_start() {
    let vm = UpgradeVm::start("7.2.22", 256, &[]);
    vm.install_path(&script(
        &vm,
        "crashing-qemu",
        "echo 'segfault, pretend' >&2; kill -SEGV $$",
    ));
    let report = vm.upgrade();
    assert_rolled_back(&vm, &report, "new QEMU did not start", "7.2.22");
}

#[test]
fn new_binary_hangs_past_the_deadline() {
    let env = [("QEMU_LIVEUPGRADE_START_TIMEOUT", "2")];
    let vm = UpgradeVm::start_with("7.2.22", guest_argv(256), &[], &env);
    vm.install_path(&script(&vm, "hanging-qemu", "exec sleep 600"));
    let report = vm.upgrade();
    assert_rolled_back(&vm, &report, "timed out", "7.2.22");
}

#[test]
fn new_binary_lacks_the_machine_type() {
    // Started on 10.0.2, `-machine pc` is pinned to pc-i440fx-10.0, which 7.2 does not know.
    let vm = UpgradeVm::start("10.0.2", 256, &[]);
    vm.install("7.2.22");
    let report = vm.upgrade();
    // 7.2 is asked first and has no such type: refused before anything is started.
    assert_rolled_back(&vm, &report, "has no machine type pc-i440fx-10.0", "10.0.2");
}

#[test]
fn migration_fails_on_the_new_side() {
    // The new QEMU lacks a device the guest has, so it refuses the device state the old one
    // sends ("Unknown savevm section"): a real migration failure after the old QEMU stopped
    // the guest and sent everything.
    let vm = UpgradeVm::start("7.2.22", 256, &["-device", "virtio-rng-pci,id=rng0"]);
    let real = qemu_build("7.2.22");
    // A wrapper that runs the real 7.2.22 with argv minus the pair `-device virtio-rng-pci,..`.
    let body = format!(
        "prev=\nfor a; do shift\n  if [ \"$prev\" = -device ] && [ \"$a\" = virtio-rng-pci,id=rng0 ]; then prev=; continue; fi\n  [ -n \"$prev\" ] && set -- \"$@\" \"$prev\"\n  prev=$a\ndone\n[ -n \"$prev\" ] && set -- \"$@\" \"$prev\"\nexec {} \"$@\"",
        real.display()
    );
    vm.install_path(&script(&vm, "qemu-without-rng", &body));
    let before = qemu_child(vm.vm.pid()).unwrap();
    let report = vm.upgrade();
    assert_rolled_back(&vm, &report, "migration failed", "7.2.22");
    assert_eq!(
        qemu_child(vm.vm.pid()),
        Some(before),
        "the same QEMU runs the guest"
    );
    let mut qmp = vm.connect();
    let devices = qmp.execute("qom-list", json!({"path": "/machine/peripheral"}));
    assert!(devices.to_string().contains("rng0"), "{devices}");
}

#[test]
fn disk_in_an_fdset_is_refused_before_anything_is_tried() {
    // QEMU itself (7.2 and 10.0, plain migration too) keeps the image lock of a disk opened
    // through an fdset after migration, so the new QEMU cannot activate it and the old one
    // cannot take it back either. The upgrade is refused before anything is tried.
    let vm0 = tempfile_image();
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vm0)
        .unwrap();
    let ro = std::fs::File::open(&vm0).unwrap();
    let (fd_rw, fd_ro) = (rw.as_raw_fd(), ro.as_raw_fd());
    for fd in [fd_rw, fd_ro] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
    }
    let (a, b) = (format!("fd={fd_rw},set=7"), format!("fd={fd_ro},set=7"));
    let vm = UpgradeVm::start(
        "7.2.22",
        256,
        &[
            "-add-fd",
            &a,
            "-add-fd",
            &b,
            "-drive",
            "file=/dev/fdset/7,format=raw,if=virtio",
        ],
    );
    vm.install("10.0.2");
    let report = vm.upgrade();
    assert_rolled_back(&vm, &report, "opened through an fdset", "7.2.22");
    std::fs::remove_file(&vm0).unwrap();
}

fn tempfile_image() -> PathBuf {
    let path = std::env::temp_dir().join(format!("qlu-fdset-{}.raw", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    path
}
