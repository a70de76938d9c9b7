//! The shim as its callers see it: libvirt, scripts and the operator, against the distribution's
//! QEMU under TCG and the heartbeat guest.
//!
//! What is checked is the contract of a drop-in: queries are QEMU's own answers, a VM keeps the
//! shim's pid while QEMU runs as its child, signals reach QEMU, the shim ends exactly as QEMU
//! ended, libvirt's daemonizing probe works as it does with QEMU, an inherited fd the command
//! line does not name never reaches QEMU, and an idle VM costs the shim nothing. Where QEMU's
//! behaviour is the reference, the test runs QEMU directly and compares.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qemu_liveupgrade_tests::shim::{
    children, cli_status, cmdline_of, ctxt_switches, exe_of, install_shim, is_running, open_fds,
    output_within, reports, shim_command, wait_qemu_child, Daemon, QEMU_NAME,
};
use qemu_liveupgrade_tests::{
    guest_argv, shim_bin, system_qemu, tempdir, wait_until, Qmp, TempDir, Vm,
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(15);
const EXIT: Duration = Duration::from_secs(15);
const QUERY: Duration = Duration::from_secs(30);
const QMP: Duration = Duration::from_secs(10);
/// PATH as libvirt passes it: nothing else survives its environment scrub.
const LIBVIRT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A test's temporary directory with a `run/` for the shim's control sockets.
struct Dirs {
    tmp: TempDir,
    run: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempdir();
    let run = tmp.join("run");
    fs::create_dir(&run).unwrap();
    Dirs { tmp, run }
}

fn spawn_shim(argv: &[String], run: &Path) -> Vm {
    let mut cmd = shim_command(&system_qemu(), run);
    cmd.args(argv);
    Vm::spawn(cmd)
}

fn spawn_real(argv: &[String]) -> Vm {
    let mut cmd = Command::new(system_qemu());
    cmd.args(argv);
    Vm::spawn(cmd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn control_socket(run: &Path, pid: Pid) -> PathBuf {
    run.join(format!("{pid}.sock"))
}

fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Asserts two runs ended the same way and wrote the same bytes.
fn assert_same_output(what: &str, got: &Output, want: &Output) {
    assert_eq!(
        (got.status.code(), got.status.signal()),
        (want.status.code(), want.status.signal()),
        "{what}: shim ended {}, QEMU {}; shim stderr:\n{}",
        got.status,
        want.status,
        text(&got.stderr)
    );
    assert!(
        got.stdout == want.stdout,
        "{what}: stdout differs from QEMU's\n--- shim ---\n{}\n--- QEMU ---\n{}",
        text(&got.stdout),
        text(&want.stdout)
    );
    assert!(
        got.stderr == want.stderr,
        "{what}: stderr differs from QEMU's\n--- shim ---\n{}\n--- QEMU ---\n{}",
        text(&got.stderr),
        text(&want.stderr)
    );
}

/// Asserts a failure is exactly one line in QEMU's style, and exit status 1.
fn assert_one_line_failure(what: &str, out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: ended {}; stderr: {err}",
        out.status
    );
    assert_eq!(err.lines().count(), 1, "{what}: not one line: {err:?}");
    assert!(err.ends_with('\n'), "{what}: unterminated line: {err:?}");
    assert!(
        err.starts_with(&format!("{QEMU_NAME}: ")),
        "{what}: not in QEMU's style: {err:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: wrote to stdout: {}",
        text(&out.stdout)
    );
    err
}

// ---- 1. Queries are QEMU's own ----

#[test]
fn queries_and_bad_options_are_answered_by_qemu_itself() {
    let d = dirs();
    let cases: [&[&str]; 5] = [
        &["-version"],
        &["-machine", "help"],
        &["-device", "help"],
        &["-cpu", "help"],
        &["-no-such-option"],
    ];
    for args in cases {
        let what = args.join(" ");
        let mut real = Command::new(system_qemu());
        real.args(args);
        let want = output_within(real, QUERY);
        let mut shim = shim_command(&system_qemu(), &d.run);
        shim.args(args);
        let got = output_within(shim, QUERY);
        assert_same_output(&what, &got, &want);
        if args != ["-no-such-option"] {
            assert!(
                got.status.success() && !got.stdout.is_empty(),
                "{what}: {}",
                got.status
            );
        }
    }
    // The bad option in QEMU's words, not the launcher's.
    let mut shim = shim_command(&system_qemu(), &d.run);
    shim.arg("-no-such-option");
    let got = output_within(shim, QUERY);
    assert_eq!(got.status.code(), Some(1));
    assert_eq!(
        text(&got.stderr),
        format!("{QEMU_NAME}: -no-such-option: invalid option\n")
    );
    // Handed over with execv: no supervisor ever ran, so no control socket was made.
    assert!(entries(&d.run).is_empty(), "{:?}", entries(&d.run));
}

// ---- 2. A guest under the shim; SIGTERM ----

#[test]
fn guest_runs_as_child_and_sigterm_ends_both_as_qemu_would() {
    let d = dirs();
    let argv = guest_argv(64);

    // The reference: QEMU itself, started the same way and sent the same signal.
    let mut real = spawn_real(&argv);
    real.wait_ready(READY);
    real.signal(Signal::SIGTERM);
    let real_status = real.wait_exit(EXIT);

    let mut vm = spawn_shim(&argv, &d.run);
    vm.wait_ready(READY);
    let beats = vm.wait_heartbeats_after(Instant::now(), 200, Duration::from_secs(10));
    for pair in beats.windows(2) {
        assert_eq!(pair[1].counter, pair[0].counter + 1, "heartbeat skipped");
    }
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());

    let shim = vm.pid();
    let qemu = wait_qemu_child(shim, Duration::from_secs(5));
    assert_ne!(qemu, shim, "QEMU must not be the shim's own pid");
    assert_eq!(exe_of(shim), canonical(&shim_bin()));
    assert_eq!(exe_of(qemu), canonical(&system_qemu()));
    let qemu_argv = cmdline_of(qemu);
    assert_eq!(qemu_argv[0], QEMU_NAME, "QEMU gets the shim's argv[0]");
    assert!(
        qemu_argv.ends_with(&argv_tail_private_monitor(&qemu_argv)),
        "{qemu_argv:?}"
    );

    let status = cli_status(&d.run, shim);
    assert_eq!(status["pid"], shim.as_raw());
    assert_eq!(status["qemu_pid"], qemu.as_raw());
    assert_eq!(status["generation"], 1);
    assert_eq!(status["binary"], system_qemu().to_string_lossy().as_ref());
    assert!(
        status["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.2.")),
        "{status}"
    );
    assert!(
        status["machine"]
            .as_str()
            .is_some_and(|m| m.starts_with("pc-i440fx-")),
        "the pc alias is resolved to a versioned type: {status}"
    );

    vm.signal(Signal::SIGTERM);
    let status = vm.wait_exit(EXIT);
    assert!(!is_running(qemu), "QEMU {qemu} outlived the shim");
    assert_eq!(
        (status.code(), status.signal()),
        (real_status.code(), real_status.signal()),
        "shim ended {status}, QEMU itself {real_status}"
    );
    // It was QEMU that handled the signal, as it would have run directly.
    vm.wait_stderr_contains("terminating on signal 15", Duration::from_secs(5));
    assert!(reports(&vm).is_empty(), "{:?}", reports(&vm));
    assert!(
        !control_socket(&d.run, shim).exists(),
        "control socket left behind"
    );
}

