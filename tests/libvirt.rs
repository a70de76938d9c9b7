//! Under a real libvirtd: a domain whose `<emulator>` is the shim is upgraded live three
//! times (7.2.22 -> 10.0.2 -> 7.2.22 -> 10.0.2) by SIGUSR2 to the pid libvirt tracks, and
//! libvirt never notices: `virsh domstate` says running throughout, its own monitor
//! connection reaches the new QEMU, suspend/resume, hot-plug and unplug, shutdown and destroy
//! work as before, and libvirtd logs no error from the swaps. The heartbeat guest proves
//! from inside that it kept running with its memory intact.
//!
//! libvirt runs as Debian packages it (`scripts/libvirtd`: the packaged `qemu.conf`, virtlogd;
//! installed too, if missing): the shim and its QEMU run as `libvirt-qemu`, their stderr goes
//! through virtlogd into the domain log, where the upgrade reports are read. Where that setup
//! fails the test fails, naming what is missing.
//!
//! Checks that do not stop the rest from meaning something (hot-plug across an upgrade, the
//! log) are collected and reported together at the end, so one run shows everything that
//! is missing; the others stop the test where they fail.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::libvirt::{
    domain_dir, ensure_libvirtd, install_emulator, libvirtd_errors, libvirtd_log_between,
    reachable_copy, repoint, try_virsh, unique_name, virsh_ok, Domain, HeartbeatDomain, SerialLog,
};
use qemu_liveupgrade_tests::libvirt_upgrade::{
    assert_is_shim, assert_packaged_setup, upgrade_by_signal, Upgrade,
};
use qemu_liveupgrade_tests::liveupgrade::version;
use qemu_liveupgrade_tests::shim::is_running;
use qemu_liveupgrade_tests::{guest_elf, qemu_build, wait_until};
use serde_json::Value;

const OLD: &str = "7.2.22";
const NEW: &str = "10.0.2";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const BEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks whose failure does not end the test; reported together at the end.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            let what = what();
            eprintln!("libvirt test: FAILED: {what}");
            self.0.push(what);
        }
        ok
    }

    fn finish(self) {
        if !self.0.is_empty() {
            panic!(
                "{} check(s) failed:\n- {}",
                self.0.len(),
                self.0.join("\n- ")
            );
        }
    }
}

fn step(what: &str) {
    eprintln!("libvirt test: {what}");
}

/// SIGUSR2 to the pid libvirt tracks, after pointing the `.real` link at `to`.
fn upgrade(dom: &Domain, real: &Path, to: &str) -> Upgrade {
    let up = upgrade_by_signal(dom, real, &qemu_build(to));
    step(&format!(
        "upgrade to {to}: {} in {:?}, {} domstate polls, now {}",
        up.report["result"],
        up.took,
        up.states.len(),
        up.version
    ));
    up
}

/// Waits for `n` more heartbeats and checks the current boot's beats: consecutive, err=0.
fn assert_beating(dom: &Domain, serial: &Path, n: u64, when: &str) {
    let from = SerialLog::last_beat(serial).map_or(0, |b| b.counter);
    wait_until(BEAT_TIMEOUT, &format!("{n} heartbeats {when}"), || {
        SerialLog::last_beat(serial).is_some_and(|b| b.counter >= from + n)
    });
    if let Some(problem) = dom.serial().problems() {
        panic!("guest {when}: {problem}");
    }
}

