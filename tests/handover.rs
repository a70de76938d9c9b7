//! The supervisor upgrades itself under a running VM: the shim hands its whole state over to
//! another build of itself by `execve` in place, and nothing the VM or its users hold notices.
//!
//! A heartbeat guest on QEMU 7.2.22 under the shim (build A) prints every heartbeat on three
//! consoles: COM1 straight to the test (QEMU's stdout, which no launcher relays: the guest's
//! own liveness), COM2 on a pty the launcher holds, COM3 on a unix socket the launcher serves.
//! A QMP client keeps plugging and unplugging USB keyboards and asking the run state, its
//! commands split in two writes. The launcher is then handed over to build B and back, ten
//! times, the way a package upgrade does it: the new build renamed over the installed file,
//! then `qemu-liveupgrade upgrade --supervisor VM`. Each time the shim's pid and QEMU's pid
//! stay, the fds the shim holds are the same number; at the end no console lost or repeated a
//! line, every QMP command was answered once and in order, every unplug's DEVICE_DELETED came
//! once, the guest's heartbeats show no gap above the idle jitter measured between the
//! handovers and QEMU's vCPU thread was never made to wait, and a QEMU upgrade 7.2.22 ->
//! 10.0.2 still works.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use qemu_liveupgrade_tests::handover::{
    builds, console_problems, install, max_gap, supervisor_upgrade, Chatter, Lines,
};
use qemu_liveupgrade_tests::liveupgrade::{version, UPGRADE_TIMEOUT};
use qemu_liveupgrade_tests::shim::{cli_status, open_fds, qemu_child, reports, QEMU_NAME};
use qemu_liveupgrade_tests::{guest_elf, qemu_build, tempdir, wait_until, Qmp, TempDir, Vm};
use serde_json::{json, Value};

const ROUND_TRIPS: usize = 10;

/// One VM at a time: the heartbeat gaps compare handovers against the same host idle, and a
/// second busy guest on two cores would be neither.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM under the shim installed at `<dir>/bin/qemu-liveupgrade-shim`, with its consoles.
struct HandoverVm {
    dir: TempDir,
    vm: Vm,
    shim: PathBuf,
}

impl HandoverVm {
    /// The heartbeat guest on QEMU `version`, its output on COM1 (stdio), COM2 (a pty) and
    /// COM3 (a unix socket the launcher serves), a USB controller for hot-plug, and a QMP
    /// socket.
    fn start(version: &str) -> HandoverVm {
        Self::start_with(version, &[])
    }

    /// [`HandoverVm::start`] with more environment.
    fn start_with(version: &str, env: &[(&str, &str)]) -> HandoverVm {
        let dir = tempdir();
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).expect("mkdir bin");
        let shim = bin.join("qemu-liveupgrade-shim");
        install(&builds().a, &shim);
        std::os::unix::fs::symlink(qemu_build(version), dir.join("qemu")).expect("symlink qemu");
        fs::create_dir_all(dir.join("run")).expect("mkdir run");
        let mut cmd = Command::new(&shim);
        cmd.arg0(QEMU_NAME)
            .env("QEMU_LIVEUPGRADE_BINARY", dir.join("qemu"))
            .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
            .env("QEMU_LIVEUPGRADE_RUNDIR", dir.join("run"))
            .envs(env.iter().copied())
            .args(["-name", "guest=handover,debug-threads=on"])
            .args([
                "-accel",
                "tcg",
                "-machine",
                "pc",
                "-m",
                "128",
                "-nodefaults",
            ])
            .args(["-display", "none", "-usb"])
            .args(["-serial", "stdio", "-serial", "pty"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con3,path={},server=on,wait=off",
                dir.join("console.sock").display()
            ))
            .args(["-serial", "chardev:con3", "-kernel"])
            .arg(guest_elf())
            .args(["-append", "mem=128M ports=3"]);
        // QEMU serves one client per monitor: two monitors, for two clients at once.
        for sock in ["qmp.sock", "qmp2.sock"] {
            cmd.arg("-qmp").arg(format!(
                "unix:{},server=on,wait=off",
                dir.join(sock).display()
            ));
        }
        let vm = Vm::spawn(cmd);
        vm.wait_ready(Duration::from_secs(60));
        HandoverVm { dir, vm, shim }
    }

    fn rundir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn pid(&self) -> Pid {
        self.vm.pid()
    }

    /// The pty the launcher announced for COM2.
    fn pty(&self) -> PathBuf {
        wait_until(Duration::from_secs(30), "the pty announcement", || {
            self.vm.stdout_text().contains("(label serial1)")
        });
        let text = self.vm.stdout_text();
        let path = text
            .lines()
            .filter_map(|l| l.strip_prefix("char device redirected to "))
            .find_map(|l| l.strip_suffix(" (label serial1)"))
            .expect("the pty line");
        PathBuf::from(path)
    }

    fn qmp(&self) -> Qmp {
        let mut q = Qmp::connect_unix(self.dir.join("qmp.sock"), Duration::from_secs(10));
        q.set_timeout(Duration::from_secs(30));
        q
    }

    /// `upgrade --supervisor` to the build at the installed path; the report.
    fn hand_over(&self) -> (Value, bool) {
        supervisor_upgrade(Some(&self.rundir()), &self.pid().to_string(), None)
    }
}

