//! A real Linux guest (tests/linux-guest) with a virtio NIC on a tap, a virtio disk, and its
//! serial console and a virtio console on unix sockets: first under the distribution's QEMU
//! alone, which shows the guest and the checks work, then under the shim across three live
//! upgrades, 7.2.22 -> 10.0.2 -> 7.2.22 -> 10.0.2, while the host pings it every 10 ms, keeps
//! one TCP echo session busy, reads both consoles on one connection each, and the guest
//! writes fsync'd records. Each run ends with the guest powering itself off and the host
//! checking every record the guest acknowledged in the raw image.
//!
//! All traffic stays inside a network namespace the test creates; see `support/linux/net.rs`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::linux::{
    allowance, check_status_lines, create_disk, describe, disk_acked, echo_round_trip,
    last_icmp_in, last_stat, linux_argv, net_table, net_windows, verify_disk, wait_linux_ready,
    Console, EchoSession, Netns, StatusLines, Tap, TimedUpgrade, ECHO_PORT, GUEST_IP,
};
use qemu_liveupgrade_tests::liveupgrade::{UpgradeVm, UPGRADE_TIMEOUT};
use qemu_liveupgrade_tests::shim::shim_command;
use qemu_liveupgrade_tests::{qemu_build, system_qemu, tempdir, TempDir, Vm};

/// Boot to READY under TCG takes 3-5 s on an idle machine; CI machines are shared.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// For the guest to show progress (a status line every 100 ms, a record every few ms,
/// when it gets the CPU).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// From the POWEROFF request to the VM's exit.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// The ping interval of the acceptance test.
const PING_INTERVAL: Duration = Duration::from_millis(10);
/// One numbered echo line this often.
const ECHO_PERIOD: Duration = Duration::from_millis(20);
/// How long everything runs before the first upgrade and after each.
const SETTLE: Duration = Duration::from_millis(1500);

/// A Linux guest's surroundings: its directory (disk image, console sockets), network
/// namespace and tap.
struct Guest {
    dir: TempDir,
    ns: Netns,
    tap: Tap,
}

/// A booted guest's consoles, each read on one connection for the VM's whole life.
struct Consoles {
    serial: Console,
    hvc: Console,
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

    fn disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }

    fn argv(&self) -> Vec<String> {
        linux_argv(
            self.tap.fd(),
            &self.disk(),
            &self.dir.join("serial.sock"),
            &self.dir.join("hvc.sock"),
        )
    }

    /// Spawns `cmd` (QEMU or the shim, with [`Guest::argv`]) holding the tap, connects to
    /// both consoles before the guest can print anything there, moves the tap into the
    /// namespace and waits for READY on both. Returns the VM, its consoles and how long boot
    /// took.
    fn boot(&self, mut cmd: Command) -> (Vm, Consoles, Duration) {
        self.tap.pass_to(&mut cmd);
        let start = Instant::now();
        let vm = Vm::spawn(cmd);
        let consoles = Consoles {
            serial: Console::connect("serial", &self.dir.join("serial.sock"), READY_TIMEOUT),
            hvc: Console::connect("hvc", &self.dir.join("hvc.sock"), READY_TIMEOUT),
        };
        self.tap.move_into(&self.ns);
        wait_linux_ready(&consoles.serial, READY_TIMEOUT);
        consoles.hvc.wait_for("READY", IO_TIMEOUT, |l| {
            l.iter().any(|l| l.starts_with("READY "))
        });
        (vm, consoles, start.elapsed())
    }

    fn connect_echo(&self) -> TcpStream {
        let addr = SocketAddr::new(GUEST_IP.parse().expect("GUEST_IP"), ECHO_PORT);
        let stream = self
            .ns
            .connect(addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to the guest's echo service: {e}"));
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("SO_RCVTIMEO");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("SO_SNDTIMEO");
        stream
    }
}

/// The number of lines of a kind seen so far, from the latest one's number.
fn count(latest: Option<u64>) -> u64 {
    latest.map_or(0, |k| k + 1)
}

