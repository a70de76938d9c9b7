//! Live upgrades that succeed: the heartbeat guest moves to another QEMU build under the shim,
//! keeps its memory (checked from inside), keeps beating, ends in the run state it had, and a
//! QMP client connected before the upgrade keeps its connection and talks to the new QEMU.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use qemu_liveupgrade_tests::liveupgrade::{
    assert_pause_in_order, capabilities, version, UpgradeVm, UPGRADE_TIMEOUT,
};
use qemu_liveupgrade_tests::shim::{output_within, qemu_child, reports};
use qemu_liveupgrade_tests::{cli_bin, guest_argv, tempdir, wait_until};
use serde_json::{json, Value};

fn assert_ok(report: &Value, from: &str, to: &str) {
    assert_eq!(report["result"], "ok", "upgrade failed: {report}");
    assert_eq!(report["from"]["version"], from, "{report}");
    assert_eq!(report["to"]["version"], to, "{report}");
    assert_eq!(report["ram"], "shared", "{report}");
}

/// The migration capabilities switched on. (Each QEMU version has its own list.)
fn enabled(caps: &Value) -> Vec<String> {
    let map = caps.as_object().expect("capabilities");
    map.iter()
        .filter(|(_, on)| on.as_bool() == Some(true))
        .map(|(c, _)| c.clone())
        .collect()
}

/// Upgrades through `versions` (the first is where the VM starts) at `mem_mib`, checking the
/// guest and the same QMP connection after every step.
fn upgrade_chain(versions: &[&str], mem_mib: u64) {
    let vm = UpgradeVm::start(versions[0], mem_mib, &[]);
    let mut qmp = vm.connect();
    assert_eq!(
        version(&qmp.execute("query-version", json!({}))),
        versions[0]
    );
    // A capability the VM's user set: it must hold during the swap and after it, while the
    // launcher's own (x-ignore-shared, events) must not linger.
    let caps = json!({"capabilities": [{"capability": "xbzrle", "state": true}]});
    qmp.execute("migrate-set-capabilities", caps);
    let caps_before = enabled(&capabilities(&mut qmp));
    assert_eq!(caps_before, ["xbzrle"]);
    vm.assert_guest_healthy(200);
    for (i, pair) in versions.windows(2).enumerate() {
        vm.install(pair[1]);
        let report = vm.upgrade();
        assert_ok(&report, pair[0], pair[1]);
        assert_pause_in_order(&report, false);
        assert_eq!(report["to"]["generation"], i as u64 + 2);
        assert_eq!(
            report["machine"], "pc-i440fx-7.2",
            "machine type pinned at first launch"
        );
        // With shared RAM only device state crosses: far less than the guest's memory.
        let sent = report["ram_bytes"].as_u64().expect("ram_bytes");
        assert!(
            sent < 16 << 20,
            "{sent} bytes sent for a {mem_mib} MiB guest"
        );
        assert_eq!(version(&qmp.execute("query-version", json!({}))), pair[1]);
        assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
        let caps = enabled(&capabilities(&mut qmp));
        assert_eq!(caps, caps_before, "migration settings as the user had them");
        vm.assert_guest_healthy(500);
    }
    // Exactly one QEMU runs the guest, and it is the one the shim reports.
    let child = qemu_child(vm.vm.pid()).expect("a QEMU child");
    let status = qemu_liveupgrade_tests::shim::cli_status(&vm.rundir(), vm.vm.pid());
    assert_eq!(status["qemu_pid"], child.as_raw());
    assert_eq!(status["version"], *versions.last().unwrap());
    let events: Vec<String> = qmp
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect();
    for hidden in ["STOP", "RESUME", "SHUTDOWN", "MIGRATION"] {
        assert!(
            !events.iter().any(|e| e == hidden),
            "client saw {hidden}: {events:?}"
        );
    }
}

#[test]
fn security_update_7_2_18_to_7_2_22() {
    upgrade_chain(&["7.2.18", "7.2.22"], 256);
}

#[test]
fn across_major_versions_and_back_256m() {
    upgrade_chain(&["7.2.22", "10.0.2", "7.2.22"], 256);
}

