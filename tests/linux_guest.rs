//! A real Linux guest (tests/linux-guest) with a virtio NIC on a tap, a virtio disk and a
//! virtio console: first under the distribution's QEMU alone, which shows the guest and the
//! checks work, then under the shim across one live upgrade 7.2.22 -> 10.0.2 while it is
//! pinged every 10 ms, holds a TCP echo session and writes fsync'd records.
//!
//! All traffic stays inside a network namespace the test creates; see `support/linux.rs`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use qemu_liveupgrade_tests::linux::{
    create_disk, disk_acked, echo_round_trip, failures, linux_argv, stat_counters, verify_disk,
    wait_linux_ready, Netns, Tap, ECHO_PORT, GUEST_IP,
};
use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::shim_command;
use qemu_liveupgrade_tests::{system_qemu, tempdir, wait_until, TempDir, Vm};

/// Boot to READY under TCG takes 3-5 s on an idle machine; CI machines are shared.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The ping interval of the acceptance test.
const PING_INTERVAL: Duration = Duration::from_millis(10);

fn echo_addr() -> SocketAddr {
    SocketAddr::new(GUEST_IP.parse().expect("GUEST_IP"), ECHO_PORT)
}

fn connect_echo(ns: &Netns) -> TcpStream {
    let stream = ns
        .connect(echo_addr(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to the guest's echo service: {e}"));
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("SO_RCVTIMEO");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("SO_SNDTIMEO");
    stream
}

/// A booted Linux guest: its directory (disk image, console log), namespace and tap.
struct Guest {
    dir: TempDir,
    ns: Netns,
    tap: Tap,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempdir();
        create_disk(&dir.join("disk.raw"), 16);
        Guest {
            dir,
            ns: Netns::new(),
            tap: Tap::open(),
        }
    }

    /// Spawns `cmd` (QEMU or the shim, with the guest's argv) holding the tap, moves the
    /// tap into the namespace and waits for READY. Returns the VM and how long boot took.
    fn boot(&self, mut cmd: Command) -> (Vm, Duration) {
        self.tap.pass_to(&mut cmd);
        let start = Instant::now();
        let vm = Vm::spawn(cmd);
        self.tap.move_into(&self.ns);
        wait_linux_ready(&vm, READY_TIMEOUT);
        (vm, start.elapsed())
    }

    fn disk(&self) -> std::path::PathBuf {
        self.dir.join("disk.raw")
    }
}

/// Waits until the guest has acknowledged record `n`.
fn wait_disk_acked(vm: &Vm, n: u64) {
    wait_until(Duration::from_secs(60), &format!("disk record {n}"), || {
        disk_acked(&vm.stdout_text()).is_some_and(|a| a >= n)
    });
}

/// Kills the VM (the guest gets no chance to flush anything more) and returns the last
/// record it acknowledged before dying.
fn kill_and_last_ack(vm: &mut Vm) -> u64 {
    vm.signal(Signal::SIGKILL);
    vm.wait_exit(IO_TIMEOUT);
    // Lines still in the pipe only add acknowledgements; what was read is a lower bound.
    thread::sleep(Duration::from_millis(200));
    disk_acked(&vm.stdout_text()).expect("no disk record acknowledged")
}

fn assert_stats_consecutive(vm: &Vm) {
    let stats = stat_counters(&vm.stdout_text());
    assert!(stats.len() >= 2, "too few STAT lines: {stats:?}");
    for pair in stats.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "STAT lines lost or repeated");
    }
}