/// The last four words of a generation's argv: the private monitor the launcher adds.
fn argv_tail_private_monitor(argv: &[String]) -> Vec<String> {
    let chardev = argv
        .iter()
        .rev()
        .find(|a| a.starts_with("socket,id=qemu-liveupgrade-qmp,fd="))
        .cloned()
        .unwrap_or_else(|| panic!("no private monitor in {argv:?}"));
    vec![
        "-chardev".into(),
        chardev,
        "-mon".into(),
        "chardev=qemu-liveupgrade-qmp,mode=control".into(),
    ]
}

// ---- 3. SIGKILL to the shim ----

#[test]
fn sigkill_to_the_shim_takes_qemu_down() {
    let d = dirs();
    let mut vm = spawn_shim(&guest_argv(64), &d.run);
    vm.wait_ready(READY);
    let qemu = wait_qemu_child(vm.pid(), Duration::from_secs(5));
    assert!(is_running(qemu));
    vm.signal(Signal::SIGKILL);
    let status = vm.wait_exit(EXIT);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // PR_SET_PDEATHSIG: the kernel kills QEMU as the shim dies; 1 s is only a deadline.
    wait_until(Duration::from_secs(1), "QEMU to die with the shim", || {
        !is_running(qemu)
    });
}

// ---- 4. QEMU dies of a signal ----