#[test]
fn across_major_versions_and_back_2g() {
    upgrade_chain(&["7.2.22", "10.0.2", "7.2.22"], 2048);
}

#[test]
fn paused_guest_stays_paused() {
    let vm = UpgradeVm::start("7.2.22", 256, &[]);
    let mut qmp = vm.connect();
    qmp.execute("stop", json!({}));
    vm.install("10.0.2");
    assert_ok(&vm.upgrade(), "7.2.22", "10.0.2");
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "paused");
    let last = vm
        .vm
        .last_heartbeat()
        .expect("heartbeats before stop")
        .counter;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vm.vm.last_heartbeat().unwrap().counter,
        last,
        "a paused guest ran"
    );
    qmp.execute("cont", json!({}));
    vm.assert_guest_healthy(500);
}

#[test]
fn guest_never_started_stays_in_prelaunch() {
    let vm = UpgradeVm::start("7.2.22", 256, &["-S"]);
    let mut qmp = vm.connect();
    assert_eq!(
        qmp.execute("query-status", json!({}))["status"],
        "prelaunch"
    );
    vm.install("10.0.2");
    assert_ok(&vm.upgrade(), "7.2.22", "10.0.2");
    assert_eq!(
        qmp.execute("query-status", json!({}))["status"],
        "prelaunch"
    );
    assert!(
        vm.vm.last_heartbeat().is_none(),
        "the guest ran before cont"
    );
    qmp.execute("cont", json!({}));
    vm.vm.wait_ready(Duration::from_secs(60));
    vm.assert_guest_healthy(500);
}

#[test]
fn ram_that_cannot_be_shared_crosses_in_the_stream() {
    // A private mapping of a file is RAM no other process can see: it must be sent. 10.0.2 on
    // both sides: 7.2 as a TCG migration source loses pages once RAM takes several passes.
    let dir = tempdir();
    let backing = dir.join("ram.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let object = format!(
        "memory-backend-file,id=ram0,size=256M,mem-path={},share=off",
        backing.display()
    );
    let mut argv = guest_argv(256);
    argv.extend([
        "-object".into(),
        object,
        "-machine".into(),
        "memory-backend=ram0".into(),
    ]);
    let vm = UpgradeVm::start_with("10.0.2", argv, &[], &[]);
    vm.assert_guest_healthy(200);
    let report = vm.upgrade();
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["ram"], "streamed", "{report}");
    let sent = report["ram_bytes"].as_u64().unwrap();
    assert!(
        sent > 64 << 20,
        "only {sent} bytes sent for 256 MiB of private RAM"
    );
    vm.assert_guest_healthy(500);
}

#[test]
fn second_request_during_an_upgrade_is_coalesced() {
    let vm = UpgradeVm::start("7.2.22", 256, &[]);
    vm.install("10.0.2");
    vm.vm.signal(Signal::SIGUSR2);
    // Separate deliveries: two signals sent back to back may merge in the kernel already.
    wait_until(Duration::from_secs(10), "the new QEMU to start", || {
        qemu_liveupgrade_tests::shim::children(vm.vm.pid()).len() == 2
    });
    vm.vm.signal(Signal::SIGUSR2);
    let report = vm.wait_report(0);
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["coalesced_requests"], 1, "{report}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        reports(&vm.vm).len(),
        1,
        "the coalesced request started a second upgrade"
    );
    vm.assert_guest_healthy(200);
}

#[test]
fn sigterm_during_an_upgrade_ends_the_vm_cleanly() {
    let mut vm = UpgradeVm::start("7.2.22", 256, &[]);
    vm.install("10.0.2");
    vm.vm.signal(Signal::SIGUSR2);
    wait_until(Duration::from_secs(10), "the new QEMU to start", || {
        qemu_liveupgrade_tests::shim::children(vm.vm.pid()).len() == 2
    });
    let qemus = qemu_liveupgrade_tests::shim::children(vm.vm.pid());
    vm.vm.signal(Signal::SIGTERM);
    let status = vm.vm.wait_exit(UPGRADE_TIMEOUT);
    assert_eq!(status.code(), Some(0), "QEMU's own status on SIGTERM");
    for pid in qemus {
        assert!(
            !qemu_liveupgrade_tests::shim::is_running(pid),
            "QEMU {pid} outlived the VM"
        );
    }
}

