//! `qemu-liveupgrade upgrade --all` over several VMs under the shim, each laid out the way the
//! package's diversion leaves QEMU (`qemu-system-x86_64` the shim, `.real` beside it): a new
//! QEMU is "installed" by renaming a new `.real` into place, as dpkg does, and the rollout
//! moves every VM onto it, two at a time. One VM's new binary refuses to start: it is listed as
//! failed and keeps running on its QEMU.

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::shim::{children, output_within, QEMU_NAME};
use qemu_liveupgrade_tests::{cli_bin, guest_argv, qemu_build, shim_bin, tempdir, TempDir, Vm};
use serde_json::Value;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);

/// `dir/qemu-system-x86_64` (the shim) and `dir/qemu-system-x86_64.real` -> `real`.
fn divert_layout(dir: &Path, real: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let shim = dir.join(QEMU_NAME);
    symlink(shim_bin(), &shim).unwrap();
    install(dir, real);
    shim
}

/// A new `.real`, renamed over the old one: what dpkg does when it unpacks a QEMU upgrade.
fn install(dir: &Path, real: &Path) {
    let new = dir.join(format!("{QEMU_NAME}.real.dpkg-new"));
    let _ = fs::remove_file(&new);
    symlink(real, &new).unwrap();
    fs::rename(&new, dir.join(format!("{QEMU_NAME}.real"))).unwrap();
}

fn start_vm(shim: &Path, name: &str, rundir: &Path) -> Vm {
    let mut cmd = Command::new(shim);
    cmd.args(guest_argv(64))
        .args(["-name", &format!("guest={name}")])
        .env_remove("QEMU_LIVEUPGRADE_BINARY")
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
        .env("QEMU_LIVEUPGRADE_RUNDIR", rundir);
    Vm::spawn(cmd)
}