/// The pty opened as a console user opens it, read line by line.
fn pty_console(path: &Path) -> Lines {
    let file = fs::File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Lines::read(file)
}

/// The launcher's fds by number and kind: the same after every round trip, or one leaks.
fn fd_kinds(pid: Pid) -> Vec<(i32, String)> {
    open_fds(pid)
        .into_iter()
        .map(|(fd, _)| {
            let target = fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = target.split(':').next().unwrap_or_default().to_owned();
            (fd, kind)
        })
        .collect()
}

/// Time one thread spent running and waiting to run (schedstat, in the scheduler's
/// sched-stats.rst), in nanoseconds.
fn schedstat(pid: Pid, tid: i32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap_or_default();
    let mut f = text
        .split_whitespace()
        .map(|w| w.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// QEMU's vCPU thread (`CPU 0/TCG`, named with `-name debug-threads=on`).
fn vcpu_thread(qemu: Pid) -> i32 {
    fs::read_dir(format!("/proc/{qemu}/task"))
        .expect("QEMU's threads")
        .filter_map(Result::ok)
        .find(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("CPU 0/")))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
        .expect("a CPU 0 thread")
}

/// How long the vCPU thread was neither running nor waiting for a CPU between two samples
/// taken `wall` apart: blocked, on a lock or on I/O. A guest that computes all the time, as
/// the heartbeat guest does, blocks only when QEMU makes it wait; a busy host only delays it.
fn blocked(a: (u64, u64), b: (u64, u64), wall: Duration) -> Duration {
    let busy = (b.0 - a.0) + (b.1 - a.1);
    wall.saturating_sub(Duration::from_nanos(busy))
}

/// One handover's figures.
struct Figures {
    to: String,
    took: Duration,
    report_ms: f64,
    /// The guest's longest heartbeat gap while it ran.
    guest_gap: Duration,
    /// The same, in windows as long without a handover, just before it.
    idle_gaps: Vec<Duration>,
    /// How long QEMU's vCPU thread was blocked during the handover, and in the idle time
    /// before it, scaled to the handover's length.
    vcpu_blocked: Duration,
    idle_blocked: Duration,
    /// How long it waited for a CPU during the handover: the host's load, not the VM's.
    vcpu_waited: Duration,
    pty_gap: Duration,
    socket_gap: Duration,
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[test]
fn the_supervisor_hands_over_ten_times_and_back_with_nothing_lost() {
    let _alone = one_at_a_time();
    let b = builds();
    let vm = HandoverVm::start("7.2.22");
    let pid = vm.pid();
    let qemu = qemu_child(pid).expect("QEMU runs as the shim's child");
    let vcpu = vcpu_thread(qemu);
    let pty = pty_console(&vm.pty());
    let socket = UnixStream::connect(vm.dir.join("console.sock")).expect("console socket");
    let socket = Lines::read(socket);
    pty.wait_counter(pty.last() + 200, "the pty");
    socket.wait_counter(socket.last() + 200, "the socket console");
    let chatter = Chatter::start(&vm.dir.join("qmp2.sock"));
    // A command half sent before the first handover, finished after it: its first half is in
    // the launcher's buffer across the exec.
    let mut half = UnixStream::connect(vm.dir.join("qmp.sock")).expect("second QMP client");
    let half_lines = Lines::read(half.try_clone().expect("clone"));
    half.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":\"c\"}\n{\"execute\":\"query-na")
        .expect("write half");
    wait_until(
        Duration::from_secs(10),
        "the second client's capabilities",
        || half_lines.all().iter().any(|(_, l)| l.contains("\"c\"")),
    );
    let fds_before = fd_kinds(pid);

    let mut figures = Vec::new();
    for i in 0..ROUND_TRIPS * 2 {
        let (build, name) = match i % 2 {
            0 => (&b.b, "B"),
            _ => (&b.a, "A"),
        };
        // The idle jitter: the same guest and host, no handover, twice as long as one.
        let idle_from = Instant::now();
        let idle_a = schedstat(qemu, vcpu);
        thread::sleep(Duration::from_millis(400));
        let idle_b = schedstat(qemu, vcpu);
        let idle_to = Instant::now();
        install(build, &vm.shim);
        let from = Instant::now();
        let run_a = schedstat(qemu, vcpu);
        let (report, ok) = vm.hand_over();
        let run_b = schedstat(qemu, vcpu);
        let to = Instant::now();
        assert!(ok, "handover {i} to build {name} failed: {report}");
        assert_eq!(report["result"], "ok", "{report}");
        assert_eq!(report["pid"], pid.as_raw(), "{report}");
        assert_eq!(report["qemu_pid"], qemu.as_raw(), "{report}");
        let expected_build = if name == "A" {
            serde_json::Value::from(launcher_build())
        } else {
            "B".into()
        };
        assert_eq!(report["to"]["build"], expected_build, "{report}");
        assert_eq!(qemu_child(pid), Some(qemu), "QEMU is the same child");
        if i == 0 {
            half.write_all(b"me\",\"id\":\"half\"}\n")
                .expect("write the rest");
        }
        // Let the consoles catch up before looking at the window.
        let settle = Instant::now() + Duration::from_millis(200);
        thread::sleep(settle.saturating_duration_since(Instant::now()));
        let arrivals = |beats: Vec<(Instant, u64)>| beats.iter().map(|b| b.0).collect::<Vec<_>>();
        let guest: Vec<Instant> = vm.vm.heartbeats().iter().map(|h| h.at).collect();
        // Idle windows as long as the handover took, cut from the quiet time before it.
        let took = to - from;
        let slices = ((idle_to - idle_from).as_secs_f64() / took.as_secs_f64()).max(1.0) as u32;
        let idle_gaps = (0..slices)
            .map(|k| {
                let start = idle_from + took * k;
                max_gap(&guest, start, (start + took).min(idle_to))
            })
            .collect();
        figures.push(Figures {
            to: name.into(),
            took,
            report_ms: report["handover_ms"].as_f64().unwrap_or(-1.0),
            guest_gap: max_gap(&guest, from, to),
            idle_gaps,
            vcpu_blocked: blocked(run_a, run_b, took),
            idle_blocked: blocked(idle_a, idle_b, idle_to - idle_from)
                .mul_f64(took.as_secs_f64() / (idle_to - idle_from).as_secs_f64()),
            vcpu_waited: Duration::from_nanos(run_b.1 - run_a.1),
            pty_gap: max_gap(&arrivals(pty.beats()), from, to),
            socket_gap: max_gap(&arrivals(socket.beats()), from, to),
        });
        if i % 2 == 1 {
            assert_eq!(
                fd_kinds(pid),
                fds_before,
                "the launcher's fds after round trip {}",
                i / 2 + 1
            );
        }
    }

    // The QMP clients: the half command answered after the exec, every chatter command once
    // and in order, every unplug's event once.
    wait_until(
        Duration::from_secs(10),
        "the reply to the half-sent command",
        || half_lines.all().iter().any(|(_, l)| l.contains("\"half\"")),
    );
    let reply = half_lines
        .all()
        .into_iter()
        .find(|(_, l)| l.contains("\"half\""))
        .map(|(_, l)| l)
        .unwrap_or_default();
    assert!(
        reply.contains("\"return\""),
        "query-name after the handover: {reply}"
    );
    let talk = chatter.finish();
    assert!(
        talk.sent > 30,
        "the QMP client hardly talked: {} commands",
        talk.sent
    );
    assert_eq!(
        talk.problems(),
        Vec::<String>::new(),
        "what the QMP client saw"
    );

    // The consoles: every line once, none lost, the guest never had to drop one.
    pty.wait_counter(pty.last() + 100, "the pty");
    socket.wait_counter(socket.last() + 100, "the socket console");
    assert_eq!(console_problems(&pty.all()), None, "the pty console");
    assert_eq!(console_problems(&socket.all()), None, "the socket console");
    let stdout: Vec<(Instant, String)> = vm
        .vm
        .stdout_text()
        .lines()
        .map(|l| (Instant::now(), l.to_owned()))
        .collect();
    assert_eq!(console_problems(&stdout), None, "COM1");
    assert!(
        vm.vm.errors().is_clean(),
        "guest memory errors: {:?}",
        vm.vm.errors()
    );

    // The guest during handovers against the same host without them. A heartbeat gap is
    // the sum of two things: QEMU made to wait (stopped, or blocked on a lock or on I/O),
    // which a handover must never do, and the host's CPUs busy elsewhere, which a handover's
    // three short processes add to on a loaded two-core machine as any process would. The
    // vCPU thread's scheduler statistics tell them apart; both are compared, over the typical
    // window: on a shared machine one window or another catches a stall of the host's.
    print_figures(&figures);
    let during = median(figures.iter().map(|f| f.guest_gap).collect());
    let idle = median(figures.iter().flat_map(|f| f.idle_gaps.clone()).collect());
    let blocked = median(figures.iter().map(|f| f.vcpu_blocked).collect());
    let idle_blocked = median(figures.iter().map(|f| f.idle_blocked).collect());
    eprintln!(
        "handover: typical longest heartbeat gap {during:?} during a handover, {idle:?} idle; \
         vCPU blocked {blocked:?} during, {idle_blocked:?} idle"
    );
    assert!(
        blocked <= idle_blocked + Duration::from_millis(5),
        "QEMU's vCPU waits during handovers: typically {blocked:?}, against {idle_blocked:?} idle"
    );
    assert!(
        during <= idle * 2 + Duration::from_millis(25),
        "the guest's heartbeats stall during handovers: typically {during:?}, against {idle:?} idle"
    );

    // The launcher knows what happened, and says so.
    let status = cli_status(&vm.rundir(), pid);
    assert_eq!(status["supervisor"]["build"], launcher_build(), "{status}");
    assert_eq!(
        status["supervisor"]["upgrades"],
        ROUND_TRIPS * 2,
        "{status}"
    );
    let logged = reports(&vm.vm)
        .into_iter()
        .filter(|r| r["qemu-liveupgrade"] == "supervisor-upgrade")
        .count();
    assert_eq!(logged, ROUND_TRIPS * 2, "report lines in the VM's log");

    // A QEMU upgrade after all that: the same launcher state drives it. Then a handover of a
    // later generation (its stderr through the launcher), and a QEMU upgrade back.
    half.shutdown(std::net::Shutdown::Both)
        .expect("close the second client");
    let mut qmp = vm.qmp();
    qemu_upgrade(&vm, "10.0.2");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "10.0.2");
    install(&b.b, &vm.shim);
    let (report, ok) = vm.hand_over();
    assert!(ok, "handover of generation 2: {report}");
    assert_eq!(report["generation"], 2, "{report}");
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "10.0.2");
    // A handover asked for while a QEMU upgrade runs waits for it to end: never interleaved.
    let before = reports(&vm.vm).len();
    repoint(&vm, "7.2.22");
    vm.vm.signal(Signal::SIGUSR2);
    let (report, ok) = vm.hand_over();
    assert!(ok, "handover asked during a QEMU upgrade: {report}");
    let kinds: Vec<Value> = reports(&vm.vm)
        .into_iter()
        .skip(before)
        .map(|r| json!([r["qemu-liveupgrade"], r["result"]]))
        .collect();
    assert_eq!(
        kinds,
        [
            json!(["upgrade", "ok"]),
            json!(["supervisor-upgrade", "ok"])
        ],
        "the QEMU upgrade, then the handover"
    );
    assert_eq!(version(&qmp.execute("query-version", json!({}))), "7.2.22");
    assert!(
        vm.vm.errors().is_clean(),
        "guest memory errors: {:?}",
        vm.vm.errors()
    );
    for (console, what) in [(&pty, "the pty"), (&socket, "the socket")] {
        console.wait_counter(console.last() + 200, what);
        assert_eq!(console_problems(&console.all()), None, "{what} console");
    }
}