/// `qdev_id`s of the devices on PCI bus 0 of the running QEMU.
fn pci_ids(dom: &Domain) -> Vec<String> {
    let buses = dom.qmp_ok("query-pci", Value::Null);
    buses
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|bus| bus["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["qdev_id"].as_str().map(str::to_owned))
        .collect()
}

/// Whether `query-block` shows a device `alias` with `image` inserted.
fn has_block(dom: &Domain, alias: &str, image: &Path) -> bool {
    let blocks = dom.qmp_ok("query-block", Value::Null);
    blocks.as_array().into_iter().flatten().any(|b| {
        b["qdev"].as_str().is_some_and(|q| q.contains(alias))
            && b["inserted"]["file"].as_str() == Some(&*image.display().to_string())
    })
}

const DISK_ALIAS: &str = "ua-qludisk";
const NIC_ALIAS: &str = "ua-qlunet";

fn disk_xml(image: &Path) -> String {
    format!(
        "<disk type='file' device='disk'>
  <driver name='qemu' type='raw'/>
  <source file='{}'/>
  <target dev='vdb' bus='virtio'/>
  <alias name='{DISK_ALIAS}'/>
</disk>
",
        image.display()
    )
}

/// A virtio NIC on a tap device libvirt creates and leaves without addresses: nothing is
/// routed to it, so no traffic leaves the host.
fn nic_xml(tap: &str, mac: &str) -> String {
    format!(
        "<interface type='ethernet'>
  <mac address='{mac}'/>
  <target dev='{tap}'/>
  <model type='virtio'/>
  <alias name='{NIC_ALIAS}'/>
</interface>
"
    )
}

#[test]
fn libvirt_domain_survives_live_upgrades() {
    ensure_libvirtd();
    let dir = domain_dir();
    let emulator = install_emulator(dir.path(), Some(&qemu_build(OLD)));
    qemu_build(NEW);
    let real = dir.join("bin/qemu-system-x86_64.real");
    let serial = dir.join("serial.log");
    let name = unique_name("qlu");
    let kernel = reachable_copy(dir.path(), &guest_elf());
    let xml = HeartbeatDomain {
        name: &name,
        emulator: &emulator,
        kernel: &kernel,
        serial: &serial,
        mem_mib: 256,
    }
    .xml();
    let dom = Domain::define(&name, &xml, &serial);
    let mut failures = Failures::default();

    step(&format!("virsh start {name}"));
    dom.start();
    assert_is_shim(dom.pid());
    assert_packaged_setup(dom.pid());
    wait_until(BOOT_TIMEOUT, "the guest's READY line", || {
        dom.serial().boot_contains("READY mem=")
    });
    assert!(
        dom.vcpu_in_libvirt_cgroup(0),
        "libvirt did not put vCPU 0 in a vcpu0 cgroup: {:?}",
        dom.vcpu_cgroups(0)
    );
    assert_eq!(
        version(&dom.qmp_ok("query-version", Value::Null)),
        OLD,
        "version through libvirt before any upgrade"
    );
    assert_beating(&dom, &serial, 200, "after boot");

    step("first upgrade");
    let up1 = upgrade(&dom, &real, NEW);
    up1.assert_ok(OLD, NEW);
    assert_beating(&dom, &serial, 500, "after the first upgrade");

    step("suspend, resume, dominfo");
    virsh_ok(&["suspend", &name]);
    assert_eq!(dom.dominfo_state(), "paused");
    let paused_at = SerialLog::last_beat(&serial).map_or(0, |b| b.counter);
    thread::sleep(Duration::from_millis(300));
    let still = SerialLog::last_beat(&serial).map_or(0, |b| b.counter);
    assert!(
        still <= paused_at + 1,
        "the guest ran while paused: {paused_at} -> {still}"
    );
    virsh_ok(&["resume", &name]);
    assert_eq!(dom.dominfo_state(), "running");
    assert_beating(&dom, &serial, 200, "after resume");

    step("hot-plug a disk and a NIC");
    let image = dir.join("disk.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create disk image");
    let disk_file = dir.join("disk.xml");
    fs::write(&disk_file, disk_xml(&image)).unwrap();
    let tap = format!("qlut{}", std::process::id());
    let pid_bytes = std::process::id().to_be_bytes();
    let mac = format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        pid_bytes[1], pid_bytes[2], pid_bytes[3]
    );
    let nic_file = dir.join("nic.xml");
    fs::write(&nic_file, nic_xml(&tap, &mac)).unwrap();
    let disk_path = disk_file.display().to_string();
    let nic_path = nic_file.display().to_string();
    let disk_attached = {
        let r = try_virsh(&["attach-device", &name, &disk_path]);
        failures.check(r.is_ok(), || {
            format!("virsh attach-device (virtio-blk disk): {}", r.unwrap_err())
        })
    };
    let nic_attached = {
        let r = try_virsh(&["attach-device", &name, &nic_path]);
        failures.check(r.is_ok(), || {
            format!(
                "virsh attach-device (virtio-net NIC on tap {tap}): {}",
                r.unwrap_err()
            )
        })
    };
    if disk_attached {
        failures.check(pci_ids(&dom).contains(&DISK_ALIAS.into()), || {
            format!("query-pci after attach shows no {DISK_ALIAS}")
        });
        failures.check(has_block(&dom, DISK_ALIAS, &image), || {
            format!("query-block after attach shows no {DISK_ALIAS}")
        });
    }
    if nic_attached {
        failures.check(pci_ids(&dom).contains(&NIC_ALIAS.into()), || {
            format!("query-pci after attach shows no {NIC_ALIAS}")
        });
    }

    step("second upgrade, with the hot-plugged devices");
    let up2 = upgrade(&dom, &real, OLD);
    up2.assert_domstate_running();
    let up2_ok = failures.check(up2.ok(), || {
        format!(
            "upgrade {NEW} -> {OLD} with a hot-plugged {} failed: {}",
            [(disk_attached, "disk"), (nic_attached, "NIC")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, d)| *d)
                .collect::<Vec<_>>()
                .join(" and "),
            up2.report["reason"]
        ) + &format!("; QEMU said: {:?}", up2.qemu_messages)
    });
    if up2_ok {
        failures.check(up2.version == OLD, || {
            format!("after upgrade 2 libvirt's monitor reaches {}", up2.version)
        });
        if disk_attached {
            failures.check(pci_ids(&dom).contains(&DISK_ALIAS.into()), || {
                format!("query-pci on the new QEMU: the hot-plugged disk {DISK_ALIAS} is missing")
            });
            failures.check(has_block(&dom, DISK_ALIAS, &image), || {
                format!("query-block on the new QEMU: the hot-plugged disk {DISK_ALIAS} ({}) is missing", image.display())
            });
        }
        if nic_attached {
            failures.check(pci_ids(&dom).contains(&NIC_ALIAS.into()), || {
                format!("query-pci on the new QEMU: the hot-plugged NIC {NIC_ALIAS} is missing")
            });
        }
    }
    assert_beating(&dom, &serial, 500, "after the second upgrade");

    step("detach the devices");
    if disk_attached {
        let r = try_virsh(&["detach-device", &name, &disk_path]);
        if failures.check(r.is_ok(), || {
            format!("virsh detach-device (disk): {}", r.clone().unwrap_err())
        }) {
            failures.check(!pci_ids(&dom).contains(&DISK_ALIAS.into()), || {
                format!("query-pci after detach-device still shows {DISK_ALIAS}")
            });
            failures.check(!has_block(&dom, DISK_ALIAS, &image), || {
                format!("query-block after detach-device still shows {DISK_ALIAS}")
            });
        }
    }
    if nic_attached {
        let r = try_virsh(&["detach-device", &name, &nic_path]);
        if failures.check(r.is_ok(), || {
            format!("virsh detach-device (NIC): {}", r.clone().unwrap_err())
        }) {
            failures.check(!pci_ids(&dom).contains(&NIC_ALIAS.into()), || {
                format!("query-pci after detach-device still shows {NIC_ALIAS}")
            });
            // The tap goes when its last fd closes: libvirt's, QEMU's, and any the launcher
            // kept for replaying the hot-plug.
            let sys = Path::new("/sys/class/net").join(&tap);
            let deadline = Instant::now() + Duration::from_secs(5);
            while sys.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            failures.check(!sys.exists(), || {
                format!("tap {tap} still exists 5 s after detach-device: someone holds its fd")
            });
        }
    }
    assert_beating(&dom, &serial, 200, "after detaching");

    // A failed upgrade must leave the VM as upgradable as before.
    let mut current = up2.version.clone();
    let mut ups = vec![up1, up2];
    if current != OLD {
        step("second upgrade again, without hot-plugged devices");
        let again = upgrade(&dom, &real, OLD);
        again.assert_ok(&current, OLD);
        current = again.version.clone();
        ups.push(again);
        assert_beating(&dom, &serial, 500, "after the second upgrade, retried");
    }

    step("third upgrade");
    let up3 = upgrade(&dom, &real, NEW);
    up3.assert_ok(&current, NEW);
    ups.push(up3);
    assert_beating(&dom, &serial, 500, "after the third upgrade");

    // What libvirtd logged while the swaps ran (not while the test hot-plugged: an attach
    // the product refused is reported above, not blamed on a swap).
    let errors: Vec<String> = ups
        .iter()
        .flat_map(|u| libvirtd_errors(&libvirtd_log_between(u.log_window.0, u.log_window.1), &name))
        .collect();
    failures.check(errors.is_empty(), || {
        format!(
            "libvirtd logged errors during the upgrades:\n  {}",
            errors.join("\n  ")
        )
    });

    step("virsh shutdown (the power button)");
    let shim = dom.pid();
    virsh_ok(&["shutdown", &name]);
    dom.wait_state("shut off", Duration::from_secs(30));
    wait_until(Duration::from_secs(10), "the shim to exit", || {
        !is_running(shim)
    });
    assert_eq!(dom.state_reason(), "shut off (shutdown)");
    assert!(
        dom.serial().boot_contains("POWEROFF"),
        "the guest never saw the power button"
    );

    step("virsh start, virsh destroy");
    // libvirt 9.0 cannot probe QEMU 10.0 (its capability probe fails, with or without the
    // shim), and it probes again whenever the emulator file changed; a fresh start must
    // find a QEMU this libvirt knows.
    repoint(&real, &qemu_build(OLD));
    dom.start();
    wait_until(BOOT_TIMEOUT, "the guest's second boot", || {
        let log = dom.serial();
        log.boots() >= 2 && log.boot_contains("READY mem=")
    });
    assert_beating(&dom, &serial, 200, "after the restart");
    assert_eq!(
        version(&dom.qmp_ok("query-version", Value::Null)),
        OLD,
        "a fresh start runs what the .real link names now"
    );
    let shim = dom.pid();
    virsh_ok(&["destroy", &name]);
    assert_eq!(dom.state_reason(), "shut off (destroyed)");
    wait_until(Duration::from_secs(10), "the shim to exit", || {
        !is_running(shim)
    });

    // The domain log records every upgrade attempt, in order.
    let reports = dom.reports();
    assert_eq!(reports.len(), ups.len(), "{reports:?}");
    failures.finish();
}
