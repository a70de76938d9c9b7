//! The supervisor upgrades itself under a real libvirtd, configured as Debian ships it
//! (`scripts/libvirtd`: the packaged `qemu.conf`, virtlogd): the shim runs the domain as
//! `libvirt-qemu`, and libvirt holds its own monitor connection through it.
//!
//! The launcher is handed over to build B and back ten times the way a package upgrade does
//! it: the new build renamed over the file the domain's `<emulator>` links to, then root's
//! `qemu-liveupgrade upgrade --supervisor NAME`, which finds the VM among libvirt-qemu's
//! control sockets. `virsh domstate` is polled about every 20 ms throughout: it must say
//! running every time. The pid libvirt tracks and QEMU's stay; libvirt's monitor connection
//! answers after every handover (it never saw the EOF that makes libvirt declare a domain
//! crashed); libvirtd logs no error; every handover's report lands in the domain log through
//! virtlogd; the guest's heartbeats in its serial file go on without a gap in their count.
//! Then a QEMU upgrade 7.2.22 -> 10.0.2 by SIGUSR2 still works.
//!
//! Talks to the one libvirtd of the machine: run it under `flock /work/locks/libvirt.lock`
//! where several people share one.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::handover::{builds, install, supervisor_upgrade};
use qemu_liveupgrade_tests::libvirt::{
    cli_status, domain_dir, ensure_libvirtd, install_emulator, libvirtd_errors,
    libvirtd_log_between, libvirtd_log_mark, reachable_copy, unique_name, Domain, HeartbeatDomain,
    SerialLog,
};
use qemu_liveupgrade_tests::libvirt_upgrade::{
    assert_packaged_setup, polling_domstate, upgrade_by_signal,
};
use qemu_liveupgrade_tests::liveupgrade::version;
use qemu_liveupgrade_tests::shim::qemu_child;
use qemu_liveupgrade_tests::{guest_elf, qemu_build, wait_until};
use serde_json::Value;

const ROUND_TRIPS: usize = 10;
const OLD: &str = "7.2.22";
const NEW: &str = "10.0.2";

/// The serial file's heartbeats go on: `n` more after now, counted without a gap.
fn assert_beating(serial: &Path, n: u64, when: &str) {
    let from = SerialLog::read(serial).last_counter();
    wait_until(
        Duration::from_secs(60),
        &format!("heartbeats {when}"),
        || SerialLog::last_beat(serial).is_some_and(|b| b.counter >= from + n),
    );
    if let Some(problem) = SerialLog::read(serial).problems() {
        panic!("the guest {when}: {problem}");
    }
}

#[test]
fn the_supervisor_hands_over_under_libvirt_and_libvirt_sees_nothing() {
    ensure_libvirtd();
    let b = builds();
    let dir = domain_dir();
    let real = dir.join("bin").join("qemu-system-x86_64.real");
    let emulator = install_emulator(dir.path(), Some(&qemu_build(OLD)));
    let installed = dir.join("bin").join("qemu-liveupgrade-shim");
    let kernel = reachable_copy(dir.path(), &guest_elf());
    let serial = dir.join("serial.log");
    let name = unique_name("qlu-handover");
    let xml = HeartbeatDomain {
        name: &name,
        emulator: &emulator,
        kernel: &kernel,
        serial: &serial,
        mem_mib: 128,
    }
    .xml();
    let dom = Domain::define(&name, &xml, &serial);
    dom.start();
    wait_until(Duration::from_secs(60), "the guest's READY line", || {
        SerialLog::read(&serial).boot_contains("READY mem=")
    });
    let pid = dom.pid();
    assert_packaged_setup(pid);
    let qemu = qemu_child(pid).expect("QEMU runs as the shim's child");
    assert_beating(&serial, 200, "before the handovers");
    let log_from = libvirtd_log_mark();
    let reason = dom.state_reason();

    for i in 0..ROUND_TRIPS * 2 {
        let (build, label) = match i % 2 {
            0 => (&b.b, "B"),
            _ => (&b.a, "A"),
        };
        install(build, &installed);
        let started = Instant::now();
        let ((report, ok), states) =
            polling_domstate(&name, || supervisor_upgrade(None, &name, None));
        let took = started.elapsed();
        assert!(ok, "handover {} to build {label} failed: {report}", i + 1);
        assert_eq!(report["pid"], pid.as_raw(), "{report}");
        assert_eq!(report["qemu_pid"], qemu.as_raw(), "{report}");
        assert_eq!(dom.pid(), pid, "the pid libvirt tracks");
        assert_eq!(qemu_child(pid), Some(qemu), "QEMU is the same child");
        let odd: Vec<&String> = states.iter().filter(|s| *s != "running").collect();
        assert!(
            states.len() >= 2 && odd.is_empty(),
            "virsh domstate during handover {}: {odd:?} of {} polls",
            i + 1,
            states.len()
        );
        // libvirt's own monitor connection, through the launcher that took it over.
        let status = dom
            .qmp("query-status", Value::Null)
            .unwrap_or_else(|e| panic!("libvirt's monitor after handover {}: {e}", i + 1));
        assert_eq!(status["status"], "running", "{status}");
        eprintln!(
            "handover {:>2} to {label}: {:.1} ms handed over, {:.1} ms in all, {} domstate polls",
            i + 1,
            report["handover_ms"].as_f64().unwrap_or(-1.0),
            took.as_secs_f64() * 1000.0,
            states.len()
        );
    }
    assert_beating(&serial, 200, "after the handovers");
    assert_eq!(dom.state_reason(), reason, "the domain's state reason");
    let status = cli_status(&name).expect("qemu-liveupgrade status as root");
    assert_eq!(
        status["supervisor"]["upgrades"],
        ROUND_TRIPS * 2,
        "{status}"
    );
    let logged = dom
        .reports()
        .into_iter()
        .filter(|r| r["qemu-liveupgrade"] == "supervisor-upgrade")
        .count();
    assert_eq!(
        logged,
        ROUND_TRIPS * 2,
        "supervisor reports in the domain log"
    );
    let errors = libvirtd_errors(&libvirtd_log_between(log_from, libvirtd_log_mark()), &name);
    assert!(
        errors.is_empty(),
        "libvirtd logged errors during the handovers:\n{}",
        errors.join("\n")
    );

    // The QEMU upgrade after them, the way the libvirt tests do it.
    let up = upgrade_by_signal(&dom, &real, &qemu_build(NEW));
    up.assert_ok(OLD, NEW);
    assert_eq!(
        version(
            &dom.qmp("query-version", Value::Null)
                .expect("query-version")
        ),
        NEW
    );
    assert_beating(&serial, 200, "after the QEMU upgrade");
}
