//! The Linux test guest of `tests/linux-guest/` and what a test needs around it.
//!
//! `scripts/build-linux-guest` builds a Debian cloud kernel and a busybox initramfs whose
//! `/init` answers ping, echoes TCP lines on port 7 (and powers off on the line `POWEROFF`),
//! writes fsync'd numbered records to `/dev/vda` (`DISK n` on the serial console once record
//! n is acknowledged) and prints a numbered `STAT` line about every 100 ms on its serial
//! console and on a virtio console.
//!
//! Around it: the private network it talks on ([`Netns`], [`Tap`], in `net`), ping
//! (`ping`), the echo service (`echo`), the consoles as socket clients (`console`), and
//! upgrades timed from outside with what the network saw during each (`upgrades`).

mod console;
mod echo;
mod net;
mod ping;
mod upgrades;

pub use console::{check_status_lines, Console, StatusLines};
pub use echo::{echo_round_trip, EchoLog, EchoSession};
pub use net::{Netns, Tap};
pub use ping::{PingReply, PingReport, PingRequest, Pinger};
pub use upgrades::{
    allowance, describe, net_table, net_windows, NetWindow, TimedUpgrade, STEP_MIGRATING,
};

use std::fs::{self, File};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The guest's address on its NIC. Private, and only ever configured inside a test's
/// [`Netns`].
pub const GUEST_IP: &str = "192.168.77.2";
/// The host end of the link: the tap, inside the test's [`Netns`].
pub const PEER_IP: &str = "192.168.77.1";
/// Prefix length of the link.
pub const PREFIX_LEN: u8 = 24;
/// The guest's TCP echo service.
pub const ECHO_PORT: u16 = 7;
/// The guest's disk writer puts record n in sector n.
pub const SECTOR: usize = 512;

/// Kernel and initramfs of the Linux test guest.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// For `-kernel`: the uncompressed ELF `vmlinux`, which QEMU enters through its PVH note
    /// (the guest does not decompress itself under TCG), or a bzImage `vmlinuz`.
    pub kernel: PathBuf,
    /// `initrd.gz`, for `-initrd`.
    pub initrd: PathBuf,
}

/// The Linux test guest, built (or found up to date) by `scripts/build-linux-guest` into
/// `target/linux-guest/` once per test process. Panics naming the script if it fails.
pub fn linux_guest() -> LinuxGuest {
    static GUEST: OnceLock<LinuxGuest> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let (script, _, stdout) =
                crate::paths::build("build-linux-guest", "linux-guest", "the Linux test guest");
            let mut paths = stdout.lines().map(PathBuf::from);
            let (Some(kernel), Some(initrd)) = (paths.next(), paths.next()) else {
                panic!("{} printed {stdout:?}, not two paths", script.display());
            };
            for path in [&kernel, &initrd] {
                assert!(
                    path.is_file(),
                    "{} named {}, which does not exist",
                    script.display(),
                    path.display()
                );
            }
            LinuxGuest { kernel, initrd }
        })
        .clone()
}