/// Points the QEMU path at build `to`, as a package upgrade does.
fn repoint(vm: &HandoverVm, to: &str) {
    let tmp = vm.dir.join("qemu.new");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(qemu_build(to), &tmp).expect("symlink");
    fs::rename(&tmp, vm.dir.join("qemu")).expect("repoint the QEMU path");
}

/// Points the QEMU path at `to`, sends SIGUSR2 and checks the upgrade's report.
fn qemu_upgrade(vm: &HandoverVm, to: &str) {
    repoint(vm, to);
    let before = reports(&vm.vm).len();
    vm.vm.signal(Signal::SIGUSR2);
    wait_until(UPGRADE_TIMEOUT, "the QEMU upgrade's report", || {
        reports(&vm.vm)
            .iter()
            .skip(before)
            .any(|r| r["qemu-liveupgrade"] == "upgrade")
    });
    let report = reports(&vm.vm)
        .into_iter()
        .skip(before)
        .find(|r| r["qemu-liveupgrade"] == "upgrade")
        .unwrap_or_default();
    assert_eq!(report["result"], "ok", "QEMU upgrade to {to}: {report}");
    assert_eq!(report["to"]["version"], to, "{report}");
}

/// The build string this workspace's launcher reports.
fn launcher_build() -> String {
    std::env::var("QEMU_LIVEUPGRADE_BUILD").unwrap_or_else(|_| "dev".into())
}