#[test]
fn qemu_killed_by_sigsegv_makes_the_shim_die_of_sigsegv() {
    let d = dirs();
    let mut cmd = shim_command(&system_qemu(), &d.run);
    cmd.args(guest_argv(64)).current_dir(d.tmp.path());
    // No core file from QEMU (core_pattern may write one into the working directory).
    // SAFETY: setrlimit(2) is async-signal-safe and touches only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vm = Vm::spawn(cmd);
    vm.wait_ready(READY);
    let qemu = wait_qemu_child(vm.pid(), Duration::from_secs(5));
    kill(qemu, Signal::SIGSEGV).unwrap();
    let status = vm.wait_exit(EXIT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "shim ended {status}, not by SIGSEGV"
    );
    assert_eq!(status.code(), None);
}

// ---- 5. QEMU exits with a code ----

#[test]
fn qemu_exit_code_and_error_reach_the_caller() {
    let d = dirs();
    let args = [
        "-accel",
        "tcg",
        "-machine",
        "no-such-machine",
        "-m",
        "64",
        "-nodefaults",
        "-nographic",
    ];
    let mut real = Command::new(system_qemu());
    real.args(args);
    let want = output_within(real, QUERY);
    assert_eq!(want.status.code(), Some(1), "{}", text(&want.stderr));
    let mut shim = shim_command(&system_qemu(), &d.run);
    shim.args(args);
    let got = output_within(shim, QUERY);
    assert_same_output("-machine no-such-machine", &got, &want);
    assert!(
        text(&got.stderr).starts_with(&format!("{QEMU_NAME}: unsupported machine type")),
        "{}",
        text(&got.stderr)
    );
}

// ---- 6. libvirt's capability probe ----

/// libvirt's probe of `emulator`, as libvirt 9.0 runs it (FACTS.md): a scrubbed environment,
/// `machine` as the `-machine` argument. Only the control socket directory is added.
fn probe(emulator: &Path, run: &Path, qmp: &Path, pidfile: &Path, machine: &str) -> Command {
    let mut cmd = Command::new(emulator);
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PATH", LIBVIRT_PATH)
        .env("QEMU_LIVEUPGRADE_RUNDIR", run)
        .args([
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            machine,
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
            "-pidfile",
            &pidfile.display().to_string(),
            "-daemonize",
        ]);
    cmd
}

/// Runs the probe on an installed shim and checks what libvirt relies on: exit 0 only once
/// the QMP socket accepts, a pidfile naming the shim, QEMU its child.
fn start_probe(shim: &Path, d: &Dirs, qmp: &Path, pidfile: &Path) -> (Daemon, Pid) {
    let out = output_within(
        probe(shim, &d.run, qmp, pidfile, "none,accel=tcg"),
        Duration::from_secs(30),
    );
    // Guard first, so a failing assertion below still ends the daemon.
    let daemon = pidfile.exists().then(|| Daemon::from_pidfile(pidfile));
    assert!(
        out.status.success(),
        "probe ended {}: {}",
        out.status,
        text(&out.stderr)
    );
    // Not connect_unix's retries: the socket must accept the moment the foreground is gone.
    UnixStream::connect(qmp)
        .unwrap_or_else(|e| panic!("QMP socket not listening when the probe exited: {e}"));
    // QEMU prints nothing on a successful daemonizing start.
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));

    let daemon = daemon.expect("no pidfile after a successful probe");
    let pid = daemon.pid();
    assert!(is_running(pid), "pidfile names {pid}, which is not running");
    assert_eq!(
        exe_of(pid),
        canonical(&shim_bin()),
        "pidfile pid is the shim"
    );
    // QEMU's double fork: a new session, led by the intermediate process, so the daemon can
    // never acquire a controlling terminal.
    let sid = nix::unistd::getsid(Some(pid)).unwrap();
    assert_ne!(
        sid,
        nix::unistd::getsid(None).unwrap(),
        "still in our session"
    );
    assert_ne!(sid, pid, "the daemon leads its session");
    let qemu = wait_qemu_child(pid, Duration::from_secs(5));
    assert_eq!(exe_of(qemu), canonical(&system_qemu()));
    (daemon, qemu)
}

/// A raw connection to a QMP socket that has read the greeting; for watching it close.
fn qmp_greeted(path: &Path) -> BufReader<UnixStream> {
    let stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(QMP)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "not a greeting: {line:?}");
    reader
}

/// Waits for the peer to close `conn` (EOF or reset); panics on the read timeout.
fn assert_closes(mut conn: BufReader<UnixStream>) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("QMP connection still open after {QMP:?}")
            }
            Err(_) => return,
        }
    }
}

