//! The heartbeat guest itself, under the distribution's QEMU (no shim): it must
//! boot fast, beat about every millisecond, check its memory without false
//! alarms, and be able to fail. Every whole-process test relies on these.

use std::process::Command;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::{
    guest_argv, guest_argv_append, system_qemu, tempdir, wait_until, Qmp, Vm,
};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

fn spawn_guest(argv: Vec<String>) -> Vm {
    let mut cmd = Command::new(system_qemu());
    cmd.args(argv);
    Vm::spawn(cmd)
}

fn ready_mem(vm: &Vm) -> u64 {
    let text = vm.stdout_text();
    let rest = text.split("READY mem=").nth(1).expect("READY line");
    rest.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("READY mem=<bytes>")
}

#[test]
fn heartbeats_every_millisecond_with_clean_memory() {
    let vm = spawn_guest(guest_argv(256));
    vm.wait_ready(READY_TIMEOUT);
    assert_eq!(
        ready_mem(&vm),
        256 << 20,
        "mem= on the command line sets the tested size"
    );

    let start = Instant::now();
    let beats = vm.wait_heartbeats_after(start, 2000, Duration::from_secs(10));
    let (first, last) = (beats[0], beats[beats.len() - 1]);
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1].counter,
            pair[0].counter + 1,
            "heartbeat counter skipped"
        );
    }
    // The rate is the guest's clock against a TCG vCPU on a shared host: a benchmark
    // figure, printed here, not asserted.
    let secs = (last.at - first.at).as_secs_f64();
    let rate = (last.counter - first.counter) as f64 / secs;
    eprintln!(
        "heartbeat rate {rate:.0}/s, longest gap {:?}",
        vm.max_gap_between(first.at, last.at)
    );

    // The check really ran over all of RAM, several times.
    assert!(
        last.pass >= 3,
        "only {} passes over guest RAM in {secs:.1} s",
        last.pass
    );
    let errors = vm.errors();
    assert!(
        errors.is_clean(),
        "memory check failed without cause: {errors:?}"
    );
}

#[test]
fn reports_a_corrupted_word_and_keeps_going() {
    let vm = spawn_guest(guest_argv_append(64, "selftest-corrupt"));
    vm.wait_ready(READY_TIMEOUT);
    wait_until(
        Duration::from_secs(10),
        "the guest to report the corrupted word",
        || vm.errors().max_err > 0,
    );
    let errors = vm.errors();
    assert_eq!(errors.err_lines.len(), 1, "{errors:?}");
    // The guest damages the page-aligned word halfway through 2 MiB..64 MiB.
    assert!(
        errors.err_lines[0].starts_with("ERR addr=0x02100000 "),
        "{errors:?}"
    );

    // It goes on beating and checking; the word was rewritten, so no new errors.
    let now = Instant::now();
    let pass = vm.last_heartbeat().unwrap().pass;
    wait_until(Duration::from_secs(10), "two more passes", || {
        vm.last_heartbeat().unwrap().pass >= pass + 2
    });
    assert!(vm.wait_heartbeats_after(now, 1, Duration::from_secs(1))[0].err >= 1);
    assert_eq!(vm.errors().max_err, 1, "{:?}", vm.errors());
}

#[test]
fn multiboot_memory_size_is_used_without_mem_option() {
    let mut argv = guest_argv(128);
    let at = argv.iter().position(|a| a == "-append").expect("-append");
    argv.drain(at..at + 2);
    let vm = spawn_guest(argv);
    vm.wait_ready(READY_TIMEOUT);
    // QEMU's multiboot mem_upper stops short of the end of RAM by a little.
    let mem = ready_mem(&vm);
    assert!((127 << 20..=128 << 20).contains(&mem), "READY mem={mem}");
    vm.wait_heartbeats_after(Instant::now(), 100, Duration::from_secs(5));
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}

#[test]
fn heartbeats_stop_while_paused_and_resume() {
    let dir = tempdir();
    let sock = dir.join("qmp.sock");
    let mut argv = guest_argv(64);
    argv.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ]);
    let vm = spawn_guest(argv);
    let mut qmp = Qmp::connect_unix(&sock, Duration::from_secs(10));
    vm.wait_ready(READY_TIMEOUT);
    vm.wait_heartbeats_after(Instant::now(), 50, Duration::from_secs(5));

    let before = vm.last_heartbeat().unwrap();
    qmp.execute("stop", json!({}));
    let stopped = Instant::now();
    qmp.wait_event("STOP", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "paused");
    qmp.execute("cont", json!({}));
    qmp.wait_event("RESUME", Duration::from_secs(5));
    let resumed = Instant::now();

    let after = vm.wait_heartbeats_after(resumed, 50, Duration::from_secs(5));
    let gap = vm.max_gap_between(before.at, after[49].at);
    assert!(
        gap >= Duration::from_millis(250),
        "no pause seen: longest gap {gap:?}"
    );
    assert!(
        gap < resumed - before.at + Duration::from_millis(200),
        "gap {gap:?} longer than the pause"
    );
    // The counter lives in guest RAM: it continues where it stopped.
    let beats = vm.heartbeats();
    let i = beats.iter().position(|h| h.at > stopped).unwrap();
    for pair in beats[i.saturating_sub(1)..].windows(2) {
        assert_eq!(pair[1].counter, pair[0].counter + 1);
    }
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}

