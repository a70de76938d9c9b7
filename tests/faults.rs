//! Faults injected at every phase of an upgrade, and what each must leave.
//!
//! Each fault is a real signal to a real process: the new QEMU (7.2.22 -> 10.0.2), the old
//! one, or the shim. Its moment is exact, not a delay: the shim sends it itself when it
//! reaches the phase (`QEMU_LIVEUPGRADE_TEST_FAULT`, launcher/src/fault.rs), since phases
//! last milliseconds and "between fork and exec" cannot be reached from outside at all.
//!
//! Where the upgrade can fail and the VM go on, the invariant afterwards is: exactly one QEMU,
//! the same one, running the guest in its old state with its memory verified; the same QMP
//! connection answering, having seen no STOP, RESUME or MIGRATION event and none of the
//! shim's migration settings; a later clean upgrade working on that same connection; and
//! `quit` ending the shim with status 0 and no process left. Where the fault must end the VM
//! (the old QEMU or the shim killed), everything ends, and the shim ends as QEMU did.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use qemu_liveupgrade_tests::liveupgrade::{capabilities, version, UpgradeVm, UPGRADE_TIMEOUT};
use qemu_liveupgrade_tests::shim::{children, cli_status, is_running, qemu_child, reports};
use qemu_liveupgrade_tests::{guest_argv, wait_until, Qmp};
use serde_json::{json, Value};

/// Short deadlines, so a stopped QEMU costs seconds, not the defaults' tens of seconds.
const START_TIMEOUT: &str = "3";
const MIGRATION_TIMEOUT: &str = "2";

/// A VM on 7.2.22 with 10.0.2 installed and `fault` armed, and a QMP client connected.
fn armed(fault: &str) -> (UpgradeVm, Qmp, Pid) {
    let env = [
        ("QEMU_LIVEUPGRADE_TEST_FAULT", fault),
        ("QEMU_LIVEUPGRADE_START_TIMEOUT", START_TIMEOUT),
        ("QEMU_LIVEUPGRADE_MIGRATION_TIMEOUT", MIGRATION_TIMEOUT),
    ];
    let vm = UpgradeVm::start_with("7.2.22", guest_argv(128), &[], &env);
    let mut qmp = vm.connect();
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    let old = qemu_child(vm.vm.pid()).expect("one QEMU");
    vm.install("10.0.2");
    (vm, qmp, old)
}

/// The first upgrade fails with `reason` in its report and leaves the VM untouched; then a
/// clean upgrade works and `quit` ends everything.
fn survives(fault: &str, reason: &str) {
    let (vm, mut qmp, old) = armed(fault);
    let report = vm.upgrade();
    eprintln!("{fault}: {report}");
    assert_eq!(report["result"], "failed", "{report}");
    let why = report["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains(reason),
        "{fault}: reason {why:?} lacks {reason:?}"
    );
    assert!(report.get("rollback_problems").is_none(), "{report}");
    assert_untouched(&vm, &mut qmp, old, "7.2.22");
    upgrade_then_quit(vm, qmp);
}

/// Exactly one QEMU (`old`), running `version` with the guest running and healthy, and a QMP
/// client that saw nothing of the attempt.
fn assert_untouched(vm: &UpgradeVm, qmp: &mut Qmp, old: Pid, version_now: &str) {
    assert_eq!(children(vm.vm.pid()), vec![old], "the same single QEMU");
    assert_eq!(
        version(&qmp.execute("query-version", json!({}))),
        version_now
    );
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    let caps = capabilities(qmp);
    assert_eq!(caps["x-ignore-shared"], false, "shim's capability left");
    assert_eq!(caps["events"], false, "shim's capability left");
    assert_no_swap_seen(qmp);
    vm.assert_guest_healthy(300);
}

/// No event the swap causes reached the client, and QEMU's migration state shows none.
fn assert_no_swap_seen(qmp: &mut Qmp) {
    let migration = qmp.execute("query-migrate", json!({}));
    assert!(
        migration.get("status").is_none(),
        "the client sees the upgrade's migration: {migration}"
    );
    let seen: Vec<Value> = qmp
        .events()
        .into_iter()
        .filter(|e| {
            let name = e["event"].as_str().unwrap_or_default();
            ["STOP", "RESUME", "MIGRATION", "MIGRATION_PASS", "SHUTDOWN"].contains(&name)
        })
        .collect();
    assert!(seen.is_empty(), "the client saw the swap: {seen:?}");
}