#[test]
fn cli_upgrade_waits_and_reports() {
    // Named the way libvirt names a domain's QEMU; the CLI finds it by that name.
    let vm = UpgradeVm::start("7.2.22", 256, &["-name", "guest=cli-vm,debug-threads=on"]);
    vm.install("10.0.2");
    let mut cmd = Command::new(cli_bin());
    cmd.args(["upgrade", "cli-vm"])
        .env("QEMU_LIVEUPGRADE_RUNDIR", vm.rundir());
    let out = output_within(cmd, UPGRADE_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("upgraded 7.2.22 -> 10.0.2"), "{stdout}");
    assert!(stderr.contains("migrating"), "progress shown: {stderr}");

    // --to names the binary explicitly; list shows the VM with its generation.
    let mut cmd = Command::new(cli_bin());
    cmd.args(["upgrade", "--json", &vm.vm.pid().to_string(), "--to"])
        .arg(qemu_liveupgrade_tests::qemu_build("7.2.22"))
        .env("QEMU_LIVEUPGRADE_RUNDIR", vm.rundir());
    let out = output_within(cmd, UPGRADE_TIMEOUT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_ok(&report, "10.0.2", "7.2.22");
    let mut cmd = Command::new(cli_bin());
    cmd.args(["list", "--json"])
        .env("QEMU_LIVEUPGRADE_RUNDIR", vm.rundir());
    let out = output_within(cmd, Duration::from_secs(10));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    let listed = &listed[0];
    assert_eq!(listed["pid"], vm.vm.pid().as_raw());
    assert_eq!(listed["name"], "cli-vm");
    assert_eq!(listed["generation"], 3);
    assert_eq!(listed["last_upgrade"]["to"]["version"], "7.2.22");
    vm.assert_guest_healthy(200);
}

#[test]
fn file_chardevs_are_appended_to_not_truncated() {
    // An HMP monitor on a file chardev: each QEMU writes its banner there when it opens it.
    let dir = tempdir();
    let log = dir.join("monitor.log");
    let chardev = format!("file,id=hmplog,path={}", log.display());
    let vm = UpgradeVm::start(
        "7.2.22",
        256,
        &["-chardev", &chardev, "-mon", "chardev=hmplog"],
    );
    vm.install("10.0.2");
    assert_ok(&vm.upgrade(), "7.2.22", "10.0.2");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("QEMU 7.2.22 monitor"),
        "first generation's output lost: {text:?}"
    );
    assert!(text.contains("QEMU 10.0.2 monitor"), "{text:?}");
}

#[test]
fn vcpu_thread_placement_carries_over() {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    let vm = UpgradeVm::start("7.2.22", 256, &["-smp", "2"]);
    let mut qmp = vm.connect();
    let tid = |qmp: &mut qemu_liveupgrade_tests::Qmp, index: usize| {
        let cpus = qmp.execute("query-cpus-fast", json!({}));
        Pid::from_raw(cpus[index]["thread-id"].as_i64().expect("thread-id") as i32)
    };
    // vCPU 1 pinned to the last CPU, the way libvirt's <vcpupin> does it, by thread id.
    let online = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let last = (0..CpuSet::count())
        .rev()
        .find(|&c| online.is_set(c).unwrap_or(false))
        .unwrap();
    let mut pinned = CpuSet::new();
    pinned.set(last).unwrap();
    let old = tid(&mut qmp, 1);
    sched_setaffinity(old, &pinned).unwrap();
    vm.install("10.0.2");
    let report = vm.upgrade();
    assert_ok(&report, "7.2.22", "10.0.2");
    assert_eq!(report["threads"]["placed"], 2, "{report}");
    let new = tid(&mut qmp, 1);
    assert_ne!(new, old, "a new QEMU has new threads");
    assert_eq!(
        sched_getaffinity(new).unwrap(),
        pinned,
        "vCPU 1 lost its pinning"
    );
    assert_eq!(sched_getaffinity(tid(&mut qmp, 0)).unwrap(), online);
    vm.assert_guest_healthy(200);
}

