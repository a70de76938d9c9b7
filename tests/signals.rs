//! Every signal to the VM's pid does what it does to a bare QEMU: the shim survives what
//! QEMU survives, with the guest running on, and ends the way QEMU ends on the rest, but for
//! SIGPROF, which kills a bare QEMU and which the shim ignores (launcher/src/signals.rs).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::{children, is_running, qemu_child};
use qemu_liveupgrade_tests::{guest_argv, qemu_build, wait_until};

/// Signals a bare QEMU 7.2.22 and 10.0.2 survive with the guest running (measured; see
/// launcher/src/signals.rs). SIGCHLD and SIGCONT are left out: sent alone they change nothing
/// anywhere.
const SURVIVED: [Signal; 6] = [
    Signal::SIGUSR1,
    Signal::SIGPIPE,
    Signal::SIGALRM,
    Signal::SIGIO,
    Signal::SIGURG,
    Signal::SIGWINCH,
];

/// Signals that end a bare QEMU, each its own way.
const FATAL: [Signal; 10] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGABRT,
    Signal::SIGTERM,
    Signal::SIGXCPU,
    Signal::SIGVTALRM,
    Signal::SIGPWR,
    Signal::SIGSEGV,
    Signal::SIGSYS,
];

#[test]
fn the_vm_survives_every_signal_qemu_survives() {
    let vm = UpgradeVm::start("7.2.22", 64, &[]);
    let qemu = qemu_child(vm.vm.pid()).expect("one QEMU");
    for sig in SURVIVED {
        vm.vm.signal(sig);
        // The guest goes on: heartbeats after the signal, from the same QEMU.
        vm.assert_guest_healthy(100);
        assert_eq!(qemu_child(vm.vm.pid()), Some(qemu), "after {sig}");
    }
}

/// The one deliberate difference: SIGPROF kills a bare QEMU (its default action), and the
/// VM goes on under the shim (a stray profiling timer is never meant to end a VM).
#[test]
fn sigprof_kills_bare_qemu_but_not_the_vm() {
    let bare = bare(Signal::SIGPROF);
    assert_eq!(
        bare.signal(),
        Some(Signal::SIGPROF as i32),
        "bare QEMU no longer dies of SIGPROF ({bare:?}): the shim need not differ from it"
    );
    let vm = UpgradeVm::start("7.2.22", 64, &[]);
    let qemu = qemu_child(vm.vm.pid()).expect("one QEMU");
    for _ in 0..3 {
        vm.vm.signal(Signal::SIGPROF);
        vm.assert_guest_healthy(100);
        assert_eq!(qemu_child(vm.vm.pid()), Some(qemu), "after SIGPROF");
    }
}

#[test]
fn every_fatal_signal_ends_the_vm_as_it_ends_qemu() {
    for chunk in FATAL.chunks(4) {
        let outcomes: Vec<_> = chunk
            .iter()
            .map(|&sig| std::thread::spawn(move || (sig, bare(sig), shimmed(sig))))
            .collect();
        for t in outcomes {
            let (sig, bare, shimmed) = t.join().expect("thread");
            assert_eq!(
                (bare.code(), bare.signal()),
                (shimmed.code(), shimmed.signal()),
                "{sig}: bare QEMU {bare:?}, under the shim {shimmed:?}"
            );
        }
    }
}

#[test]
fn a_job_control_stop_stops_both_and_sigcont_resumes_both() {
    // The shim runs in a process group of its own whose parent (this test) is in another
    // group of the same session: not orphaned, so SIGTSTP stops QEMU, and the shim with it.
    let vm = UpgradeVm::start("7.2.22", 64, &[]);
    let qemu = qemu_child(vm.vm.pid()).expect("one QEMU");
    vm.vm.signal(Signal::SIGTSTP);
    wait_until(Duration::from_secs(10), "QEMU and the shim stopped", || {
        state(qemu) == Some('T') && state(vm.vm.pid()) == Some('T')
    });
    vm.vm.signal(Signal::SIGCONT);
    wait_until(Duration::from_secs(10), "both running again", || {
        state(qemu) != Some('T') && state(vm.vm.pid()) != Some('T')
    });
    vm.assert_guest_healthy(200);
}

/// How a bare QEMU running the guest ends on `sig`.
fn bare(sig: Signal) -> ExitStatus {
    let mut child = Command::new(qemu_build("7.2.22"))
        .args(guest_argv(32))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bare QEMU");
    let pid = Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().expect("stdout");
    wait_ready(stdout);
    kill(pid, sig).expect("kill");
    wait_exit(&mut child)
}

/// How the shim running the guest ends on `sig`, with no QEMU left behind.
fn shimmed(sig: Signal) -> ExitStatus {
    let mut vm = UpgradeVm::start("7.2.22", 32, &[]);
    let qemus = children(vm.vm.pid());
    vm.vm.signal(sig);
    let status = vm.vm.wait_exit(Duration::from_secs(30));
    wait_until(Duration::from_secs(5), "QEMU gone", || {
        qemus.iter().all(|&p| !is_running(p))
    });
    status
}

fn wait_ready(stdout: std::process::ChildStdout) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines.by_ref().any(|l| l.is_ok_and(|l| l.contains("READY")));
        let _ = tx.send(ready);
        // Keep draining, so the guest's console never blocks.
        lines.for_each(drop);
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(ready, Ok(true), "the bare guest never said READY");
}

fn wait_exit(child: &mut std::process::Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bare QEMU did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}