/// A clean upgrade on the same connection, then `quit`: status 0 and no process left.
fn upgrade_then_quit(mut vm: UpgradeVm, mut qmp: Qmp) {
    let report = vm.upgrade();
    assert_eq!(report["result"], "ok", "the next upgrade: {report}");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "10.0.2");
    assert_no_swap_seen(&mut qmp);
    vm.assert_guest_healthy(300);
    quit(&mut vm, &mut qmp);
}

/// `quit` on the client's connection ends QEMU and the shim with status 0, nothing left.
fn quit(vm: &mut UpgradeVm, qmp: &mut Qmp) {
    let qemus = children(vm.vm.pid());
    let _ = qmp.try_execute("quit", json!({}));
    let status = vm.vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "the shim ends as QEMU did on quit");
    for pid in qemus {
        assert!(!is_running(pid), "QEMU {pid} outlived the shim");
    }
}

/// The fault must end the VM: the shim ends as `expect` says, and within 1 s of its end no
/// QEMU it ran is left.
fn ends_the_vm(fault: &str, expect: impl Fn(std::process::ExitStatus) -> bool) {
    use std::os::unix::process::ExitStatusExt;
    let (mut vm, _qmp, _old) = armed(fault);
    vm.vm.signal(Signal::SIGUSR2);
    // Every process the shim runs until it ends, the new QEMU included.
    let mut qemus: Vec<Pid> = Vec::new();
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    let status = loop {
        for pid in children(vm.vm.pid()) {
            if !qemus.contains(&pid) {
                qemus.push(pid);
            }
        }
        if let Some(status) = vm.vm.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "{fault}: the shim did not end");
        std::thread::sleep(Duration::from_millis(5));
    };
    let ended = Instant::now();
    assert!(
        expect(status),
        "{fault}: shim ended with {status:?} (signal {:?}); stderr: {}",
        status.signal(),
        vm.vm.stderr_text()
    );
    // The old QEMU, the new one, and the processes asking the new binary what it accepts.
    assert!(
        qemus.len() >= 2,
        "{fault}: the upgrade started no second QEMU"
    );
    wait_until(Duration::from_secs(1), "every QEMU gone within 1 s", || {
        qemus.iter().all(|&p| !is_running(p))
    });
    eprintln!(
        "{fault}: {status:?}, QEMUs gone {:?} later",
        ended.elapsed()
    );
}

#[test]
fn new_child_killed_before_exec() {
    survives("before-exec:new:SIGKILL", "new QEMU did not start");
}

#[test]
fn new_child_stopped_before_exec() {
    // The stall of old: the shim waited in a blocking read of the exec status, deaf to
    // everything. Now the wait is a loop event with the start deadline.
    let (vm, mut qmp, old) = armed("before-exec:new:SIGSTOP");
    let before = reports(&vm.vm).len();
    vm.vm.signal(Signal::SIGUSR2);
    let new = wait_stopped_child(&vm, old);
    // Meanwhile the shim serves everyone: the control socket, the QMP client, the console.
    let status = cli_status(&vm.rundir(), vm.vm.pid());
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    vm.assert_guest_healthy(200);
    let report = vm.wait_report(before);
    assert_eq!(report["result"], "failed", "{report}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("starting QEMU timed out"),
        "{report}"
    );
    assert!(!is_running(new), "the stopped child was ended");
    assert_untouched(&vm, &mut qmp, old, "7.2.22");
    upgrade_then_quit(vm, qmp);
}

#[test]
fn new_qemu_killed_at_exec() {
    survives("exec:new:SIGKILL", "new QEMU did not start");
}

#[test]
fn new_qemu_stopped_at_exec() {
    survives("exec:new:SIGSTOP", "greeting timed out");
}

#[test]
fn new_qemu_killed_holding_the_streams_read_end() {
    survives("stream-in:new:SIGKILL", "migrate-incoming");
}

