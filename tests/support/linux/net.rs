//! The private network a Linux test guest talks on: a network namespace the test creates
//! ([`Netns`]) and a tap whose host end lives in it ([`Tap`]).
//!
//! The guest's address and the peer address exist only in that namespace, so no packet of a
//! test ever reaches the host's own network, let alone another machine. The tap is opened in
//! the host namespace and handed to QEMU as `-netdev tap,fd=N`, then moved into the namespace
//! ([`Tap::move_into`]): an open tap fd keeps working when its device changes namespace,
//! which is what lets the test create it without running QEMU inside the namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use super::ping::{PingReport, Pinger};
use super::{PEER_IP, PREFIX_LEN};
use crate::shim::output_within;

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
        Pinger::spawn(cmd)
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