fn print_figures(figures: &[Figures]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "handover: {:>3} {:>3} {:>7} {:>8} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "#",
        "to",
        "cli",
        "handover",
        "guest gap",
        "idle gap*",
        "pty gap",
        "sock gap",
        "blocked",
        "idle blk",
        "cpu wait"
    );
    for (i, f) in figures.iter().enumerate() {
        eprintln!(
            "handover: {:>3} {:>3} {:>7.1} {:>8.1} {:>9.1} {:>9.1} {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            i + 1,
            f.to,
            ms(f.took),
            f.report_ms,
            ms(f.guest_gap),
            ms(median(f.idle_gaps.clone())),
            ms(f.pty_gap),
            ms(f.socket_gap),
            ms(f.vcpu_blocked),
            ms(f.idle_blocked),
            ms(f.vcpu_waited),
        );
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("handover: * the median of windows as long, without a handover, just before it");
    eprintln!("handover: gaps in ms; load average {}", load.trim());
}

#[test]
fn a_build_that_cannot_read_the_state_leaves_the_vm_on_the_old_launcher() {
    let _alone = one_at_a_time();
    let b = builds();
    let vm = HandoverVm::start("7.2.22");
    let pid = vm.pid();
    let qemu = qemu_child(pid).expect("QEMU runs as the shim's child");
    let mut qmp = vm.qmp();
    let fds = fd_kinds(pid);
    let cases: [(&Path, &str); 3] = [
        (
            &b.old_schema,
            // Whatever version this build writes, the old one reads none but 0.
            "is newer than this build reads (0 at most)",
        ),
        (Path::new("/bin/true"), "gave no answer to the state check"),
        (
            Path::new("/nonexistent/qemu-liveupgrade-shim"),
            "cannot execute",
        ),
    ];
    for (to, why) in cases {
        let (report, ok) = supervisor_upgrade(Some(&vm.rundir()), &pid.to_string(), Some(to));
        assert!(!ok, "the CLI says the handover to {} failed", to.display());
        assert_eq!(report["result"], "failed", "{report}");
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(why),
            "reason for {}: {reason}",
            to.display()
        );
        // Still the old launcher, still whole.
        assert_eq!(qemu_child(pid), Some(qemu));
        let status = cli_status(&vm.rundir(), pid);
        assert_eq!(status["supervisor"]["build"], launcher_build(), "{status}");
        assert_eq!(status["supervisor"]["upgrades"], 0, "{status}");
        assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
        assert_eq!(
            fd_kinds(pid),
            fds,
            "the launcher's fds after a refused handover"
        );
    }
    let logged: Vec<Value> = reports(&vm.vm)
        .into_iter()
        .filter(|r| r["qemu-liveupgrade"] == "supervisor-upgrade")
        .collect();
    assert_eq!(
        logged.len(),
        3,
        "each refusal is in the VM's log: {logged:?}"
    );
    let now = vm.vm.last_heartbeat().map_or(0, |h| h.counter);
    wait_until(
        Duration::from_secs(30),
        "heartbeats after the refusals",
        || {
            vm.vm
                .last_heartbeat()
                .is_some_and(|h| h.counter > now + 100)
        },
    );
}