#[test]
fn new_qemu_stopped_holding_the_streams_read_end() {
    let (vm, mut qmp, old) = armed("stream-in:new:SIGSTOP");
    let before = reports(&vm.vm).len();
    vm.vm.signal(Signal::SIGUSR2);
    wait_stopped_child(&vm, old);
    // Clients are held from here until the upgrade gives up; the status and the console go on.
    let status = cli_status(&vm.rundir(), vm.vm.pid());
    assert_eq!(status["generation"], 1, "{status}");
    vm.assert_guest_healthy(200);
    let report = vm.wait_report(before);
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("migrate-incoming"),
        "{report}"
    );
    assert_untouched(&vm, &mut qmp, old, "7.2.22");
    upgrade_then_quit(vm, qmp);
}

#[test]
fn new_qemu_killed_once_the_old_holds_the_write_end() {
    survives("stream-out:new:SIGKILL", "");
}

#[test]
fn new_qemu_stopped_once_the_old_holds_the_write_end() {
    survives("stream-out:new:SIGSTOP", "");
}

#[test]
fn new_qemu_killed_mid_migration() {
    survives("migrating:new:SIGKILL", "");
}

#[test]
fn new_qemu_stopped_mid_migration() {
    // The guest is paused from the migration's start until the migration deadline passes and
    // the old QEMU takes it back: seconds, not the thirty of a fixed timeout.
    let (vm, mut qmp, old) = armed("migrating:new:SIGSTOP");
    let start = Instant::now();
    let report = vm.upgrade();
    assert_eq!(report["result"], "failed", "{report}");
    let gap = vm.vm.max_gap_between(start, Instant::now());
    eprintln!("guest paused at most {gap:?}: {report}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{report}"
    );
    assert_untouched(&vm, &mut qmp, old, "7.2.22");
    upgrade_then_quit(vm, qmp);
}

#[test]
fn old_qemu_killed_mid_migration_ends_the_vm() {
    use std::os::unix::process::ExitStatusExt;
    // QEMU died of SIGKILL: so does the shim, as the VM's pid.
    ends_the_vm("migrating:old:SIGKILL", |s| {
        s.signal() == Some(libc::SIGKILL)
    });
}

#[test]
fn shim_killed_mid_migration_takes_both_qemus() {
    use std::os::unix::process::ExitStatusExt;
    ends_the_vm("migrating:launcher:SIGKILL", |s| {
        s.signal() == Some(libc::SIGKILL)
    });
}

#[test]
fn sigterm_mid_migration_ends_the_vm_as_without_an_upgrade() {
    // The SIGTERM waits for the migration to finish or be cancelled, then goes to the QEMU
    // running the guest, which ends as QEMU does on SIGTERM: status 0.
    ends_the_vm("migrating:launcher:SIGTERM", |s| s.code() == Some(0));
}

#[test]
fn sigterm_before_the_migration_ends_the_upgrade_then_the_vm() {
    ends_the_vm("exec:launcher:SIGTERM", |s| s.code() == Some(0));
}

#[test]
fn a_hundred_sigusr2_in_a_tight_loop() {
    many_requests(Duration::ZERO);
}

#[test]
fn a_hundred_sigusr2_ten_ms_apart() {
    many_requests(Duration::from_millis(10));
}