#[test]
fn linux_guest_on_plain_qemu() {
    let guest = Guest::new();
    let hvc_log = guest.dir.join("hvc.log");
    let mut cmd = Command::new(system_qemu());
    cmd.args(linux_argv(
        guest.tap.fd(),
        &guest.disk(),
        &format!("file,path={}", hvc_log.display()),
    ));
    let (mut vm, boot) = guest.boot(cmd);
    eprintln!(
        "linux guest: READY {:.2} s after QEMU started",
        boot.as_secs_f64()
    );

    // The virtio console carries the same progress, numbered on its own.
    wait_until(
        IO_TIMEOUT,
        "READY and STAT lines on the virtio console",
        || {
            let text = fs::read_to_string(&hvc_log).unwrap_or_default();
            text.contains("READY ip=") && text.contains("STAT 1 ")
        },
    );

    let ping = guest
        .ns
        .ping(GUEST_IP, 100, PING_INTERVAL, Duration::from_secs(60));
    assert_eq!(
        (ping.transmitted, ping.received, ping.duplicates),
        (100, 100, 0),
        "100 pings at 10 ms: {ping:?}"
    );

    let mut stream = connect_echo(&guest.ns);
    for i in 0..20 {
        echo_round_trip(&mut stream, format!("echo {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("echo round trip {i}: {e}"));
    }

    wait_disk_acked(&vm, 20);
    assert_stats_consecutive(&vm);
    let acked = kill_and_last_ack(&mut vm);
    verify_disk(&guest.disk(), acked);
    assert!(failures(&vm.stdout_text()).is_empty());
    eprintln!(
        "linux guest: {} records acknowledged, all on disk",
        acked + 1
    );
}

/// Round trips on one TCP connection every 20 ms until `stop`; returns how many succeeded,
/// or the first error with the count before it.
fn echo_in_background(
    mut stream: TcpStream,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<u64, (u64, String)>> {
    thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let payload = format!("during upgrade {n}\n");
            echo_round_trip(&mut stream, payload.as_bytes()).map_err(|e| (n, e.to_string()))?;
            n += 1;
            thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn linux_guest_across_an_upgrade_to_10_0_2() {
    let guest = Guest::new();
    let dir = tempdir();
    symlink(system_qemu(), dir.join("qemu")).expect("symlink qemu");
    fs::create_dir_all(dir.join("run")).expect("mkdir run");
    let mut cmd = shim_command(&dir.join("qemu"), &dir.join("run"));
    // A null chardev behind the virtio console: the device crosses the upgrade, and no
    // file is reopened by the new QEMU.
    cmd.args(linux_argv(guest.tap.fd(), &guest.disk(), "null"));
    let (vm, boot) = guest.boot(cmd);
    eprintln!(
        "linux guest under the shim: READY {:.2} s after start",
        boot.as_secs_f64()
    );
    let mut vm = UpgradeVm { dir, vm };

    let mut stream = connect_echo(&guest.ns);
    echo_round_trip(&mut stream, b"before\n").expect("echo before the upgrade");
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_in_background(stream.try_clone().expect("dup socket"), Arc::clone(&stop));
    wait_disk_acked(&vm.vm, 5);

    let pinger = guest.ns.start_ping(GUEST_IP, PING_INTERVAL);
    thread::sleep(Duration::from_secs(1));
    vm.install("10.0.2");
    let signalled = unix_now();
    let report = vm.upgrade();
    let upgraded = unix_now();
    assert_eq!(report["result"], "ok", "upgrade failed: {report}");
    assert_eq!(report["to"]["version"], "10.0.2", "{report}");
    let acked_at_upgrade = disk_acked(&vm.vm.stdout_text()).expect("records before the upgrade");
    thread::sleep(Duration::from_millis(1500));
    let ping = pinger.stop();
    stop.store(true, Ordering::Relaxed);
    let echoes = echo.join().expect("echo thread panicked");

    let lost = ping.lost();
    let when: Vec<String> = lost
        .iter()
        .map(|&seq| match ping.answered_before(seq) {
            Some(r) => {
                let sent = r.sent_at() + (seq - r.seq) as f64 * PING_INTERVAL.as_secs_f64();
                format!("#{seq} sent at +{:.0} ms", (sent - signalled) * 1000.0)
            }
            None => format!("#{seq}"),
        })
        .collect();
    eprintln!(
        "linux guest upgrade 7.2.22 -> 10.0.2: {:.0} ms from SIGUSR2 to the report; \
         pings every 10 ms: {} sent, {} answered, {} lost before the last answer ({}), {} duplicates",
        (upgraded - signalled) * 1000.0,
        ping.transmitted,
        ping.received,
        lost.len(),
        if when.is_empty() { "none".to_owned() } else { when.join(", ") },
        ping.duplicates
    );

    // The guest answers on the new QEMU: replies keep coming after the report.
    let after = ping
        .replies
        .iter()
        .filter(|r| r.sent_at() > upgraded)
        .count();
    assert!(
        after >= 20,
        "{after} ping replies after the upgrade: {ping:?}"
    );
    let echoes = echoes.unwrap_or_else(|(n, e)| {
        panic!("the TCP echo session broke after {n} round trips during the upgrade: {e}")
    });
    assert!(
        echoes >= 20,
        "only {echoes} echo round trips during the upgrade"
    );
    echo_round_trip(&mut stream, b"after\n")
        .expect("echo on the same connection after the upgrade");

    wait_disk_acked(&vm.vm, acked_at_upgrade + 10);
    let stats = stat_counters(&vm.vm.stdout_text());
    assert!(stats.len() >= 2, "too few STAT lines: {stats:?}");
    // Not asserted yet: a complete console line sequence across upgrades is the aim.
    let gaps: Vec<(u64, u64)> = stats
        .windows(2)
        .filter(|p| p[1] != p[0] + 1)
        .map(|p| (p[0], p[1]))
        .collect();
    eprintln!(
        "linux guest: {} STAT lines on the serial console, breaks in their numbering: {gaps:?}",
        stats.len()
    );
    let acked = kill_and_last_ack(&mut vm.vm);
    verify_disk(&guest.disk(), acked);
    assert!(failures(&vm.vm.stdout_text()).is_empty());
    eprintln!(
        "linux guest: {echoes} echo round trips during the upgrade; {} records acknowledged, all on disk",
        acked + 1
    );
}