#[test]
fn a_new_build_that_cannot_read_the_state_after_all_hands_the_vm_back() {
    let _alone = one_at_a_time();
    let b = builds();
    // Every new image fails to read the state it is handed, after the check said it would:
    // no real build does that, so a test hook makes it.
    let vm = HandoverVm::start_with(
        "7.2.22",
        &[("QEMU_LIVEUPGRADE_TEST_HANDOVER", "unreadable")],
    );
    let pid = vm.pid();
    let qemu = qemu_child(pid).expect("QEMU runs as the shim's child");
    let mut qmp = vm.qmp();
    let fds = fd_kinds(pid);
    install(&b.b, &vm.shim);
    let (report, ok) = vm.hand_over();
    assert!(!ok, "the CLI says the handover failed: {report}");
    assert_eq!(report["result"], "failed", "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the new supervisor could not read the state")
            && reason.contains("QEMU_LIVEUPGRADE_TEST_HANDOVER"),
        "{reason}"
    );
    // The old build runs the VM again, the same process, QEMU and fds.
    assert_eq!(report["pid"], pid.as_raw(), "{report}");
    assert_eq!(qemu_child(pid), Some(qemu));
    let status = cli_status(&vm.rundir(), pid);
    assert_eq!(status["supervisor"]["build"], launcher_build(), "{status}");
    assert_eq!(status["supervisor"]["upgrades"], 0, "{status}");
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    assert_eq!(fd_kinds(pid), fds, "the launcher's fds after going back");
    let now = vm.vm.last_heartbeat().map_or(0, |h| h.counter);
    wait_until(
        Duration::from_secs(30),
        "heartbeats after going back",
        || {
            vm.vm
                .last_heartbeat()
                .is_some_and(|h| h.counter > now + 100)
        },
    );
}