/// QEMU arguments for the Linux guest on TCG (`q35`, 256 MiB): a virtio NIC on the tap fd
/// `tap_fd`, the raw image `disk` as a virtio disk, its serial console (ttyS0) on a unix
/// socket server at `serial` and a virtio console (hvc0) on one at `hvc`, both `wait=off`:
/// QEMU, or the launcher in its place, listens there and the guest runs whether or not a
/// client is connected. `-no-reboot` and `panic=-1`: a guest whose /init dies ends QEMU
/// rather than booting again and printing a second READY.
pub fn linux_argv(tap_fd: RawFd, disk: &Path, serial: &Path, hvc: &Path) -> Vec<String> {
    let guest = linux_guest();
    let append =
        format!("console=ttyS0 quiet cryptomgr.notests panic=-1 guest_ip={GUEST_IP}/{PREFIX_LEN}");
    let socket = |id: &str, path: &Path| {
        format!("socket,id={id},path={},server=on,wait=off", path.display())
    };
    let args = [
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-m",
        "256",
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-chardev",
        &socket("con0", serial),
        "-serial",
        "chardev:con0",
        "-kernel",
        &guest.kernel.display().to_string(),
        "-initrd",
        &guest.initrd.display().to_string(),
        "-append",
        &append,
        "-netdev",
        &format!("tap,id=n0,fd={tap_fd},vhost=off"),
        "-device",
        "virtio-net-pci,netdev=n0",
        "-drive",
        &format!("file={},format=raw,if=virtio", disk.display()),
        "-device",
        "virtio-serial-pci",
        "-chardev",
        &socket("vc0", hvc),
        "-device",
        "virtconsole,chardev=vc0",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// Creates a zero-filled raw image of `mib` MiB for the guest's disk writer.
pub fn create_disk(path: &Path, mib: u64) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(mib << 20)
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

/// Waits for the guest's `READY` line on its serial console and panics if `/init` reported
/// a failure before it, or came up without its network, disk or virtio console.
pub fn wait_linux_ready(serial: &Console, timeout: Duration) {
    serial.wait_for("READY", timeout, |lines| {
        lines.iter().any(|l| l.contains("READY "))
    });
    let lines = serial.lines();
    let failures = failures(&lines);
    assert!(
        failures.is_empty(),
        "the guest's /init failed: {failures:?}"
    );
    let want = format!("READY ip={GUEST_IP}/{PREFIX_LEN} disk=vda hvc=yes");
    // The firmware's last words (SeaBIOS's `Booting from ROM..`) may lack a line end.
    assert!(
        lines.iter().any(|l| l.ends_with(&want)),
        "the guest came up without its network, disk or virtio console: {lines:?}"
    );
}

/// The `FAIL ...` lines of the guest's `/init`.
pub fn failures(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("FAIL"))
        .map(str::to_owned)
        .collect()
}

/// The last record the guest acknowledged (`DISK n`), or None before the first. Their order
/// is [`check_status_lines`]'s business.
pub fn disk_acked(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("DISK ")?.parse().ok())
}

/// The `k` of the latest `STAT k ...` line, or None before the first.
pub fn last_stat(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("STAT ")?.split(' ').next()?.parse().ok())
}

/// `icmp_in` of the latest `STAT` line: the ICMP echo requests the guest's kernel received
/// so far (`InEchos` of /proc/net/snmp).
pub fn last_icmp_in(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|l| {
        l.strip_prefix("STAT ")?
            .split(' ')
            .find_map(|w| w.strip_prefix("icmp_in="))?
            .parse()
            .ok()
    })
}

/// Unix time now, as `ping -D` stamps its lines.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Record `n` as the guest writes it: `QLUREC <n> <check>` padded with spaces to 511 bytes
/// and a newline, check = (n * 2654435761 + 12345) mod 2^32 (see `tests/linux-guest/init`).
pub fn disk_record(n: u64) -> Vec<u8> {
    let check = (n.wrapping_mul(2654435761).wrapping_add(12345)) % (1 << 32);
    let mut rec = format!("QLUREC {n} {check}").into_bytes();
    rec.resize(SECTOR - 1, b' ');
    rec.push(b'\n');
    rec
}

/// Checks that the raw image at `path` holds records 0..=`acked`, each intact in its
/// sector. Panics listing the first bad sectors.
pub fn verify_disk(path: &Path, acked: u64) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut bad = Vec::new();
    for n in 0..=acked {
        let at = n as usize * SECTOR;
        let got = data.get(at..at + SECTOR);
        if got != Some(&disk_record(n)[..]) {
            let shown = got.map(|g| String::from_utf8_lossy(&g[..32]).into_owned());
            bad.push((n, shown));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} acknowledged records missing or damaged in {}; first: {:?}",
        bad.len(),
        acked + 1,
        path.display(),
        &bad[..bad.len().min(5)]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_match_the_guest_format() {
        let r = disk_record(1);
        assert_eq!(r.len(), SECTOR);
        assert!(r.starts_with(b"QLUREC 1 2654448106 "));
        assert_eq!(r[SECTOR - 1], b'\n');
        // The arithmetic is mod 2^32, as ash computes it with 64-bit integers.
        let big = disk_record(1 << 20);
        let want = ((1u64 << 20) * 2654435761 + 12345) % (1 << 32);
        assert!(big.starts_with(format!("QLUREC 1048576 {want} ").as_bytes()));
    }

    #[test]
    fn parses_disk_acks_and_stats() {
        let out: Vec<String> = [
            "x",
            "DISK 0",
            "STAT 0 up=1 disk=0 len=16",
            "DISK 1",
            "STAT 1 up=2",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(disk_acked(&out), Some(1));
        assert_eq!(disk_acked(&out[..1]), None);
        assert_eq!(last_stat(&out), Some(1));
    }
}
