//! `qemu-liveupgrade check`: a running VM is preflighted against a new QEMU (the new QEMU is
//! started with the translated argv and `-incoming defer`, hot-plugged devices replayed, then
//! ended) while its guest keeps beating on the old QEMU, which never stops.

use std::process::Command;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::{children, output_within, qemu_child};
use qemu_liveupgrade_tests::{cli_bin, qemu_build, wait_until, Heartbeat};
use serde_json::{json, Value};

/// Runs `qemu-liveupgrade check PID --to VERSION --json`; returns its exit status and report.
fn check(vm: &UpgradeVm, to: &str) -> (bool, Value) {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["check", "--json", &vm.vm.pid().to_string(), "--to"])
        .arg(qemu_build(to))
        .env("QEMU_LIVEUPGRADE_RUNDIR", vm.rundir());
    let out = output_within(cmd, Duration::from_secs(90));
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "check printed {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// Runs a check and asserts the guest ran on the same QEMU throughout: never stopped (no STOP
/// or RESUME on a monitor), heartbeats consecutive and arriving while the check ran, memory
/// intact. Prints the longest heartbeat gap.
fn check_untouched(vm: &UpgradeVm, to: &str) -> (bool, Value) {
    let mut qmp = vm.connect();
    let before = qemu_child(vm.vm.pid()).expect("a QEMU");
    let from = Instant::now();
    let result = check(vm, to);
    let until = Instant::now();
    // The checked QEMU and the probe's processes were killed; the shim reaps them as it goes.
    wait_until(
        Duration::from_secs(10),
        "the shim to reap what the check started",
        || children(vm.vm.pid()) == [before],
    );
    let events = qmp.events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "STOP" || e["event"] == "RESUME"),
        "{events:?}"
    );
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    let beats: Vec<Heartbeat> = vm
        .vm
        .heartbeats()
        .into_iter()
        .filter(|h| h.at >= from && h.at <= until)
        .collect();
    assert!(!beats.is_empty(), "no heartbeat while the check ran");
    for pair in beats.windows(2) {
        assert_eq!(pair[1].counter, pair[0].counter + 1, "heartbeats lost");
    }
    println!(
        "check took {:?}, {} heartbeats, longest gap {:?}",
        until - from,
        beats.len(),
        vm.vm.max_gap_between(from, until)
    );
    vm.assert_guest_healthy(300);
    result
}

#[test]
fn an_upgradable_vm_checks_ok_and_keeps_running() {
    let vm = UpgradeVm::start("7.2.22", 256, &["-no-hpet"]);
    vm.assert_guest_healthy(200);
    // A device hot-plugged through the user's monitor is replayed into the checked QEMU.
    // (QEMU serves one client per QMP socket at a time: this one leaves before the check.)
    vm.connect().execute(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng0"}),
    );
    let (ok, report) = check_untouched(&vm, "10.0.2");
    assert!(ok, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["started"], true, "{report}");
    assert_eq!(report["version"], "10.0.2", "{report}");
    assert_eq!(report["replayed"], 1, "{report}");
    assert_eq!(report["translations"][0]["was"], "-no-hpet", "{report}");
    assert_eq!(report["verdict"]["reasons"], json!([]), "{report}");
    // Nothing was upgraded, and a real upgrade still works after it.
    let status = qemu_liveupgrade_tests::shim::cli_status(&vm.rundir(), vm.vm.pid());
    assert_eq!(
        (status["generation"].as_u64(), status["version"].as_str()),
        (Some(1), Some("7.2.22"))
    );
    vm.install("10.0.2");
    let upgraded = vm.upgrade();
    assert_eq!(upgraded["result"], "ok", "{upgraded}");
    vm.assert_guest_healthy(300);
}

#[test]
fn a_vm_that_cannot_move_is_named_and_keeps_running() {
    let vm = UpgradeVm::start("7.2.22", 256, &["-portrait"]);
    vm.assert_guest_healthy(200);
    let (ok, report) = check_untouched(&vm, "10.0.2");
    assert!(!ok, "check exits 1: {report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(
        report["verdict"]["reasons"][0]["option"], "-portrait",
        "{report}"
    );
    assert!(
        report.get("started").is_none(),
        "nothing was started: {report}"
    );
}

#[test]
fn a_new_qemu_that_refuses_the_machine_is_caught() {
    // Started on 10.0.2, the machine is pinned to pc-i440fx-10.0, which 7.2 lacks.
    let vm = UpgradeVm::start("10.0.2", 256, &[]);
    let (ok, report) = check_untouched(&vm, "7.2.22");
    assert!(!ok, "{report}");
    let reason = &report["verdict"]["reasons"][0];
    assert!(
        reason["option"]
            .as_str()
            .unwrap_or_default()
            .starts_with("-machine pc-i440fx-10.0"),
        "{report}"
    );
}
