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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qemu_liveupgrade_tests::libvirt::{
    cli_status, credentials, domain_dir, ensure_libvirtd, install_emulator, libvirtd_errors,
    libvirtd_log_between, libvirtd_log_mark, qemu_user, reachable_copy, repoint, try_virsh,
    unique_name, virsh_ok, Domain, HeartbeatDomain, SerialLog, QEMU_USER,
};
use qemu_liveupgrade_tests::liveupgrade::{version, UPGRADE_TIMEOUT};
use qemu_liveupgrade_tests::shim::{is_running, wait_qemu_child};
use qemu_liveupgrade_tests::{guest_elf, qemu_build, shim_bin, wait_until};
use serde_json::Value;

const OLD: &str = "7.2.22";
const NEW: &str = "10.0.2";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const BEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// `virsh domstate` during an upgrade: about every 20 ms, as the brief of this test says.
const POLL: Duration = Duration::from_millis(20);

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

/// What one upgrade looked like from libvirt's side.
struct Upgrade {
    report: Value,
    /// Every `virsh domstate` answer from just before SIGUSR2 until after the report.
    states: Vec<String>,
    /// `query-version` through libvirt afterwards.
    version: String,
    /// libvirtd's log while it ran: (from, to) byte marks.
    log_window: (u64, u64),
    /// QEMU's own messages in the domain log while it ran (a failed upgrade's details).
    qemu_messages: Vec<String>,
    /// `qemu-liveupgrade status --json NAME` as root afterwards.
    status: Result<Value, String>,
    /// The pid libvirt tracks.
    pid: Pid,
    /// Whether the new vCPU 0 thread is in libvirt's `vcpu0` cgroup, and its cgroups.
    vcpu0_placed: bool,
    vcpu0_cgroups: Vec<String>,
}

impl Upgrade {
    fn ok(&self) -> bool {
        self.report["result"] == "ok"
    }
}

/// Repoints the `.real` link at `to`, sends SIGUSR2 to the pid libvirt tracks, polls
/// `virsh domstate` until the report is in the domain log, and asks libvirt's monitor
/// connection for the version.
fn upgrade(dom: &Domain, real: &Path, to: &str) -> Upgrade {
    repoint(real, &qemu_build(to));
    let pid = dom.pid();
    assert_is_shim(pid);
    let before = dom.reports().len();
    let from_mark = libvirtd_log_mark();
    let domain_log_mark = dom.log_mark();

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = {
        let stop = Arc::clone(&stop);
        let name = dom.name().to_owned();
        thread::spawn(move || {
            let mut states = Vec::new();
            loop {
                let state = match try_virsh(&["domstate", &name]) {
                    Ok(s) => s.trim().to_owned(),
                    Err(e) => format!("virsh error: {e}"),
                };
                states.push(state);
                if states.len() == 1 {
                    let _ = tx.send(());
                }
                if stop.load(Ordering::Relaxed) {
                    return states;
                }
                thread::sleep(POLL);
            }
        })
    };
    rx.recv_timeout(Duration::from_secs(30))
        .expect("first virsh domstate");
    let started = Instant::now();
    kill(pid, Signal::SIGUSR2).unwrap_or_else(|e| panic!("kill -USR2 {pid}: {e}"));
    let report = dom.wait_report(before, UPGRADE_TIMEOUT);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let states = poller.join().expect("domstate poller");
    let version = dom
        .qmp("query-version", Value::Null)
        .map(|v| version(&v))
        .unwrap_or_else(|e| format!("query-version failed: {e}"));
    let to_mark = libvirtd_log_mark();
    let qemu_messages = dom
        .log_since(domain_log_mark)
        .lines()
        .filter(|l| !l.starts_with('{') && l.contains("qemu-system-x86_64:"))
        .map(str::to_owned)
        .collect();
    let status = cli_status(dom.name());
    let vcpu0_placed = dom.vcpu_in_libvirt_cgroup(0);
    let vcpu0_cgroups = dom.vcpu_cgroups(0);
    assert_eq!(dom.pid(), pid, "libvirt's pid changed across the upgrade");
    assert!(is_running(pid), "the shim (pid {pid}) is gone");
    step(&format!(
        "upgrade to {to}: {} in {took:?}, {} domstate polls, now {version}",
        report["result"],
        states.len()
    ));
    Upgrade {
        report,
        states,
        version,
        log_window: (from_mark, to_mark),
        qemu_messages,
        status,
        pid,
        vcpu0_placed,
        vcpu0_cgroups,
    }
}

