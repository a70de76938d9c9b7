//! A pty console (`-serial pty`) across live upgrades: its path stays what the shim announced
//! and what `query-chardev` reports, and a reader that keeps it open sees every heartbeat the
//! guest printed, once, through 7.2.22 -> 10.0.2 -> 7.2.22.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use qemu_liveupgrade_tests::liveupgrade::{assert_pause_in_order, UpgradeVm};
use qemu_liveupgrade_tests::{guest_elf, wait_until, Qmp};
use serde_json::{json, Value};

/// The heartbeat guest with its console on a pty and nothing on stdio.
fn pty_guest_argv(mem_mib: u64) -> Vec<String> {
    let mut argv: Vec<String> = [
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "pty",
        "-m",
    ]
    .map(String::from)
    .to_vec();
    argv.push(mem_mib.to_string());
    argv.push("-kernel".into());
    argv.push(guest_elf().display().to_string());
    argv.push("-append".into());
    argv.push(format!("mem={mem_mib}M"));
    argv
}

/// Lines read from a pty by a thread that holds it open, as a console user would.
struct PtyReader {
    lines: Arc<Mutex<Vec<String>>>,
}

impl PtyReader {
    fn open(path: &Path) -> PtyReader {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&lines);
        // Ends with EIO once the pty's master is closed, when the VM is gone.
        thread::spawn(move || {
            for line in BufReader::new(file).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).into_owned();
                shared.lock().unwrap().push(text);
            }
        });
        PtyReader { lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// `(counter, err)` of every `HB <counter> err=<err> ...` line so far.
    fn heartbeats(&self) -> Vec<(u64, u64)> {
        self.lines().iter().filter_map(|l| heartbeat(l)).collect()
    }

    fn last_counter(&self) -> u64 {
        self.heartbeats().last().map_or(0, |hb| hb.0)
    }

    fn wait_counter(&self, counter: u64) {
        wait_until(
            Duration::from_secs(60),
            &format!("HB {counter} on the pty"),
            || self.last_counter() >= counter,
        );
    }
}

fn heartbeat(line: &str) -> Option<(u64, u64)> {
    let mut words = line.strip_prefix("HB ")?.split(' ');
    let counter = words.next()?.parse().ok()?;
    let err = words.next()?.strip_prefix("err=")?.parse().ok()?;
    Some((counter, err))
}

/// The pty the shim announced on stdout, as QEMU announces one: `char device redirected to
/// /dev/pts/N (label serial0)`. Every announcement, so a second one would show.
fn announced(vm: &UpgradeVm) -> Vec<PathBuf> {
    vm.vm
        .stdout_text()
        .lines()
        .filter_map(|l| l.strip_prefix("char device redirected to "))
        .filter_map(|l| l.strip_suffix(" (label serial0)"))
        .map(PathBuf::from)
        .collect()
}

/// What `query-chardev` says of `serial0`, through the VM's proxied QMP socket.
fn chardev_filename(qmp: &mut Qmp) -> Value {
    let list = qmp.execute("query-chardev", json!({}));
    let serial = list
        .as_array()
        .and_then(|l| l.iter().find(|c| c["label"] == "serial0"))
        .unwrap_or_else(|| panic!("no serial0 in {list}"));
    serial["filename"].clone()
}

#[test]
fn serial_pty_keeps_its_path_and_every_line_across_upgrades() {
    // Paused at start, so that the reader is there before the guest's first line: QEMU
    // drops pty output while nobody has the pty open.
    let vm = UpgradeVm::start_with("7.2.22", pty_guest_argv(256), &["-S"], &[]);
    wait_until(Duration::from_secs(30), "the pty announcement", || {
        !announced(&vm).is_empty()
    });
    let path = announced(&vm)[0].clone();
    assert!(path.starts_with("/dev/pts/"), "{}", path.display());
    let mut qmp = vm.connect();
    let filename = json!(format!("pty:{}", path.display()));
    assert_eq!(chardev_filename(&mut qmp), filename);

    let reader = PtyReader::open(&path);
    qmp.execute("cont", json!({}));
    reader.wait_counter(300);

    for version in ["10.0.2", "7.2.22"] {
        let before = reader.last_counter();
        vm.install(version);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "upgrade failed: {report}");
        assert_eq!(report["to"]["version"], version, "{report}");
        // Started with -S (as libvirt does), but the new QEMU is not: it runs the guest as
        // soon as it has loaded it, with no `cont` from the launcher.
        assert_pause_in_order(&report, false);
        reader.wait_counter(before + 500);
        assert_eq!(
            announced(&vm),
            std::slice::from_ref(&path),
            "one pty, announced once"
        );
        assert_eq!(chardev_filename(&mut qmp), filename, "after {version}");
    }

    let beats = reader.heartbeats();
    assert_eq!(beats[0].0, 1, "the reader saw the guest's first heartbeat");
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "heartbeats lost or repeated on the pty"
        );
    }
    assert!(
        beats.iter().all(|&(_, err)| err == 0),
        "guest memory errors"
    );
    let lines = reader.lines();
    let head: Vec<&String> = lines.iter().take(3).collect();
    assert!(lines.iter().any(|l| l.starts_with("READY")), "{head:?}");
    let odd: Vec<&String> = lines
        .iter()
        .filter(|l| !l.starts_with("HB ") && !l.starts_with("BOOT") && !l.starts_with("READY"))
        .collect();
    assert!(odd.is_empty(), "unexpected console lines: {odd:?}");
}

