//! Keeping a starting QEMU's hands off the VM's taps while the old QEMU still runs the guest.
//!
//! A QEMU given a tap fd resets it while it starts, even under `-incoming`: `TUNSETOFFLOAD 0`
//! and `TUNSETVNETHDRSZ 10` (seen with strace, ../shared/FACTS.md). Offloads and the vnet
//! header length belong to the tap device, not to one fd, so the old QEMU, still running the
//! guest with 12-byte headers, suddenly reads and writes misframed packets: a ping every 10 ms
//! lost 3-5 packets per upgrade.
//!
//! So every later generation starts under a seccomp filter that turns those ioctls into user
//! notifications (`seccomp_unotify(2)`), answered by the launcher. Until the migration starts,
//! the launcher answers "done" without doing them: the new QEMU's idea of the tap is wrong for
//! a moment, and nothing else sees it. From the migration on, when the old QEMU has stopped
//! the guest and the new one loads the virtio-net state and sets the tap up for the guest's
//! negotiated features, the ioctls go through (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// tun ioctls that change the tap device for every fd on it (linux/if_tun.h).
const TAP_IOCTLS: [u32; 4] = [
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d8, // TUNSETVNETHDRSZ
    0x4004_54dc, // TUNSETVNETLE
    0x4004_54de, // TUNSETVNETBE
];

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// The classic BPF program: notify on those ioctls, allow everything else.
pub fn program() -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = |offset: u32| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    // seccomp_data: nr at 0, arch at 4, args[1] (low word, little endian) at 16 + 8.
    let mut prog = vec![
        load(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        load(0),
        jeq(libc::SYS_ioctl as u32, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        load(24),
    ];
    let n = TAP_IOCTLS.len() as u8;
    for (i, cmd) in TAP_IOCTLS.iter().enumerate() {
        // Match: jump over the remaining comparisons and the ALLOW to the NOTIFY.
        prog.push(jeq(*cmd, n - i as u8, 0));
    }
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_USER_NOTIF,
    ));
    prog
}

/// Installs `prog` in the calling process and returns the notification listener. Called in a
/// forked child just before exec, so only async-signal-safe calls. Without CAP_SYS_ADMIN the
/// kernel requires no_new_privs first (seccomp(2)); that is set only then.
pub fn install(prog: &[libc::sock_filter]) -> Result<RawFd, Errno> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    let attempt = || {
        // SAFETY: fprog points at a valid program that outlives the call; the kernel copies it.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &fprog as *const libc::sock_fprog,
            )
        }
    };
    let mut fd = attempt();
    if fd < 0 && Errno::last() == Errno::EACCES {
        // SAFETY: plain prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        fd = attempt();
    }
    if fd < 0 {
        return Err(Errno::last());
    }
    Ok(fd as RawFd)
}

/// The launcher's side of one generation's filter.
#[derive(Debug)]
pub struct TapGuard {
    listener: OwnedFd,
    /// Let tap ioctls through: set once the migration has started.
    pub live: bool,
    /// Ioctls answered without being done, for reports and tests.
    pub suppressed: u32,
}

impl TapGuard {
    /// Wraps a notification listener.
    pub fn new(listener: OwnedFd) -> TapGuard {
        TapGuard {
            listener,
            live: false,
            suppressed: 0,
        }
    }

    /// The listener, for registration.
    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Its part of a supervisor handover's state ([`crate::handover`]). The listener must
    /// cross: once it is closed, the kernel fails the filtered ioctls with ENOSYS, and the
    /// guest's later offload changes (virtio-net feature negotiation) would fail in QEMU.
    pub(crate) fn export(&self) -> crate::handover::state::TapGuard {
        crate::handover::state::TapGuard {
            fd: crate::handover::state::Fd::of(&self.listener),
            live: self.live,
            suppressed: self.suppressed,
        }
    }

    /// The guard a handover brought, on `listener`.
    pub(crate) fn import(s: &crate::handover::state::TapGuard, listener: OwnedFd) -> TapGuard {
        TapGuard {
            listener,
            live: s.live,
            suppressed: s.suppressed,
        }
    }

    /// Answers every pending notification. Returns false once the QEMU is gone.
    pub fn on_readable(&mut self) -> bool {
        loop {
            let mut ready = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut ready, PollTimeout::ZERO) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
            let revents = ready[0].revents().unwrap_or(PollFlags::empty());
            if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return false;
            }
            // SAFETY: seccomp_notif is plain old data; the kernel wants it zeroed.
            let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
            // SAFETY: the listener is a seccomp notification fd; notif is writable and sized.
            let rc = unsafe {
                libc::ioctl(
                    self.listener.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_RECV,
                    &mut notif,
                )
            };
            if rc < 0 {
                match Errno::last() {
                    // The thread died or the call was interrupted before we took it.
                    Errno::ENOENT | Errno::EINTR => continue,
                    _ => return false,
                }
            }
            let mut resp = libc::seccomp_notif_resp {
                id: notif.id,
                val: 0,
                error: 0,
                flags: 0,
            };
            if self.live {
                resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
            } else {
                self.suppressed += 1;
            }
            // SAFETY: resp is a valid response for a notification taken from this listener.
            unsafe {
                libc::ioctl(
                    self.listener.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_SEND,
                    &resp,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A forked child installs the filter, passes its listener up, then makes a tap-style
    /// ioctl on a pipe: suppressed it "succeeds"; live it reaches the kernel (ENOTTY on a pipe).
    fn child_ioctl_result(live: bool) -> i32 {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let prog = program();
        // SAFETY: the child only installs the filter, sends an fd and makes raw syscalls.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match install(&prog) {
                    Ok(fd) => {
                        let fds = [fd];
                        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                        let iov = [std::io::IoSlice::new(b"x")];
                        let _ = nix::sys::socket::sendmsg::<()>(
                            b.as_raw_fd(),
                            &iov,
                            &cmsg,
                            nix::sys::socket::MsgFlags::empty(),
                            None,
                        );
                        let (r, _w) = nix::unistd::pipe().unwrap();
                        let arg: libc::c_uint = 0;
                        // SAFETY: an ioctl on our own pipe.
                        let rc = unsafe { libc::ioctl(r.as_raw_fd(), TAP_IOCTLS[0] as _, arg) };
                        if rc == 0 {
                            0
                        } else {
                            Errno::last() as i32
                        }
                    }
                    Err(e) => 100 + e as i32,
                };
                // SAFETY: leaving the forked test child without unwinding.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let mut buf = [0u8; 1];
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg = nix::sys::socket::recvmsg::<()>(
                    a.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
                let fd = msg
                    .cmsgs()
                    .unwrap()
                    .find_map(|c| match c {
                        nix::sys::socket::ControlMessageOwned::ScmRights(f) => f.first().copied(),
                        _ => None,
                    })
                    .expect("listener");
                // SAFETY: the fd just arrived with SCM_RIGHTS and is ours alone.
                let mut guard = TapGuard::new(unsafe { OwnedFd::from_raw_fd(fd) });
                guard.live = live;
                let mut pfd = [PollFd::new(guard.listener.as_fd(), PollFlags::POLLIN)];
                poll(&mut pfd, PollTimeout::from(5000u16)).unwrap();
                guard.on_readable();
                assert_eq!(guard.suppressed, u32::from(!live));
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn tap_ioctls_are_suppressed_until_live() {
        assert_eq!(child_ioctl_result(false), 0, "suppressed: reported done");
        assert_eq!(
            child_ioctl_result(true),
            Errno::ENOTTY as i32,
            "live: the kernel saw it"
        );
    }
}
