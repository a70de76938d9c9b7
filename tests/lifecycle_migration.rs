//! Live migration to another host, with libvirt's argv on both sides: a VM under the shim
//! migrates out to a plain QEMU, and a plain QEMU's VM migrates in to a shim, over loopback
//! TCP, the disk shared (as hosts share storage). The launcher's memfd RAM must not change
//! what the stream carries: a RAM block the other side does not know by name, or pages
//! missing, and the migration fails or the heartbeat guest, which keeps checking all of its
//! RAM, reports errors.
//!
//! On QEMU 10.0.2: QEMU 7.2 as a plain-migration source under TCG loses guest writes once a
//! migration needs several dirty-bitmap passes, shim or not (FACTS.md).

use std::time::Duration;

use qemu_liveupgrade_tests::lifecycle::{
    free_port, libvirt_argv, run_state, unlimited_bandwidth, wait_migration, wait_run_state, LcVm,
    Runner, Start,
};
use qemu_liveupgrade_tests::lifecycle_domain::create_qcow2;
use qemu_liveupgrade_tests::tempdir;
use serde_json::{json, Value};

const VERSION: &str = "10.0.2";
const MEM_MIB: u64 = 128;

/// Starts `from` as libvirt starts a domain (`-S`, then `cont`), a destination `to` with the
/// same argv and `-incoming tcp:`, migrates, and checks the guest from inside on the other
/// side: it goes on counting and its memory check stays clean.
fn migrate(from: Runner, to: Runner) {
    let dir = tempdir();
    let disk = dir.join("disk.qcow2");
    create_qcow2(&disk, "16M");
    let src = LcVm::start(Start {
        runner: from,
        version: VERSION,
        argv: libvirt_argv(MEM_MIB, &disk),
        fds: Vec::new(),
    });
    let mut qmp = src.qmp();
    qmp.execute("cont", Value::Null);
    src.vm.wait_ready(Duration::from_secs(60));
    src.assert_alive(20, &format!("the source ({from})"));

    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut argv = libvirt_argv(MEM_MIB, &disk);
    argv.extend(["-incoming".into(), uri.clone()]);
    let dst = LcVm::start(Start {
        runner: to,
        version: VERSION,
        argv,
        fds: Vec::new(),
    });
    let mut dqmp = dst.qmp();
    assert_eq!(run_state(&mut dqmp), "inmigrate");
    unlimited_bandwidth(&mut qmp);
    qmp.execute("migrate", json!({ "uri": uri }));
    let info = wait_migration(&mut qmp, &format!("migration {from} -> {to}"));
    eprintln!(
        "lifecycle_migration: {from} -> {to}: {} bytes, downtime {} ms",
        info["ram"]["transferred"], info["downtime"]
    );
    let last = src.vm.last_heartbeat().expect("source beats").counter;
    // As libvirt does once the migration is over: the destination runs the guest.
    wait_run_state(&mut dqmp, "paused", Duration::from_secs(60));
    dqmp.execute("cont", Value::Null);
    let what = format!("on {to} after migrating from {from}");
    let beats = dst.assert_alive(50, &what);
    assert!(
        beats[0].counter > last.saturating_sub(3) && beats[0].counter <= beats[49].counter,
        "{what}: the guest started over (first heartbeat {}, last before {last})",
        beats[0].counter
    );
    let first = dst.vm.heartbeats()[0].counter;
    assert!(
        first > last.saturating_sub(3),
        "{what}: first heartbeat {first}, last before {last}"
    );
    assert_eq!(
        run_state(&mut qmp),
        "postmigrate",
        "the source stays behind, stopped"
    );
}

#[test]
fn a_shim_vm_migrates_out_to_plain_qemu() {
    migrate(Runner::Shim, Runner::Plain);
}

#[test]
fn a_plain_qemu_vm_migrates_in_to_a_shim() {
    migrate(Runner::Plain, Runner::Shim);
}