/// 100 upgrade requests `apart`: they coalesce into as many upgrades as finish meanwhile,
/// every one of which succeeds, and the VM ends up on the new QEMU, intact.
fn many_requests(apart: Duration) {
    let (mut vm, mut qmp, _old) = armed("");
    for _ in 0..100 {
        vm.vm.signal(Signal::SIGUSR2);
        std::thread::sleep(apart);
    }
    wait_until(UPGRADE_TIMEOUT, "the first report", || {
        !reports(&vm.vm).is_empty()
    });
    // Settled once no QEMU is being started and no request is pending.
    wait_until(UPGRADE_TIMEOUT, "the upgrades to settle", || {
        let status = cli_status(&vm.rundir(), vm.vm.pid());
        children(vm.vm.pid()).len() == 1
            && status["last_upgrade"]["to"]["generation"] == status["generation"]
    });
    let all = reports(&vm.vm);
    let coalesced: u64 = all
        .iter()
        .map(|r| r["coalesced_requests"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("{} upgrades, {coalesced} requests coalesced", all.len());
    for r in &all {
        assert_eq!(r["result"], "ok", "{r}");
    }
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "10.0.2");
    assert_no_swap_seen(&mut qmp);
    vm.assert_guest_healthy(300);
    quit(&mut vm, &mut qmp);
}

/// Waits until the shim has a second child, stopped (`T` in proc(5) `stat`), and returns it.
fn wait_stopped_child(vm: &UpgradeVm, old: Pid) -> Pid {
    let mut found = None;
    wait_until(UPGRADE_TIMEOUT, "a stopped second child", || {
        found = children(vm.vm.pid())
            .into_iter()
            .find(|&p| p != old && state(p) == Some('T'));
        found.is_some()
    });
    found.expect("checked by wait_until")
}

fn state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn upgrade_reports_to_a_stderr_nobody_reads() {
    // The report goes to stderr, which libvirt points at a log pipe: a reader that went away
    // must cost the line, not the VM (eprintln! panics on EPIPE).
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let dir = qemu_liveupgrade_tests::tempdir();
    let qemu = dir.join("qemu");
    std::os::unix::fs::symlink(qemu_liveupgrade_tests::qemu_build("7.2.22"), &qemu).unwrap();
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let qmp_path = dir.join("qmp.sock");
    let mut cmd = qemu_liveupgrade_tests::shim::shim_command(&qemu, &dir.join("run"));
    cmd.args(guest_argv(64))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(w));
    let mut shim = Group(cmd.process_group(0).spawn().expect("shim"));
    let mut qmp = Qmp::connect_unix(&qmp_path, Duration::from_secs(30));
    let tmp = dir.join("qemu.new");
    std::os::unix::fs::symlink(qemu_liveupgrade_tests::qemu_build("10.0.2"), &tmp).unwrap();
    std::fs::rename(&tmp, &qemu).unwrap();
    let mut cli = Command::new(qemu_liveupgrade_tests::cli_bin());
    cli.args(["upgrade", "--json", &shim.0.id().to_string()])
        .env("QEMU_LIVEUPGRADE_RUNDIR", dir.join("run"));
    let report = qemu_liveupgrade_tests::shim::cli_json(cli, "upgrade");
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "10.0.2");
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    assert!(
        shim.0.try_wait().unwrap().is_none(),
        "the shim survived its report"
    );
    let _ = qmp.try_execute("quit", json!({}));
    wait_until(Duration::from_secs(10), "the shim to end", || {
        shim.0.try_wait().unwrap().is_some()
    });
    assert_eq!(shim.0.wait().unwrap().code(), Some(0));
}