fn cli(rundir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(cli_bin());
    cmd.args(args)
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
        .env("QEMU_LIVEUPGRADE_RUNDIR", rundir);
    output_within(cmd, ROLLOUT_TIMEOUT)
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Counts, every few milliseconds until stopped, how many of the shims have two QEMU children
/// at once (the old one and the new one: a swap under way), and keeps the highest count.
struct SwapWatcher {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl SwapWatcher {
    fn start(vms: &[Vm]) -> SwapWatcher {
        let pids: Vec<_> = vms.iter().map(Vm::pid).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::spawn({
            let (stop, most) = (stop.clone(), most.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let swapping = pids.iter().filter(|&&p| children(p).len() >= 2).count();
                    most.fetch_max(swapping, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        SwapWatcher { stop, most, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.most.load(Ordering::Relaxed)
    }
}

/// The most requests the rollout had outstanding at once, from its own JSON spans.
fn most_overlapping(vms: &[Value]) -> usize {
    let spans: Vec<(f64, f64)> = vms
        .iter()
        .map(|v| {
            (
                v["started_ms"].as_f64().unwrap(),
                v["finished_ms"].as_f64().unwrap(),
            )
        })
        .collect();
    spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(s, f)| s <= start && start < f)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn refusing_qemu(dir: &TempDir) -> PathBuf {
    let path = dir.join("refusing-qemu");
    fs::write(
        &path,
        "#!/bin/sh\necho \"qemu-system-x86_64: this build refuses to start (test)\" >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn upgrade_all_two_at_a_time_lists_the_one_that_failed() {
    let d = tempdir();
    let rundir = d.join("run");
    fs::create_dir_all(&rundir).unwrap();
    // Three VMs share one diverted binary; the fourth has its own, which will refuse.
    let shared = divert_layout(&d.join("bin"), &qemu_build("7.2.22"));
    let own = divert_layout(&d.join("bin4"), &qemu_build("7.2.22"));
    let names = ["roll-1", "roll-2", "roll-3", "roll-4"];
    let vms: Vec<Vm> = names
        .iter()
        .map(|n| start_vm(if *n == "roll-4" { &own } else { &shared }, n, &rundir))
        .collect();
    for vm in &vms {
        vm.wait_ready(Duration::from_secs(60));
    }

    // Before any upgrade: every VM runs what is installed.
    let listed = json_of(&cli(&rundir, &["list", "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    for vm in listed.as_array().unwrap() {
        assert_eq!(vm["runs_installed"], true, "{vm}");
        assert_eq!(vm["installed_version"], "7.2.22", "{vm}");
    }
    let out = cli(&rundir, &["upgrade", "--all", "--outdated"]);
    assert!(out.status.success(), "nothing to do is success");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("0 upgraded, 0 failed, 0 gone, 4 already on the installed QEMU"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The package upgrade: 10.0.2 for three, a binary that refuses for the fourth.
    install(&d.join("bin"), &qemu_build("10.0.2"));
    install(&d.join("bin4"), &refusing_qemu(&d));
    let out = cli(&rundir, &["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("no: 10.0.2").count(), 3, "{text}");
    assert!(text.contains("4 of 4 VMs run an outdated QEMU"), "{text}");

    let watcher = SwapWatcher::start(&vms);
    let start = Instant::now();
    let out = cli(
        &rundir,
        &["upgrade", "--all", "--max-parallel", "2", "--json"],
    );
    let most_swapping = watcher.finish();
    let rollout = json_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("rollout took {:?}:\n{stderr}{rollout:#}", start.elapsed());
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed VM makes the rollout fail"
    );

    // A progress line per VM, and every VM in the summary with what happened to it.
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with('[')).count(),
        4,
        "{stderr}"
    );
    assert!(
        stderr.contains("roll-4: failed, still on 7.2.22: "),
        "{stderr}"
    );
    assert_eq!(
        (rollout["upgraded"].as_u64(), rollout["failed"].as_u64()),
        (Some(3), Some(1))
    );
    let by_name = |n: &str| {
        rollout["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == n)
            .unwrap_or_else(|| panic!("{n} missing from {rollout}"))
            .clone()
    };
    for n in &names[..3] {
        let v = by_name(n);
        assert_eq!(
            (v["result"].as_str(), v["from"].as_str(), v["to"].as_str()),
            (Some("ok"), Some("7.2.22"), Some("10.0.2")),
            "{v}"
        );
        assert!(v["pause_ms"].as_f64().is_some(), "{v}");
    }
    let failed = by_name("roll-4");
    assert_eq!(
        (failed["result"].as_str(), failed["to"].as_str()),
        (Some("failed"), Some("7.2.22")),
        "{failed}"
    );
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or("")
            .contains("refuses to start"),
        "the new QEMU's own words: {failed}"
    );

    // Never more than two at once: seen from outside (two QEMUs under one shim) and from the
    // rollout's own request spans; and two did overlap, so the limit is what held it.
    let vms_json = rollout["vms"].as_array().unwrap();
    assert!(
        most_swapping <= 2,
        "{most_swapping} VMs had two QEMUs at once"
    );
    assert_eq!(most_overlapping(vms_json), 2, "{rollout}");

    // Every guest still runs, memory intact: three on 10.0.2, the failed one on its 7.2.22.
    for vm in &vms {
        let now = Instant::now();
        vm.wait_heartbeats_after(now, 100, Duration::from_secs(60));
        assert!(vm.errors().is_clean(), "{:?}", vm.errors());
    }
    let listed = json_of(&cli(&rundir, &["list", "--json"]));
    for vm in listed.as_array().unwrap() {
        let four = vm["name"] == "roll-4";
        assert_eq!(
            vm["version"],
            if four { "7.2.22" } else { "10.0.2" },
            "{vm}"
        );
        assert_eq!(vm["runs_installed"], !four, "{vm}");
    }

    // --outdated takes only the one still outdated; the table says so.
    let out = cli(&rundir, &["upgrade", "--all", "--outdated"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["VM", "FROM", "TO", "PAUSE", "RESULT", "REASON"]
    );
    assert!(
        lines[1].starts_with("roll-4  7.2.22  7.2.22  -      failed  "),
        "{table}"
    );
    assert!(
        table.contains("0 upgraded, 1 failed, 0 gone, 3 already on the installed QEMU, 0 left out"),
        "{table}"
    );
}