/// A human monitor command through QMP, and its output.
fn hmp(qmp: &mut Qmp, line: &str) -> String {
    let out = qmp.execute("human-monitor-command", json!({ "command-line": line }));
    out.as_str().unwrap_or_default().to_owned()
}

/// Reads one byte from an I/O port as the guest would (`i /b`): `portb[0x03f8] = 0x61`.
fn inb(qmp: &mut Qmp, port: u16) -> u8 {
    let out = hmp(qmp, &format!("i /b {port:#x}"));
    let hex = out.rsplit("= 0x").next().map(str::trim).unwrap_or_default();
    u8::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("i /b {port:#x}: {out:?}"))
}

const COM1_RBR: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
const LSR_DATA_READY: u8 = 0x01;

/// Takes `n` bytes out of COM1's receive register from the monitor, each once QEMU has put it
/// there. The heartbeat guest never reads its UART, so these are all the input it was given.
fn guest_input(qmp: &mut Qmp, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let what = format!("input byte {} of {n} in COM1 (got {got:?})", got.len() + 1);
        wait_until(Duration::from_secs(10), &what, || {
            inb(qmp, COM1_LSR) & LSR_DATA_READY != 0
        });
        got.push(inb(qmp, COM1_RBR));
    }
    got
}

/// Types `text` on the pty a byte every 2 ms, from a thread, as a user at a console would.
fn typist(path: &Path, text: Vec<u8>) -> thread::JoinHandle<()> {
    let mut tty = File::options()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    thread::spawn(move || {
        for b in text {
            std::io::Write::write_all(&mut tty, &[b]).expect("typing on the pty");
            thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn pty_input_reaches_the_guest_once_across_upgrades() {
    let vm = UpgradeVm::start_with("7.2.22", pty_guest_argv(256), &["-S"], &[]);
    wait_until(Duration::from_secs(30), "the pty announcement", || {
        !announced(&vm).is_empty()
    });
    let path = announced(&vm)[0].clone();
    let reader = PtyReader::open(&path);
    let mut qmp = vm.connect();
    qmp.execute("cont", json!({}));
    reader.wait_counter(100);

    // Input waiting in QEMU when an upgrade starts: one byte in the UART (its FIFO is off),
    // the rest not yet read from the chardev.
    typist(&path, b"abc".to_vec()).join().unwrap();
    assert_eq!(guest_input(&mut qmp, 1), b"a");
    vm.install("10.0.2");
    assert_eq!(vm.upgrade()["result"], "ok");
    assert_eq!(guest_input(&mut qmp, 2), b"bc");

    // Input typed all through an upgrade.
    let text: Vec<u8> = (0..300u32).map(|i| b'A' + (i % 26) as u8).collect();
    let typing = typist(&path, text.clone());
    vm.install("7.2.22");
    assert_eq!(vm.upgrade()["result"], "ok");
    typing.join().unwrap();
    assert_eq!(guest_input(&mut qmp, text.len()), text);

    // Nothing twice.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        inb(&mut qmp, COM1_LSR) & LSR_DATA_READY,
        0,
        "input repeated"
    );
    // The launcher put the pty in raw mode, as QEMU does: nothing typed came back as output.
    let lines = reader.lines();
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("abc") && !l.contains("ABC")),
        "input echoed"
    );
}