/// What a stalled reader of the VM's stderr (virtlogd stuck, a script that stopped reading)
/// must not stall: the launcher's loop. The shim's stderr is a pipe filled to the brim whose
/// reader never reads. After one upgrade, the QEMU running the guest writes its stderr through
/// the launcher; a QMP client then turns on a trace event for every monitor command, so every
/// command makes QEMU write a line there, far more than the launcher keeps for a stalled
/// stream. Throughout: the guest's console (a socket the launcher serves) keeps flowing, the
/// QMP client is answered, a further upgrade completes, `status` counts the dropped output;
/// once the reader reads again, the launcher says what it dropped.
#[test]
fn a_stalled_stderr_reader_stalls_nothing() {
    use qemu_liveupgrade_tests::linux::Console;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let dir = qemu_liveupgrade_tests::tempdir();
    let qemu = dir.join("qemu");
    std::os::unix::fs::symlink(qemu_liveupgrade_tests::qemu_build("7.2.22"), &qemu).unwrap();
    let rundir = dir.join("run");
    std::fs::create_dir_all(&rundir).unwrap();
    let (stderr_r, stderr_w) = nix::unistd::pipe().unwrap();
    fill(&stderr_w);
    let (qmp_path, console_path) = (dir.join("qmp.sock"), dir.join("console.sock"));
    let mut argv = guest_argv(64);
    qemu_liveupgrade_tests::serial_on_socket(&mut argv, &console_path);
    argv.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_path.display()),
    ]);
    let mut cmd = qemu_liveupgrade_tests::shim::shim_command(&qemu, &rundir);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr_w));
    let shim = Group(cmd.process_group(0).spawn().expect("shim"));
    let pid = Pid::from_raw(shim.0.id() as i32);
    let console = Console::connect("console", &console_path, Duration::from_secs(30));
    let mut qmp = Qmp::connect_unix(&qmp_path, Duration::from_secs(30));
    let heartbeats = |c: &Console| c.lines().iter().filter(|l| l.starts_with("HB ")).count();
    let flowing = |what: &str| {
        let before = heartbeats(&console);
        console.wait_for(what, Duration::from_secs(30), |lines| {
            lines.iter().filter(|l| l.starts_with("HB ")).count() >= before + 50
        });
    };
    flowing("heartbeats at start");

    let upgrade = |to: &str| {
        let tmp = dir.join("qemu.new");
        std::os::unix::fs::symlink(qemu_liveupgrade_tests::qemu_build(to), &tmp).unwrap();
        std::fs::rename(&tmp, &qemu).unwrap();
        let mut cli = Command::new(qemu_liveupgrade_tests::cli_bin());
        cli.args(["upgrade", "--json", &pid.to_string()])
            .env("QEMU_LIVEUPGRADE_RUNDIR", &rundir);
        qemu_liveupgrade_tests::shim::cli_json(cli, "upgrade")
    };
    // Its stderr now goes through the launcher.
    let report = upgrade("10.0.2");
    assert_eq!(report["result"], "ok", "{report}");
    let traced = json!({"name": "monitor_qmp_cmd_in_band", "enable": true});
    qmp.execute("trace-event-set-state", traced);
    // Each command a trace line of some 30 bytes on QEMU's stderr: 150 KiB in all, more than
    // twice what the launcher keeps for a stalled stream.
    for _ in 0..5000 {
        assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    }
    flowing("heartbeats with the stderr stalled");
    let status = cli_status(&rundir, pid);
    let dropped = status["output_dropped_bytes"].as_u64().unwrap_or(0);
    assert!(
        dropped > 64 * 1024,
        "dropped only {dropped} bytes: {status}"
    );

    // A supervisor handover takes what waits, and the count, to the next launcher.
    let (report, ok) =
        qemu_liveupgrade_tests::handover::supervisor_upgrade(Some(&rundir), &pid.to_string(), None);
    assert!(ok, "{report}");
    let handover = report.clone();
    let status = cli_status(&rundir, pid);
    assert_eq!(status["supervisor"]["upgrades"], 1, "{status}");
    let carried = status["output_dropped_bytes"].as_u64().unwrap_or(0);
    assert!(carried >= dropped, "{carried} < {dropped}: {status}");
    flowing("heartbeats after the handover");

    // Another upgrade, its report among what waits for the stalled stderr.
    let report = upgrade("7.2.22");
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "7.2.22");
    flowing("heartbeats after the second upgrade");

    // The reader reads again: what waited comes out, then one line on what was dropped.
    let mut text = Vec::new();
    let noticed = |t: &[u8]| String::from_utf8_lossy(t).contains("bytes of output dropped");
    read_until(&stderr_r, &mut text, Duration::from_secs(30), noticed);
    assert!(
        noticed(&text),
        "no notice of dropped output; the stream's end: {}",
        String::from_utf8_lossy(&text[text.len().saturating_sub(400)..])
    );
    // The notice is the stream's last line, so nothing more comes: whatever else arrives
    // before `quit` would be a second notice.
    read_until(&stderr_r, &mut text, Duration::from_millis(500), |_| false);
    let text = String::from_utf8_lossy(&text);
    let text = text.trim_start_matches('.');
    assert_eq!(
        text.matches("bytes of output dropped").count(),
        1,
        "said once: {}",
        &text[text.len().saturating_sub(400)..]
    );
    // What waited comes out in the order it was written: the first upgrade's report (written
    // to the full pipe before any of QEMU's trace lines), then QEMU's own lines.
    let report_at = text.find("\"result\"").expect("the first upgrade's report");
    let trace_at = text
        .find("monitor_qmp_cmd_in_band")
        .expect("QEMU's own lines came through");
    assert!(report_at < trace_at, "{}", &text[..text.len().min(600)]);
    // The notice counts what status counts: every byte dropped, before and after the handover.
    let notice = text
        .lines()
        .find(|l| l.contains("bytes of output dropped"))
        .unwrap_or_default();
    assert!(
        notice.starts_with("qemu-system-x86_64: qemu-liveupgrade: "),
        "{notice}"
    );
    let said: u64 = notice
        .split(" bytes of output dropped")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {notice:?}"));
    let status = cli_status(&rundir, pid);
    assert_eq!(
        Some(said),
        status["output_dropped_bytes"].as_u64(),
        "{status}"
    );
    assert!(said >= carried, "{said} < {carried}");
    eprintln!(
        "dropped {dropped} bytes before the handover, {carried} after it, {said} in all; \
         {} bytes came out once the reader read; the handover's state: {} bytes, {} ms",
        text.len(),
        handover
            .pointer("/reports/0/state_bytes")
            .unwrap_or(&handover["state_bytes"]),
        handover
            .pointer("/reports/0/handover_ms")
            .unwrap_or(&handover["handover_ms"]),
    );
    let _ = qmp.try_execute("quit", json!({}));
    let mut shim = shim;
    wait_until(Duration::from_secs(10), "the shim to end", || {
        shim.0.try_wait().unwrap().is_some()
    });
    assert_eq!(shim.0.wait().unwrap().code(), Some(0));
}

