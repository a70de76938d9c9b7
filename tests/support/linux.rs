//! The Linux test guest of `tests/linux-guest/` and the private network it talks on.
//!
//! `scripts/build-linux-guest` builds a Debian cloud kernel and a busybox initramfs whose
//! `/init` answers ping, echoes TCP on port 7, writes fsync'd numbered records to
//! `/dev/vda` (`DISK n` on the serial console once record n is acknowledged) and prints a
//! `STAT` line about every 100 ms.
//!
//! Its NIC is a tap whose host end lives in a network namespace the test creates
//! ([`Netns`]): the guest's address and the peer address exist only in there, so no packet
//! of a test ever reaches the host's own network, let alone another machine. The tap is
//! opened in the host namespace and handed to QEMU as `-netdev tap,fd=N`, then moved into
//! the namespace ([`Tap::move_into`]): an open tap fd keeps working when its device changes
//! namespace, which is what lets the test create it without running QEMU inside the
//! namespace.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::paths::{profile_dir, repo_root};
use crate::shim::output_within;
use crate::Vm;

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
            let out_dir = profile_dir()
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| repo_root().join("target"))
                .join("linux-guest");
            let script = repo_root().join("scripts/build-linux-guest");
            let output = Command::new(&script)
                .arg(&out_dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !output.status.success() {
                panic!(
                    "{} failed ({}); the Linux test guest is missing. Its output:\n{}{}",
                    script.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
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

/// QEMU arguments for the Linux guest on TCG (`q35`, 256 MiB, serial console on stdout):
/// a virtio NIC on the tap fd `tap_fd`, the raw image `disk` as a virtio disk, and a virtio
/// console on the chardev `hvc` (a `-chardev` value without its id, e.g. `null` or
/// `file,path=...`). `-no-reboot` and `panic=-1`: a guest whose /init dies ends QEMU rather
/// than booting again and printing a second READY.
pub fn linux_argv(tap_fd: RawFd, disk: &Path, hvc: &str) -> Vec<String> {
    let guest = linux_guest();
    let append =
        format!("console=ttyS0 quiet cryptomgr.notests panic=-1 guest_ip={GUEST_IP}/{PREFIX_LEN}");
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
        "-serial",
        "stdio",
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
        &format!("{hvc},id=hvc0"),
        "-device",
        "virtconsole,chardev=hvc0",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// Creates a zero-filled raw image of `mib` MiB for the guest's disk writer.
pub fn create_disk(path: &Path, mib: u64) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(mib << 20)
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

/// Waits for the guest's `READY` line and panics if `/init` reported a failure before it.
pub fn wait_linux_ready(vm: &Vm, timeout: Duration) {
    vm.wait_stdout_contains("READY ip=", timeout);
    let failures = failures(&vm.stdout_text());
    assert!(
        failures.is_empty(),
        "the guest's /init failed: {failures:?}"
    );
    assert!(
        vm.stdout_text().contains(&format!(
            "READY ip={GUEST_IP}/{PREFIX_LEN} disk=vda hvc=yes"
        )),
        "the guest came up without its network, disk or virtio console"
    );
}

/// The `FAIL ...` lines of the guest's `/init`.
pub fn failures(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("FAIL"))
        .map(str::to_owned)
        .collect()
}

/// The last record the guest acknowledged (`DISK n`), checking that acknowledgements came in
/// order with none missing. None before the first.
pub fn disk_acked(stdout: &str) -> Option<u64> {
    let mut last: Option<u64> = None;
    for line in stdout.lines() {
        let Some(n) = line
            .trim()
            .strip_prefix("DISK ")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let want = last.map_or(0, |l| l + 1);
        assert_eq!(n, want, "DISK lines out of order: {n} after {last:?}");
        last = Some(n);
    }
    last
}

/// The `k` of every `STAT k ...` line, in order.
pub fn stat_counters(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("STAT ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
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

/// A network namespace `qlu-<pid>-<n>` (ip-netns(8)), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    pub fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        loop {
            let name = format!(
                "qlu-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            // One left by an earlier process with the same pid makes `add` fail: next name.
            if Path::new("/run/netns").join(&name).exists() {
                continue;
            }
            run(Command::new("ip").args(["netns", "add", &name]));
            let ns = Netns { name };
            ns.ip(&["link", "set", "lo", "up"]);
            return ns;
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NS ARGS` and panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs it:
    /// the pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Opens a TCP connection to `addr` from inside the namespace.
    ///
    /// setns(2) moves only the calling thread, so a short-lived thread enters the namespace
    /// and connects; the socket belongs to the namespace it was created in for its whole
    /// life, whichever thread uses it later.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let ns = File::open(Path::new("/run/netns").join(&self.name))?;
        thread::spawn(move || {
            // SAFETY: `ns` is an open namespace file; setns(2) with CLONE_NEWNET changes
            // only this thread's network namespace, and this thread ends after connecting.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .expect("connect thread panicked")
    }

    /// `ping -c count -i interval` from inside the namespace to `target`, waiting at most
    /// `timeout` for it to finish.
    pub fn ping(
        &self,
        target: &str,
        count: u32,
        interval: Duration,
        timeout: Duration,
    ) -> PingReport {
        let mut cmd = self.command("ping");
        cmd.args(["-n", "-D", "-W", "1", "-c", &count.to_string(), "-i"])
            .arg(format!("{}", interval.as_secs_f64()))
            .arg(target);
        let out = output_within(cmd, timeout);
        PingReport::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Starts pinging `target` every `interval` from inside the namespace until
    /// [`Pinger::stop`].
    pub fn start_ping(&self, target: &str, interval: Duration) -> Pinger {
        let mut cmd = self.command("ping");
        cmd.args(["-n", "-D", "-i"])
            .arg(format!("{}", interval.as_secs_f64()))
            .arg(target);
        Pinger { vm: Vm::spawn(cmd) }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Unmounts the name; the namespace itself goes when its last process and socket do,
        // and the tap in it with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as libvirt opens them) for QEMU's
/// `-netdev tap,fd=N`. It lives while any fd to it is open: this one, QEMU's copy.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates a tap in the caller's namespace, named by the kernel (`qlut%d`).
    pub fn open() -> Tap {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"qlut%d") {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: the fd is open on /dev/net/tun and TUNSETIFF reads and writes one ifreq,
        // which `ifr` is and outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
            panic!("TUNSETIFF: {}", io::Error::last_os_error());
        }
        let name: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Tap {
            fd: file.into(),
            name: String::from_utf8(name).expect("ASCII interface name"),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fd number, the same in a child that [`Tap::pass_to`] prepared.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Lets `cmd`'s process inherit the tap fd under its number. The fd stays close-on-exec
    /// here, so programs other tests spawn at the same time do not get it.
    pub fn pass_to(&self, cmd: &mut Command) {
        let fd = self.fd();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; fcntl(2) is one (signal-safety(7)), and it
        // allocates nothing. `fd` is open: this Tap outlives the spawn that runs it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Moves the tap into `ns` and gives it `PEER_IP` there, up. Call it once QEMU holds
    /// the fd: the device keeps its fds across namespaces.
    pub fn move_into(&self, ns: &Netns) {
        run(Command::new("ip").args(["link", "set", &self.name, "netns", ns.name()]));
        ns.ip(&[
            "addr",
            "add",
            &format!("{PEER_IP}/{PREFIX_LEN}"),
            "dev",
            &self.name,
        ]);
        ns.ip(&["link", "set", &self.name, "up"]);
    }
}

/// One reply line of `ping -D`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingReply {
    /// `icmp_seq`.
    pub seq: u64,
    /// Unix time ping read the reply.
    pub received_at: f64,
    /// Round-trip time, seconds.
    pub rtt: f64,
}

impl PingReply {
    /// Unix time the request went out.
    pub fn sent_at(&self) -> f64 {
        self.received_at - self.rtt
    }
}

/// What `ping -D` printed: the summary and every reply.
#[derive(Clone, Debug, Default)]
pub struct PingReport {
    /// Requests sent, from the summary.
    pub transmitted: u64,
    /// Distinct replies, from the summary.
    pub received: u64,
    /// Duplicate replies (`DUP!`).
    pub duplicates: u64,
    /// Every reply line, duplicates included.
    pub replies: Vec<PingReply>,
}

impl PingReport {
    /// Parses iputils `ping -n -D` output.
    pub fn parse(text: &str) -> PingReport {
        let mut r = PingReport::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let Some((ts, rest)) = rest.split_once(']') else {
                    continue;
                };
                let field = |name: &str| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.parse::<f64>().ok())
                };
                if let (Ok(received_at), Some(seq), Some(rtt_ms)) =
                    (ts.parse(), field("icmp_seq="), field("time="))
                {
                    r.replies.push(PingReply {
                        seq: seq as u64,
                        received_at,
                        rtt: rtt_ms / 1000.0,
                    });
                    if rest.contains("DUP!") {
                        r.duplicates += 1;
                    }
                }
            } else if line.contains("packets transmitted") {
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if nums.len() >= 2 {
                    r.transmitted = nums[0];
                    r.received = nums[1];
                }
            }
        }
        r
    }

    /// Requests with no reply, among those sent before the last reply came: the ones still
    /// in flight when ping was stopped are not counted as lost.
    pub fn lost(&self) -> Vec<u64> {
        let mut seen: Vec<u64> = self.replies.iter().map(|r| r.seq).collect();
        seen.sort_unstable();
        seen.dedup();
        let Some(&last) = seen.last() else {
            return Vec::new();
        };
        // iputils numbers from 1.
        (1..=last)
            .filter(|s| seen.binary_search(s).is_err())
            .collect()
    }

    /// When the last answered request before `seq` went out: a lost request `seq` went out
    /// `seq - that` intervals later.
    pub fn answered_before(&self, seq: u64) -> Option<PingReply> {
        self.replies
            .iter()
            .filter(|r| r.seq < seq)
            .max_by_key(|r| r.seq)
            .copied()
    }
}

/// A `ping` running in a namespace, in its own process group.
pub struct Pinger {
    vm: Vm,
}

impl Pinger {
    /// Stops ping with SIGINT (it prints its summary then) and returns what it reported.
    pub fn stop(mut self) -> PingReport {
        self.vm.signal(Signal::SIGINT);
        self.vm.wait_exit(Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        // The reader thread may still be taking in the summary after the exit.
        while !self.vm.stdout_text().contains("packets transmitted") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        PingReport::parse(&self.vm.stdout_text())
    }
}

/// Sends `payload` on an echo connection and checks the same bytes come back.
pub fn echo_round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Duration> {
    let start = Instant::now();
    stream.write_all(payload)?;
    let mut back = vec![0; payload.len()];
    stream.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo returned {:?} for {:?}",
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(payload)
            ),
        ));
    }
    Ok(start.elapsed())
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
        let out = "x\nDISK 0\r\nSTAT 0 up=1 disk=0\nDISK 1\nSTAT 1 up=2 disk=1\n";
        assert_eq!(disk_acked(out), Some(1));
        assert_eq!(disk_acked("READY\n"), None);
        assert_eq!(stat_counters(out), [0, 1]);
    }

    #[test]
    fn parses_ping_output() {
        let text = "PING 192.168.77.2 (192.168.77.2) 56(84) bytes of data.\n\
            [1700000000.100000] 64 bytes from 192.168.77.2: icmp_seq=1 ttl=64 time=0.5 ms\n\
            [1700000000.110000] 64 bytes from 192.168.77.2: icmp_seq=2 ttl=64 time=0.5 ms\n\
            [1700000000.140000] 64 bytes from 192.168.77.2: icmp_seq=5 ttl=64 time=0.5 ms\n\
            [1700000000.141000] 64 bytes from 192.168.77.2: icmp_seq=5 ttl=64 time=0.6 ms (DUP!)\n\
            \n--- 192.168.77.2 ping statistics ---\n\
            6 packets transmitted, 3 received, +1 duplicates, 50% packet loss, time 50ms\n";
        let r = PingReport::parse(text);
        assert_eq!((r.transmitted, r.received, r.duplicates), (6, 3, 1));
        assert_eq!(r.lost(), [3, 4]);
        let before = r.answered_before(4).unwrap();
        assert_eq!(before.seq, 2);
        assert!((before.sent_at() - 1700000000.1095).abs() < 1e-6);
    }
}