#[test]
fn libvirt_probe_sigterm_ends_the_vm_and_removes_the_pidfile() {
    let d = dirs();
    let shim = install_shim(d.tmp.path(), Some(&system_qemu()));
    let (qmp, pidfile) = (d.tmp.join("qmp.monitor"), d.tmp.join("qmp.pid"));
    let (daemon, qemu) = start_probe(&shim, &d, &qmp, &pidfile);
    let pid = daemon.pid();

    let mut q = Qmp::connect_unix(&qmp, QMP);
    let version = q.execute("query-version", Value::Null);
    assert_eq!(version["qemu"]["major"], 7, "{version}");
    assert_eq!(
        q.execute("query-status", Value::Null)["status"],
        "prelaunch"
    );
    drop(q);

    let conn = qmp_greeted(&qmp);
    kill(pid, Signal::SIGTERM).unwrap();
    assert_closes(conn);
    wait_until(EXIT, "QEMU to exit", || !is_running(qemu));
    wait_until(EXIT, "the shim to exit", || !is_running(pid));
    wait_until(EXIT, "the pidfile to be removed", || !pidfile.exists());
    assert!(!control_socket(&d.run, pid).exists());
}

#[test]
fn libvirt_probe_sigkill_ends_the_vm() {
    let d = dirs();
    let shim = install_shim(d.tmp.path(), Some(&system_qemu()));
    let (qmp, pidfile) = (d.tmp.join("qmp.monitor"), d.tmp.join("qmp.pid"));
    let (daemon, qemu) = start_probe(&shim, &d, &qmp, &pidfile);

    let conn = qmp_greeted(&qmp);
    kill(daemon.pid(), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(1), "QEMU to die with the shim", || {
        !is_running(qemu)
    });
    assert_closes(conn);
}

#[test]
fn libvirt_probe_failures_are_reported_by_the_foreground() {
    let d = dirs();
    let shim = install_shim(d.tmp.path(), Some(&system_qemu()));
    // An option QEMU does not know, and one whose value it refuses only once it starts.
    let cases: [(&str, &[&str]); 2] = [
        ("none,accel=tcg", &["-no-such-option"]),
        ("none,accel=no-such-accel", &[]),
    ];
    for (i, (machine, extra)) in cases.into_iter().enumerate() {
        let what = format!("probe with -machine {machine} {}", extra.join(" "));
        let real_dir = d.tmp.join(format!("real{i}"));
        fs::create_dir(&real_dir).unwrap();
        let mut real = probe(
            &system_qemu(),
            &d.run,
            &real_dir.join("qmp.monitor"),
            &real_dir.join("qmp.pid"),
            machine,
        );
        real.args(extra);
        let want = output_within(real, Duration::from_secs(30));
        assert_ne!(want.status.code(), Some(0), "{what}: QEMU itself started");

        let (qmp, pidfile) = (
            d.tmp.join(format!("qmp{i}.monitor")),
            d.tmp.join(format!("qmp{i}.pid")),
        );
        let mut cmd = probe(&shim, &d.run, &qmp, &pidfile, machine);
        cmd.args(extra);
        let got = output_within(cmd, Duration::from_secs(30));
        let _daemon = pidfile.exists().then(|| Daemon::from_pidfile(&pidfile));
        assert_same_output(&what, &got, &want);
        assert!(
            text(&got.stderr).starts_with(&format!("{QEMU_NAME}: ")),
            "{what}: {}",
            text(&got.stderr)
        );
        wait_until(EXIT, "the pidfile to be removed", || !pidfile.exists());
        wait_until(EXIT, "the control socket to be removed", || {
            entries(&d.run).is_empty()
        });
    }
}

#[test]
fn libvirt_probe_on_a_held_pidfile_fails() {
    let d = dirs();
    let shim = install_shim(d.tmp.path(), Some(&system_qemu()));
    let (qmp, pidfile) = (d.tmp.join("qmp.monitor"), d.tmp.join("qmp.pid"));
    let (daemon, qemu) = start_probe(&shim, &d, &qmp, &pidfile);

    let qmp2 = d.tmp.join("qmp2.monitor");
    let out = output_within(
        probe(&shim, &d.run, &qmp2, &pidfile, "none,accel=tcg"),
        Duration::from_secs(30),
    );
    let err = assert_one_line_failure("second probe on a held pidfile", &out);
    assert!(
        err.starts_with(&format!(
            "{QEMU_NAME}: cannot create PID file: Cannot lock pid file"
        )),
        "not QEMU's message: {err:?}"
    );
    assert!(
        UnixStream::connect(&qmp2).is_err(),
        "the second VM started anyway"
    );

    // The first VM is untouched: its pidfile, its process, its monitor.
    assert_eq!(
        fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", daemon.pid())
    );
    assert!(is_running(daemon.pid()) && is_running(qemu));
    let mut q = Qmp::connect_unix(&qmp, QMP);
    assert_eq!(
        q.execute("query-status", Value::Null)["status"],
        "prelaunch"
    );
}