/// Starts the guest with a QMP socket in `dir` and `extra` QEMU arguments; waits for READY.
fn spawn_guest_with_qmp(dir: &std::path::Path, extra: &[&str]) -> (Vm, Qmp) {
    let sock = dir.join("qmp.sock");
    let mut argv = guest_argv(64);
    argv.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let vm = spawn_guest(argv);
    let qmp = Qmp::connect_unix(&sock, Duration::from_secs(10));
    vm.wait_ready(READY_TIMEOUT);
    vm.wait_heartbeats_after(Instant::now(), 20, Duration::from_secs(5));
    (vm, qmp)
}

/// The power button (QMP `system_powerdown`, libvirt's `virsh shutdown`): the guest says
/// POWEROFF and asks for ACPI soft-off, which QEMU reports as a guest-initiated shutdown and
/// ends with status 0.
#[test]
fn power_button_powers_the_guest_off() {
    let dir = tempdir();
    let (mut vm, mut qmp) = spawn_guest_with_qmp(dir.path(), &[]);
    assert!(
        vm.stdout_text().contains("acpi_pm=0x00000600"),
        "PM block not where SeaBIOS puts it on pc: {}",
        vm.stdout_text()
            .lines()
            .find(|l| l.contains("BOOT"))
            .unwrap_or("")
    );
    qmp.execute("system_powerdown", json!({}));
    // QEMU sends SHUTDOWN before it closes the connection and exits.
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::from_secs(5));
    assert_eq!(shutdown["data"]["guest"], true, "{shutdown}");
    assert_eq!(shutdown["data"]["reason"], "guest-shutdown", "{shutdown}");
    vm.wait_stdout_contains("POWEROFF", Duration::from_secs(5));
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "QEMU after a guest poweroff");
}

/// Under `-no-shutdown` (as libvirt runs QEMU) the powered-off guest stays in the shutdown
/// state, and its heartbeats stop.
#[test]
fn power_button_with_no_shutdown_leaves_qemu_in_shutdown_state() {
    let dir = tempdir();
    let (vm, mut qmp) = spawn_guest_with_qmp(dir.path(), &["-no-shutdown"]);
    qmp.execute("system_powerdown", json!({}));
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::from_secs(5));
    assert_eq!(shutdown["data"]["reason"], "guest-shutdown", "{shutdown}");
    vm.wait_stdout_contains("POWEROFF", Duration::from_secs(5));
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "shutdown");
    let last = vm.last_heartbeat().expect("heartbeats").counter;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vm.last_heartbeat().unwrap().counter,
        last,
        "beats after poweroff"
    );
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}

/// PCI hot-unplug on `pc` needs the guest's consent (its ACPI _EJ0): the guest ejects the
/// slot QEMU asks for, so `device_del` (libvirt's `detach-device`) completes with
/// DEVICE_DELETED and the device is gone.
#[test]
fn guest_ejects_a_device_on_device_del() {
    let dir = tempdir();
    let (vm, mut qmp) = spawn_guest_with_qmp(dir.path(), &[]);
    let pci_ids = |qmp: &mut Qmp| -> Vec<String> {
        let buses = qmp.execute("query-pci", json!({}));
        buses[0]["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .filter_map(|d| d["qdev_id"].as_str().map(str::to_owned))
            .collect()
    };
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null0", "size": 1 << 20}),
    );
    qmp.execute(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "null0", "id": "disk0"}),
    );
    assert!(pci_ids(&mut qmp).contains(&"disk0".to_string()));
    qmp.execute("device_del", json!({"id": "disk0"}));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let event = qmp.wait_event("DEVICE_DELETED", deadline - Instant::now());
        if event["data"]["device"] == "disk0" {
            break;
        }
    }
    vm.wait_stdout_contains("EJECT slots=", Duration::from_secs(1));
    assert!(!pci_ids(&mut qmp).contains(&"disk0".to_string()));
    vm.wait_heartbeats_after(Instant::now(), 20, Duration::from_secs(5));
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}
