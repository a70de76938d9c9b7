//! Cross-version command lines against the real Debian builds: a VM started on QEMU 7.2.22
//! with options QEMU 10.0 removed moves to 10.0.2 and back with its argv translated each way,
//! and one whose option has no equivalent in the new QEMU is refused before anything starts.

use std::time::Instant;

use qemu_liveupgrade_tests::liveupgrade::{version, UpgradeVm};
use qemu_liveupgrade_tests::shim::{children, qemu_child};
use serde_json::{json, Value};

/// The `was` of each translation in an upgrade report.
fn translated(report: &Value) -> Vec<String> {
    report["translations"]
        .as_array()
        .unwrap_or_else(|| panic!("no translations in {report}"))
        .iter()
        .map(|t| t["was"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The machine's hpet and acpi settings as the running QEMU has them.
fn hpet_and_acpi(vm: &UpgradeVm) -> (Value, Value) {
    let mut qmp = vm.connect();
    let get = |qmp: &mut qemu_liveupgrade_tests::Qmp, property: &str| {
        qmp.execute("qom-get", json!({"path": "/machine", "property": property}))
    };
    (get(&mut qmp, "hpet"), get(&mut qmp, "acpi"))
}

#[test]
fn no_hpet_no_acpi_go_to_10_0_and_back_to_7_2() {
    // libvirt 9.0 writes these for QEMU 7.2; QEMU 9.0 removed both options.
    let vm = UpgradeVm::start("7.2.22", 256, &["-no-hpet", "-no-acpi"]);
    vm.assert_guest_healthy(200);
    assert_eq!(hpet_and_acpi(&vm), (json!(false), json!("off")));

    vm.install("10.0.2");
    let report = vm.upgrade();
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["to"]["version"], "10.0.2", "{report}");
    assert_eq!(translated(&report), ["-no-hpet", "-no-acpi"], "{report}");
    let now = report["translations"][0]["now"]
        .as_str()
        .unwrap_or_default();
    assert!(
        now.starts_with("-machine pc-i440fx-7.2,") && now.ends_with("hpet=off,acpi=off"),
        "{report}"
    );
    // The same guest ABI: HPET and ACPI still off, memory intact (the guest checks all of it).
    assert_eq!(hpet_and_acpi(&vm), (json!(false), json!("off")));
    vm.assert_guest_healthy(500);

    vm.install("7.2.22");
    let report = vm.upgrade();
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["to"]["version"], "7.2.22", "{report}");
    assert!(
        translated(&report).is_empty(),
        "7.2 takes the argv as given: {report}"
    );
    assert_eq!(hpet_and_acpi(&vm), (json!(false), json!("off")));
    vm.assert_guest_healthy(500);
}

#[test]
fn an_option_without_equivalent_is_refused_before_anything_starts() {
    // -portrait (7.2) went in QEMU 9.2 with nothing in its place.
    let vm = UpgradeVm::start("7.2.22", 256, &["-portrait"]);
    vm.assert_guest_healthy(200);
    let mut qmp = vm.connect();
    let before = qemu_child(vm.vm.pid()).expect("a QEMU");
    vm.install("10.0.2");
    let asked = Instant::now();
    let report = vm.upgrade();
    let answered = Instant::now();
    assert_eq!(report["result"], "failed", "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("cannot upgrade this VM: -portrait: QEMU 10.0.2 at ")
            && reason.contains("does not accept it, and it has no equivalent there"),
        "{reason}"
    );
    assert_eq!(report["generation"], 1, "{report}");
    // Untouched: the same QEMU, never stopped (no STOP or RESUME), beating throughout.
    assert_eq!(qemu_child(vm.vm.pid()), Some(before));
    assert_eq!(children(vm.vm.pid()).len(), 1, "one QEMU");
    let events: Vec<Value> = qmp.events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "STOP" || e["event"] == "RESUME"),
        "{events:?}"
    );
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "7.2.22");
    vm.assert_guest_healthy(300);
    let gap = vm.vm.max_gap_between(asked, answered);
    println!("longest heartbeat gap while the upgrade was refused: {gap:?}");
}