impl Consoles {
    /// Waits until the guest shows progress on every device: two more status lines on each
    /// console, two more acknowledged records.
    fn wait_progress(&self) {
        let lines = self.serial.lines();
        let (stats, disk) = (count(last_stat(&lines)), count(disk_acked(&lines)));
        let hvc_stats = count(last_stat(&self.hvc.lines()));
        self.serial
            .wait_for("2 more STAT and DISK lines", PROGRESS_TIMEOUT, |l| {
                count(last_stat(l)) >= stats + 2 && count(disk_acked(l)) >= disk + 2
            });
        self.hvc
            .wait_for("2 more STAT lines", PROGRESS_TIMEOUT, |l| {
                count(last_stat(l)) >= hvc_stats + 2
            });
    }

    /// Lets the guest run for [`SETTLE`], and at least until [`Consoles::wait_progress`].
    fn settle(&self) {
        let start = Instant::now();
        self.wait_progress();
        thread::sleep(SETTLE.saturating_sub(start.elapsed()));
    }

    /// After the VM exited: both connections ended, each line sequence complete from READY
    /// to the power-off, the serial one including every DISK line. Returns the summaries
    /// and the last record acknowledged.
    fn check_complete(&self) -> (StatusLines, StatusLines, u64) {
        let mut summaries = Vec::new();
        for console in [&self.serial, &self.hvc] {
            console.wait_end(IO_TIMEOUT);
            let lines = console.lines();
            summaries.push(check_status_lines(&lines).unwrap_or_else(|e| {
                panic!(
                    "console line sequence broken: {e}; the first lines:\n{}",
                    lines[..lines.len().min(20)].join("\n")
                )
            }));
        }
        let lines = self.serial.lines();
        assert!(
            lines.iter().any(|l| l.starts_with("POWEROFF disk=")),
            "no POWEROFF line on the serial console"
        );
        let acked = disk_acked(&lines).expect("no disk record acknowledged");
        let hvc = summaries.pop().expect("two summaries");
        (summaries.pop().expect("two summaries"), hvc, acked)
    }
}

/// Asks the guest to power off (the line POWEROFF on the echo connection, which comes back
/// first) and waits for the VM to exit.
fn power_off(vm: &mut Vm, stream: &mut TcpStream) -> ExitStatus {
    echo_round_trip(stream, b"POWEROFF\n").expect("POWEROFF round trip");
    vm.wait_exit(POWEROFF_TIMEOUT)
}