// ---- 7. Inherited fds ----

/// A close-on-exec copy of `fd` at 100 or above, clear of every number the child is given.
fn high_copy(fd: impl AsFd) -> OwnedFd {
    let fd = fd.as_fd();
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
        .expect("F_DUPFD_CLOEXEC");
    // SAFETY: fcntl just returned this fd, and nothing else owns it.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) }
}

fn identity(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_fd().as_raw_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

#[test]
fn inherited_fds_are_served_or_closed_never_leaked() {
    let d = dirs();
    let (path_a, path_b) = (d.tmp.join("mon-a.sock"), d.tmp.join("mon-b.sock"));
    let mon_a = UnixListener::bind(&path_a).unwrap();
    let mon_b = UnixListener::bind(&path_b).unwrap();
    let stray_a = File::create(d.tmp.join("stray-a")).unwrap();
    let stray_b = File::create(d.tmp.join("stray-b")).unwrap();
    // Named: 3 (where the launcher would put its own fds if it were free) and 28 (libvirt's
    // kind of number). Not named: 4 and 29, right next to them.
    let copies = [
        (high_copy(&mon_a), 3),
        (high_copy(&stray_a), 4),
        (high_copy(&mon_b), 28),
        (high_copy(&stray_b), 29),
    ];
    let moves: Vec<(RawFd, RawFd)> = copies.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();

    let mut cmd = shim_command(&system_qemu(), &d.run);
    cmd.args(guest_argv(64)).args([
        "-chardev",
        "socket,id=mon0,fd=3,server=on,wait=off",
        "-mon",
        "chardev=mon0,mode=control",
        "-chardev",
        "socket,id=mon1,fd=28,server=on,wait=off",
        "-mon",
        "chardev=mon1,mode=control",
    ]);
    // SAFETY: dup2(2) is async-signal-safe, and `moves` is only read. Every source is 100 or
    // above and every target below, so no move clobbers a source; dup2's copy is not
    // close-on-exec, so the targets are inherited as libvirt passes its fds.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &moves {
                if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let vm = Vm::spawn(cmd);
    drop(copies);
    vm.wait_ready(READY);
    let qemu = wait_qemu_child(vm.pid(), Duration::from_secs(5));

    let mut a = Qmp::connect_unix(&path_a, QMP);
    assert_eq!(a.execute("query-status", Value::Null)["status"], "running");
    let mut b = Qmp::connect_unix(&path_b, QMP);
    assert_eq!(b.execute("query-version", Value::Null)["qemu"]["major"], 7);

    // The launcher serves libvirt's listening sockets itself, so that clients stay connected
    // when QEMU is replaced (monitors.rs): the VM's pid holds them and QEMU listens on a
    // socket of its own, never on the user's, where it would race the launcher for clients.
    let shim_fds: Vec<(u64, u64)> = open_fds(vm.pid()).into_iter().map(|(_, id)| id).collect();
    let qemu_fds: BTreeMap<i32, (u64, u64)> = open_fds(qemu).into_iter().collect();
    for (name, listener) in [("fd 3", &mon_a), ("fd 28", &mon_b)] {
        let id = identity(listener);
        assert!(
            shim_fds.contains(&id),
            "the listener passed as {name} is not held by the shim"
        );
        let in_qemu: Vec<_> = qemu_fds.iter().filter(|(_, v)| **v == id).collect();
        assert!(
            in_qemu.is_empty(),
            "the listener passed as {name} is open in QEMU as {in_qemu:?}"
        );
    }
    let qemu_argv = cmdline_of(qemu);
    for word in ["fd=3,", "fd=28,"] {
        assert!(
            !qemu_argv.iter().any(|a| a.contains(word)),
            "QEMU is told to use the user's {word}: {qemu_argv:?}"
        );
    }
    // An fd the command line does not name is not QEMU's business.
    for (name, file) in [("stray fd 4", &stray_a), ("stray fd 29", &stray_b)] {
        let id = identity(file);
        let leaked: Vec<_> = qemu_fds.iter().filter(|(_, v)| **v == id).collect();
        assert!(leaked.is_empty(), "{name} is open in QEMU as {leaked:?}");
    }
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}

// ---- 8. Failures of the shim's own ----

#[test]
fn missing_real_binary_is_one_line_and_status_1() {
    let d = dirs();
    // No .real beside it, no config file: nothing to fall back on.
    let shim = install_shim(d.tmp.path(), None);
    let starts_vm = ["-machine", "none", "-S", "-nodefaults", "-nographic"];
    let daemonizing = [
        "-machine",
        "none",
        "-S",
        "-nodefaults",
        "-nographic",
        "-daemonize",
    ];
    let cases: [&[&str]; 3] = [&["-version"], &starts_vm, &daemonizing];
    for args in cases {
        let mut cmd = Command::new(&shim);
        cmd.args(args)
            .env("QEMU_LIVEUPGRADE_BINARY", "/nonexistent")
            .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
            .env("QEMU_LIVEUPGRADE_RUNDIR", &d.run);
        let out = output_within(cmd, QUERY);
        let err = assert_one_line_failure(&args.join(" "), &out);
        assert!(err.contains("/nonexistent"), "does not say what: {err:?}");
    }
    assert!(entries(&d.run).is_empty(), "{:?}", entries(&d.run));
}

#[test]
fn invalid_config_file_is_one_line_and_status_1() {
    let d = dirs();
    // A usable .real is there: the broken config must not be passed over silently.
    let shim = install_shim(d.tmp.path(), Some(&system_qemu()));
    let config = d.tmp.join("config.json");
    fs::write(&config, "{\"binary\": \"/usr/bin/qemu-system-x86_64\",").unwrap();
    for args in [&["-version"][..], &["-machine", "none", "-S", "-nographic"]] {
        let mut cmd = Command::new(&shim);
        cmd.args(args)
            .env_remove("QEMU_LIVEUPGRADE_BINARY")
            .env("QEMU_LIVEUPGRADE_CONFIG", &config)
            .env("QEMU_LIVEUPGRADE_RUNDIR", &d.run);
        let out = output_within(cmd, QUERY);
        let err = assert_one_line_failure(&args.join(" "), &out);
        assert!(
            err.contains(&config.display().to_string()),
            "does not name the file: {err:?}"
        );
    }
}

#[test]
fn readconfig_is_refused_in_one_line() {
    let d = dirs();
    // A config QEMU itself would accept, so the refusal is the launcher's.
    let cfg = d.tmp.join("x.cfg");
    fs::write(&cfg, "[machine]\n  type = \"none\"\n").unwrap();
    let mut cmd = shim_command(&system_qemu(), &d.run);
    cmd.args(["-readconfig", "x.cfg", "-S", "-nographic", "-nodefaults"])
        .current_dir(d.tmp.path());
    let out = output_within(cmd, QUERY);
    let err = assert_one_line_failure("-readconfig x.cfg", &out);
    assert!(err.contains("-readconfig"), "{err:?}");
    assert!(entries(&d.run).is_empty(), "a VM was started anyway");
}

// ---- 9. Idle ----

#[test]
fn idle_shim_does_not_wake_while_the_guest_runs() {
    let d = dirs();
    let vm = spawn_shim(&guest_argv(64), &d.run);
    vm.wait_ready(READY);
    let shim = vm.pid();
    let qemu = wait_qemu_child(shim, Duration::from_secs(5));
    // Start-up is over once the shim answers on its control socket.
    assert_eq!(cli_status(&d.run, shim)["qemu_pid"], qemu.as_raw());
    vm.wait_heartbeats_after(Instant::now(), 100, Duration::from_secs(5));

    let before = ctxt_switches(shim);
    let from = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let after = ctxt_switches(shim);
    let to = Instant::now();

    // The guest was busy all along, its console straight on the shim's stdout.
    let beats = vm
        .heartbeats()
        .into_iter()
        .filter(|h| h.at >= from && h.at <= to)
        .count();
    assert!(beats >= 100, "only {beats} heartbeats in the window");
    assert_eq!(
        after - before,
        0,
        "the shim was scheduled {} times in 1 s of an idle VM",
        after - before
    );
    assert_eq!(children(shim), vec![qemu]);
    // The counter does move when the shim has work: a status request wakes it.
    cli_status(&d.run, shim);
    assert!(
        ctxt_switches(shim) > after,
        "a status request did not show as a context switch"
    );
}

// ---- 10. plan ----