/// Reads `r` into `text` until `done` says so or `within` has passed.
fn read_until(
    r: &std::os::fd::OwnedFd,
    text: &mut Vec<u8>,
    within: Duration,
    done: impl Fn(&[u8]) -> bool,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::{AsFd, AsRawFd};
    let deadline = Instant::now() + within;
    while !done(text) && Instant::now() < deadline {
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, PollTimeout::from(100u16)).unwrap() > 0 {
            let mut buf = [0u8; 65536];
            let n = nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap();
            text.extend_from_slice(&buf[..n]);
        }
    }
}

/// Fills a pipe through a non-blocking twin of its write end, leaving the end itself
/// blocking, as an inherited stderr is.
fn fill(w: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let twin = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
        .expect("reopen the pipe");
    let flags = nix::fcntl::fcntl(twin.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(twin.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    while nix::unistd::write(&twin, &[b'.'; 4096]).is_ok() {}
}

/// A child in its own process group, killed with it when dropped.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
fn a_clients_own_migration_stays_visible_after_upgrades() {
    // The upgrade's migration is hidden from query-migrate; the VM's users' own is not.
    let (vm, mut qmp, _old) = armed("");
    assert_eq!(vm.upgrade()["result"], "ok");
    assert_no_swap_seen(&mut qmp);
    // Paused first: the heartbeat guest rewrites its RAM faster than a stream converges.
    qmp.execute("stop", json!({}));
    qmp.execute("migrate", json!({"uri": "exec:cat >/dev/null"}));
    wait_until(
        UPGRADE_TIMEOUT,
        "the client's migration to complete",
        || qmp.execute("query-migrate", json!({}))["status"] == "completed",
    );
    qmp.execute("cont", json!({}));
    vm.assert_guest_healthy(200);
}

#[test]
fn a_bad_timeout_is_one_line_and_status_1_not_a_panic_later() {
    // It used to be read at the first upgrade: `inf` panicked there and took the VM along.
    let dir = qemu_liveupgrade_tests::tempdir();
    let qemu = qemu_liveupgrade_tests::qemu_build("7.2.22");
    for (name, value) in [
        ("QEMU_LIVEUPGRADE_START_TIMEOUT", "inf"),
        ("QEMU_LIVEUPGRADE_MIGRATION_TIMEOUT", "1e300"),
    ] {
        let mut cmd = qemu_liveupgrade_tests::shim::shim_command(&qemu, &dir.join("run"));
        cmd.args(guest_argv(32)).env(name, value);
        let out = qemu_liveupgrade_tests::shim::output_within(cmd, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(
            err.trim_end(),
            format!("qemu-system-x86_64: {name}={value}: expected seconds, more than 0 and at most 3600")
        );
    }
}