#[test]
fn linux_guest_on_plain_qemu() {
    let guest = Guest::new();
    let mut cmd = Command::new(system_qemu());
    cmd.args(guest.argv());
    let (mut vm, consoles, boot) = guest.boot(cmd);
    eprintln!(
        "linux guest: READY {:.2} s after QEMU started",
        boot.as_secs_f64()
    );

    let ping = guest
        .ns
        .ping(GUEST_IP, 100, PING_INTERVAL, Duration::from_secs(60));
    assert_eq!(
        (ping.transmitted, ping.received, ping.duplicates),
        (100, 100, 0),
        "100 pings at 10 ms: {ping:?}"
    );
    let mut stream = guest.connect_echo();
    for i in 0..20 {
        echo_round_trip(&mut stream, format!("echo {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("echo round trip {i}: {e}"));
    }
    consoles.wait_progress();

    let status = power_off(&mut vm, &mut stream);
    assert!(status.success(), "QEMU exited with {status} after POWEROFF");
    let (serial, hvc, acked) = consoles.check_complete();
    verify_disk(&guest.disk(), acked);
    eprintln!(
        "linux guest: {} + {} status lines complete on the serial and virtio consoles; {} records acknowledged, all on disk",
        serial.stats,
        hvc.stats,
        acked + 1
    );
}

/// The shim starts on QEMU 7.2.22 and is upgraded to each of these in turn.
const UPGRADES: [&str; 3] = ["10.0.2", "7.2.22", "10.0.2"];

/// Three upgrades under traffic on every device. Must hold: no ping lost, except at most two
/// per upgrade sent within its swap window (from the launcher's `migrating` step to its
/// report), which the old QEMU read from the tap as it stopped the guest (see
/// [`allowance`]); the one TCP connection unbroken with every echo back in order; both
/// consoles' line sequences complete on the connections opened at boot, at unchanged
/// paths; every acknowledged record on disk; the shim's exit status 0 after the guest
/// powered off.
#[test]
fn linux_guest_across_three_upgrades() {
    let guest = Guest::new();
    let dir = tempdir();
    symlink(qemu_build("7.2.22"), dir.join("qemu")).expect("symlink qemu");
    fs::create_dir_all(dir.join("run")).expect("mkdir run");
    let mut cmd = shim_command(&dir.join("qemu"), &dir.join("run"));
    cmd.args(guest.argv());
    let (vm, consoles, boot) = guest.boot(cmd);
    eprintln!(
        "linux guest under the shim: READY {:.2} s after start",
        boot.as_secs_f64()
    );
    let mut vm = UpgradeVm { dir, vm };

    let mut stream = guest.connect_echo();
    echo_round_trip(&mut stream, b"before\n").expect("echo before the upgrades");
    let echo = EchoSession::start(stream, ECHO_PERIOD);
    let pinger = guest.ns.start_ping(GUEST_IP, PING_INTERVAL);
    consoles.settle();

    let mut upgrades = Vec::new();
    for to in UPGRADES {
        vm.install(to);
        let up = TimedUpgrade::request(&vm.rundir(), vm.vm.pid().as_raw(), UPGRADE_TIMEOUT);
        assert_eq!(up.report["result"], "ok", "upgrade failed: {}", up.report);
        assert_eq!(up.report["to"]["version"], to, "{}", up.report);
        upgrades.push(up);
        consoles.settle();
    }
    let ping = pinger.stop();
    let (mut stream, echo) = echo.stop(IO_TIMEOUT);
    // Where lost pings were lost: a request that never reached the guest, or its reply on
    // the way back. The guest counts the requests it received; a STAT line from after the
    // pinger stopped has them all.
    consoles.wait_progress();
    let guest_echos = last_icmp_in(&consoles.serial.lines());
    // The power-off request goes over this connection: a broken one ends the test here.
    assert_eq!(echo.error, None, "the TCP echo session broke");
    assert_eq!(echo.echoed_at.len(), echo.sent_at.len(), "echoes missing");

    let (during, outside) = net_windows(&upgrades, &ping.requests(PING_INTERVAL), &echo);
    eprintln!(
        "linux guest: {} upgrades under a ping every {PING_INTERVAL:?} over the tap and an echo line every {ECHO_PERIOD:?} on one TCP connection:\n{}",
        upgrades.len(),
        net_table(&upgrades, &during, &outside)
    );
    eprintln!(
        "linux guest: ping sent {} requests, {} answered, {} lost; the guest received {} echo requests",
        ping.transmitted,
        ping.received,
        ping.lost().len(),
        guest_echos.map_or("?".to_owned(), |n| n.to_string())
    );
    let mut verdicts = Vec::new();
    for (u, w) in upgrades.iter().zip(&during) {
        match allowance(u, w) {
            Ok(None) => {}
            Ok(Some(used)) => eprintln!("linux guest: ALLOWANCE USED: {used}"),
            Err(e) => {
                eprintln!("linux guest: PINGS LOST: {e}");
                verdicts.push(e);
            }
        }
    }
    for &(seq, sent) in &outside.lost {
        let near = upgrades
            .iter()
            .min_by(|a, b| {
                let d = |u: &TimedUpgrade| (u.requested - sent).abs();
                d(a).total_cmp(&d(b))
            })
            .expect("upgrades ran");
        let e = format!(
            "ping #{seq} lost outside any upgrade: relative to upgrade {}, {}",
            near.label(),
            describe(near, sent)
        );
        eprintln!("linux guest: PINGS LOST: {e}");
        verdicts.push(e);
    }

    // Nothing the guest's users hold was replaced: the console paths and connections.
    for c in [&consoles.serial, &consoles.hvc] {
        assert!(c.path_unchanged(), "a console socket path changed");
        assert_eq!(
            c.ended(),
            None,
            "a console connection ended before power-off"
        );
    }
    let status = power_off(&mut vm.vm, &mut stream);
    let (serial, hvc, acked) = consoles.check_complete();
    verify_disk(&guest.disk(), acked);
    eprintln!(
        "linux guest: {} echo lines in order; {} + {} status lines complete on the serial and virtio consoles; {} records acknowledged, all on disk",
        echo.echoed_at.len(),
        serial.stats,
        hvc.stats,
        acked + 1
    );

    assert!(verdicts.is_empty(), "pings lost: {}", verdicts.join("; "));
    assert_eq!(ping.duplicates, 0, "duplicate ping replies");
    assert!(
        status.success(),
        "the shim exited with {status} after POWEROFF"
    );
}