#[test]
fn client_sending_flat_out_during_an_upgrade_gets_every_reply_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let vm = UpgradeVm::start("7.2.22", 256, &[]);
    let mut qmp = vm.connect();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // Every reply is checked against its command's id by the harness; any error fails here.
    let client = std::thread::spawn(move || {
        let mut versions = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            match qmp.try_execute("query-version", json!({})) {
                Ok(v) => {
                    let v = version(&v);
                    if versions.last() != Some(&v) {
                        versions.push(v);
                    }
                }
                Err(e) => panic!("a command failed during the upgrade: {e}"),
            }
        }
        versions
    });
    std::thread::sleep(Duration::from_millis(200));
    vm.install("10.0.2");
    assert_ok(&vm.upgrade(), "7.2.22", "10.0.2");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let versions = client.join().expect("client thread");
    assert_eq!(
        versions,
        ["7.2.22", "10.0.2"],
        "answers came from the old QEMU, then the new"
    );
}

#[test]
fn tap_named_by_ifname_is_opened_once_and_kept() {
    // The tap lives in the host's namespace with no address: nothing can reach or leave it.
    let name = format!("qlu{}", std::process::id() % 100_000);
    let netdev = format!("tap,id=n0,ifname={name},script=no,downscript=no,vhost=off");
    let vm = UpgradeVm::start(
        "7.2.22",
        256,
        &["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"],
    );
    let ifindex = || std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).ok();
    let before = ifindex().expect("the tap exists while the VM runs");
    for to in ["10.0.2", "7.2.22"] {
        vm.install(to);
        assert_eq!(vm.upgrade()["result"], "ok");
        assert_eq!(
            ifindex().as_ref(),
            Some(&before),
            "the same tap, never recreated"
        );
    }
    let child = qemu_child(vm.vm.pid()).unwrap();
    let argv = qemu_liveupgrade_tests::shim::cmdline_of(child).join(" ");
    assert!(!argv.contains("ifname="), "QEMU got the tap by fd: {argv}");
    let mut vm = vm;
    vm.vm.signal(Signal::SIGTERM);
    vm.vm.wait_exit(Duration::from_secs(30));
    wait_until(Duration::from_secs(5), "the tap to go with the VM", || {
        ifindex().is_none()
    });
}

#[test]
fn disks_opened_by_path_move_and_stay_locked_by_the_running_qemu() {
    let dir = tempdir();
    let (qcow, raw, ro) = (
        make_image(&dir.join("a.qcow2"), "qcow2"),
        make_image(&dir.join("b.raw"), "raw"),
        make_image(&dir.join("c.raw"), "raw"),
    );
    let args = [
        "-drive".to_owned(),
        format!("file={},format=qcow2,if=virtio", qcow.display()),
        "-blockdev".to_owned(),
        format!(
            r#"{{"driver":"file","filename":"{}","node-name":"rawfile"}}"#,
            raw.display()
        ),
        "-device".to_owned(),
        "virtio-blk-pci,drive=rawfile".to_owned(),
        "-drive".to_owned(),
        format!("file={},format=raw,if=virtio,readonly=on", ro.display()),
    ];
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = UpgradeVm::start("7.2.22", 256, &extra);
    // qemu-img cannot take its shared lock on an image a running QEMU writes to.
    let locked = |path: &std::path::Path| {
        let out = Command::new("qemu-img")
            .arg("info")
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).contains("lock")
    };
    for to in ["10.0.2", "7.2.22"] {
        vm.install(to);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "{report}");
        let mut qmp = vm.connect();
        let block = qmp.execute("query-block", json!({})).to_string();
        for path in [&qcow, &ro] {
            assert!(
                block.contains(&path.display().to_string()),
                "{path:?} missing: {block}"
            );
        }
        // (A bare -blockdev file node shares reads, so qemu-img can still open it.)
        assert!(
            locked(&qcow),
            "the qcow2 image is not locked by the running QEMU"
        );
    }
    vm.assert_guest_healthy(200);
}

/// A 16 MiB image made with qemu-img.
fn make_image(path: &std::path::Path, format: &str) -> std::path::PathBuf {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg("16M")
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path.to_owned()
}