/// `pid` runs the shim. By name: a rebuild replaces the file under a running shim, and then
/// `/proc/PID/exe` names a deleted file.
fn assert_is_shim(pid: Pid) {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e} (is the VM gone?)"));
    let shim = shim_bin();
    let name = shim.file_name().unwrap().to_string_lossy();
    assert!(
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&*name)),
        "the pid libvirt tracks ({pid}) runs {}, not the shim",
        exe.display()
    );
}

/// The shim `pid` and its QEMU run as libvirt's packaged configuration runs emulators: as
/// `libvirt-qemu`, with stderr a pipe to virtlogd (not the log file itself, as with
/// `stdio_handler = "file"`).
fn assert_packaged_setup(pid: Pid) {
    let user = qemu_user();
    assert_eq!(
        credentials(pid),
        user,
        "the shim (pid {pid}) does not run as {QEMU_USER}: is qemu.conf the packaged one?"
    );
    let qemu = wait_qemu_child(pid, Duration::from_secs(10));
    assert_eq!(
        credentials(qemu),
        user,
        "QEMU (pid {qemu}) runs as another user than the shim"
    );
    let stderr = fs::read_link(format!("/proc/{pid}/fd/2")).expect("the shim's stderr");
    assert!(
        stderr.to_string_lossy().starts_with("pipe:"),
        "the shim's stderr is {} rather than virtlogd's pipe",
        stderr.display()
    );
}

/// The upgrade went through and libvirt saw a running domain all along.
fn assert_upgrade_ok(up: &Upgrade, from: &str, to: &str) {
    assert_eq!(
        up.report["result"], "ok",
        "upgrade failed: {}\nQEMU said: {:?}",
        up.report, up.qemu_messages
    );
    assert_eq!(up.report["from"]["version"], from, "{}", up.report);
    assert_eq!(up.report["to"]["version"], to, "{}", up.report);
    assert_domstate_running(up);
    assert_eq!(up.version, to, "version through libvirt's monitor");
    assert_threads_placed(up);
    let status = up
        .status
        .as_ref()
        .unwrap_or_else(|e| panic!("qemu-liveupgrade status (as root) failed: {e}"));
    assert_eq!(status["pid"], up.pid.as_raw(), "status: {status}");
    assert_eq!(status["version"], to, "status: {status}");
    assert_eq!(
        status["generation"], up.report["to"]["generation"],
        "status: {status}"
    );
    assert_eq!(status["last_upgrade"]["result"], "ok", "status: {status}");
}

/// The new vCPU thread is where libvirt put the old one: its `vcpu0` cgroup, moved there by
/// the placer (the launcher runs as libvirt-qemu and may not write root's cgroup files).
fn assert_threads_placed(up: &Upgrade) {
    let threads = &up.report["threads"];
    assert_eq!(threads["problems"], serde_json::json!([]), "{}", up.report);
    assert_eq!(threads["by"], "placer", "{}", up.report);
    assert!(
        up.vcpu0_placed,
        "the new vCPU 0 thread is not in libvirt's vcpu0 cgroup: {:?}",
        up.vcpu0_cgroups
    );
}

fn assert_domstate_running(up: &Upgrade) {
    assert!(
        up.states.len() >= 2,
        "domstate polled only {} time(s) during the upgrade",
        up.states.len()
    );
    let odd: Vec<&String> = up.states.iter().filter(|s| *s != "running").collect();
    assert!(
        odd.is_empty(),
        "virsh domstate during the upgrade: {odd:?} (of {} polls)",
        up.states.len()
    );
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
    assert_upgrade_ok(&up1, OLD, NEW);
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
    assert_domstate_running(&up2);
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
        assert_upgrade_ok(&again, &current, OLD);
        current = again.version.clone();
        ups.push(again);
        assert_beating(&dom, &serial, 500, "after the second upgrade, retried");
    }

    step("third upgrade");
    let up3 = upgrade(&dom, &real, NEW);
    assert_upgrade_ok(&up3, &current, NEW);
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
