//! Fork and exec of one QEMU generation, with an explicit fd layout.
//!
//! The child gets exactly the fds the command line refers to, at the numbers it refers to them,
//! plus the launcher's own fds (private monitor, guest RAM) moved to numbers chosen by the
//! launcher; everything else is closed. It dies with the launcher (`PR_SET_PDEATHSIG`), and its
//! signal dispositions and mask are those the launcher itself was started with, so QEMU sees the
//! process state it would have seen had it been executed directly.
//!
//! Everything the child needs is prepared before `fork`; between `fork` and `execve` the child
//! makes only async-signal-safe calls and never returns into launcher code (`signal-safety(7)`).

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};

/// Why a generation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// An argument or the path contains a NUL byte.
    #[error("argument contains a NUL byte")]
    Nul,
    /// A pipe for reporting exec failure could not be made.
    #[error("cannot create exec status pipe")]
    Pipe(#[source] Errno),
    /// `fork` failed.
    #[error("cannot fork")]
    Fork(#[source] Errno),
    /// The child could not execute the binary.
    #[error("cannot execute {path}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// errno from `execv`, or from the fd setup just before it.
        #[source]
        source: Errno,
    },
}

/// The signal state the launcher was started with, captured before it installs any handler.
#[derive(Debug, Clone)]
pub struct InheritedSignals {
    mask: SigSet,
    ignored: Vec<libc::c_int>,
}

impl InheritedSignals {
    /// Reads the current mask and the set of ignored signals. Call first thing in `main`.
    pub fn capture() -> InheritedSignals {
        let mask = SigSet::thread_get_mask().unwrap_or_else(|_| SigSet::empty());
        let mut ignored = Vec::new();
        for sig in 1..=max_signal() {
            // Rust's runtime ignores SIGPIPE before main runs, so its state at capture says
            // nothing about what the launcher inherited; QEMU sets its own SIGPIPE handling.
            if sig == libc::SIGPIPE {
                continue;
            }
            let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
            // SAFETY: a null new action only queries; `old` is valid writable storage.
            let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
            // SAFETY: sigaction succeeded, so it filled `old`.
            if rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN {
                ignored.push(sig);
            }
        }
        InheritedSignals { mask, ignored }
    }

    /// Marks the job-control stop signals ignored, as a daemonized QEMU has them.
    pub fn ignore_job_control(&mut self) {
        for sig in [libc::SIGTSTP, libc::SIGTTOU, libc::SIGTTIN] {
            if !self.ignored.contains(&sig) {
                self.ignored.push(sig);
            }
        }
    }

    /// Whether `sig` was ignored when the launcher started.
    pub fn is_ignored(&self, sig: Signal) -> bool {
        self.ignored.contains(&(sig as libc::c_int))
    }
}

fn max_signal() -> libc::c_int {
    libc::SIGRTMAX()
}

/// What one child process gets.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The executable.
    pub program: &'a Path,
    /// argv, including argv[0].
    pub argv: Vec<OsString>,
    /// Inherited fds kept open at the same number.
    pub keep: Vec<RawFd>,
    /// Launcher fds placed at a chosen number in the child: `(source, target)`.
    pub place: Vec<(BorrowedFd<'a>, RawFd)>,
    /// Replacements for stdin, stdout and stderr; `None` inherits the launcher's.
    pub stdio: [Option<BorrowedFd<'a>>; 3],
    /// The signal state to give the child.
    pub signals: &'a InheritedSignals,
    /// A seccomp filter with a notification listener (see [`crate::tapguard`]), installed
    /// last before exec; the listener comes back in [`Spawned::listener`].
    pub seccomp: Option<&'a [libc::sock_filter]>,
}

/// A child that executed its binary.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: Pid,
    /// The seccomp notification listener, when a filter was asked for and could be installed.
    pub listener: Option<OwnedFd>,
}

/// Everything the child does between fork and exec, prepared before the fork.
struct ChildPlan<'a> {
    parent: Pid,
    stdio: Vec<Option<RawFd>>,
    place: Vec<(RawFd, RawFd)>,
    keep: &'a [RawFd],
    survivors: Vec<RawFd>,
    park_base: RawFd,
    signals: &'a InheritedSignals,
    seccomp: Option<(&'a [libc::sock_filter], RawFd)>,
}

/// Forks and executes `spec`. Returns once the child has executed the binary, or with the
/// errno that made it fail.
pub fn spawn(spec: &Spec<'_>) -> Result<Spawned, ChildError> {
    let program = cstr(spec.program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ChildError::Pipe)?;

    // The child sends its seccomp listener back over this before it execs.
    let listener_pair = match spec.seccomp {
        Some(_) => Some(
            UnixStream::pair()
                .map_err(|e| ChildError::Pipe(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?,
        ),
        None => None,
    };

    // Every fd number that must survive into QEMU, sorted, so the child can close the gaps.
    let mut survivors: Vec<RawFd> = vec![0, 1, 2, status_w.as_raw_fd()];
    if let Some((_, theirs)) = &listener_pair {
        survivors.push(theirs.as_raw_fd());
    }
    survivors.extend(&spec.keep);
    survivors.extend(spec.place.iter().map(|(_, t)| *t));
    survivors.sort_unstable();
    survivors.dedup();
    // Above every fd involved, where placed fds are parked before they move to their target.
    let park_base = spec
        .place
        .iter()
        .map(|(s, t)| s.as_raw_fd().max(*t))
        .chain(survivors.iter().copied())
        .max()
        .unwrap_or(2)
        + 1;
    let place: Vec<(RawFd, RawFd)> = spec
        .place
        .iter()
        .map(|(s, t)| (s.as_raw_fd(), *t))
        .collect();
    let stdio: Vec<Option<RawFd>> = spec
        .stdio
        .iter()
        .map(|s| s.map(|f| f.as_raw_fd()))
        .collect();
    let parent = nix::unistd::getpid();

    // Block every signal across fork, so no launcher handler runs in the child before the
    // dispositions are reset (signal-hook's handler would write to the launcher's wake pipe).
    let all = SigSet::all();
    let mut saved = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut saved))
        .map_err(ChildError::Fork)?;
    // SAFETY: the launcher is single-threaded, and the child branch below only makes
    // async-signal-safe calls on data prepared before the fork, then execs or `_exit`s.
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Ok(ForkResult::Child) => {
            let plan = ChildPlan {
                parent,
                stdio,
                place,
                keep: &spec.keep,
                survivors,
                park_base,
                signals: spec.signals,
                seccomp: spec
                    .seccomp
                    .zip(listener_pair.as_ref().map(|(_, t)| t.as_raw_fd())),
            };
            let err = child_setup(&plan).err().unwrap_or_else(|| {
                // SAFETY: program and argv_ptrs are NUL-terminated and outlive the call; the
                // environment is the launcher's own.
                unsafe { libc::execv(program.as_ptr(), argv_ptrs.as_ptr()) };
                Errno::last()
            });
            let code = (err as i32).to_ne_bytes();
            // SAFETY: status_w is open; write(2) and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(status_w.as_raw_fd(), code.as_ptr().cast(), code.len());
                libc::_exit(127);
            }
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            drop(status_w);
            let pid = wait_exec(status_r, child, spec.program)?;
            let listener = listener_pair.and_then(|(ours, _)| receive_fd(&ours));
            Ok(Spawned { pid, listener })
        }
        Err(e) => {
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            Err(ChildError::Fork(e))
        }
    }
}

/// Reads the exec status pipe: EOF means execve succeeded (the pipe was close-on-exec).
fn wait_exec(status_r: OwnedFd, child: Pid, program: &Path) -> Result<Pid, ChildError> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(status_r.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(child);
    }
    // The child failed before exec and exits at once; reap it here so it never reaches the
    // supervisor's SIGCHLD handling as if it were a running generation.
    let _ = nix::sys::wait::waitpid(child, None);
    Err(ChildError::Exec {
        path: program.to_owned(),
        source: Errno::from_raw(i32::from_ne_bytes(buf)),
    })
}

/// The child's half: runs between fork and exec, so only async-signal-safe calls.
fn child_setup(plan: &ChildPlan<'_>) -> Result<(), Errno> {
    let ChildPlan {
        parent,
        stdio,
        place,
        keep,
        survivors,
        park_base,
        signals,
        seccomp,
    } = plan;
    let (parent, park_base) = (*parent, *park_base);
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(Errno::last());
    }
    // The launcher may have died between fork and prctl; then nothing would kill us later.
    if nix::unistd::getppid() != parent {
        return Err(Errno::ESRCH);
    }
    for (target, src) in stdio.iter().enumerate() {
        if let Some(src) = *src {
            dup2(src, target as RawFd)?;
        }
    }
    // Park every placed fd above all others first, so moving one into place can never
    // clobber another that is still waiting to move.
    let mut parked = [0 as RawFd; 64];
    if place.len() > parked.len() {
        return Err(Errno::E2BIG);
    }
    for (i, (src, _)) in place.iter().enumerate() {
        // SAFETY: fcntl on an fd the launcher owns; returns a new fd or -1.
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, park_base) };
        if fd < 0 {
            return Err(Errno::last());
        }
        parked[i] = fd;
    }
    for (i, (_, target)) in place.iter().enumerate() {
        dup2(parked[i], *target)?;
    }
    for fd in keep.iter() {
        // Clear close-on-exec; an fd the caller named but never passed stays closed, as it
        // would be for QEMU run directly, and QEMU reports it.
        // SAFETY: F_SETFD on a possibly-closed fd only fails with EBADF.
        unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) };
    }
    close_all_but(survivors);
    reset_signals(signals)?;
    if let Some((prog, sock)) = seccomp {
        // Best effort: without the filter the new QEMU still works, it just touches the tap.
        if let Ok(listener) = crate::tapguard::install(prog) {
            send_fd(*sock, listener);
            // SAFETY: the listener is ours and was just sent; QEMU must not hold it.
            unsafe { libc::close(listener) };
        }
    }
    Ok(())
}

/// Sends `fd` over the unix socket `sock` (in the child: sendmsg is async-signal-safe).
fn send_fd(sock: RawFd, fd: RawFd) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"L")];
    let _ = sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None);
}

/// Takes the fd the child sent, if it sent one before exec.
fn receive_fd(sock: &UnixStream) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags).ok()?;
    let fd = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
        _ => None,
    })?;
    // SAFETY: the fd just arrived with SCM_RIGHTS and belongs to nobody else here.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup2(src: RawFd, target: RawFd) -> Result<(), Errno> {
    if src == target {
        // dup2 onto itself keeps close-on-exec; clear it explicitly.
        // SAFETY: F_SETFD on an open fd.
        unsafe { libc::fcntl(src, libc::F_SETFD, 0) };
        return Ok(());
    }
    // SAFETY: dup2 with two integers; the target is replaced atomically.
    if unsafe { libc::dup2(src, target) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Closes every fd not in the sorted list `survivors`, with close_range(2) over the gaps.
fn close_all_but(survivors: &[RawFd]) {
    let mut next: libc::c_uint = 0;
    for &fd in survivors {
        let fd = fd as libc::c_uint;
        if fd > next {
            close_range(next, fd - 1);
        }
        next = fd + 1;
    }
    close_range(next, libc::c_uint::MAX);
}

fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: close_range only closes fds; none of those in range is used after this.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc != 0 {
        // Kernels before 5.9: close one by one up to the fd limit.
        let limit = nix::unistd::sysconf(nix::unistd::SysconfVar::OPEN_MAX)
            .ok()
            .flatten()
            .unwrap_or(1024) as libc::c_uint;
        for fd in first..=last.min(limit) {
            // SAFETY: closing an unused fd number is harmless.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

/// Puts back the dispositions and mask the launcher inherited: default for every signal it
/// caught, ignore for those it was started with ignored.
fn reset_signals(signals: &InheritedSignals) -> Result<(), Errno> {
    for sig in 1..=max_signal() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let handler = if signals.ignored.contains(&sig) {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        // SAFETY: signal(2) is async-signal-safe; invalid numbers (glibc-reserved realtime
        // signals) just fail with EINVAL.
        unsafe { libc::signal(sig, handler) };
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&signals.mask), None)
}

fn cstr(bytes: &[u8]) -> Result<CString, ChildError> {
    CString::new(bytes).map_err(|_| ChildError::Nul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use std::io::Read;
    use std::os::fd::AsFd;

    fn run_sh(script: &str, keep: Vec<RawFd>, place: Vec<(BorrowedFd<'_>, RawFd)>) -> String {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let signals = InheritedSignals::capture();
        let spec = Spec {
            program: Path::new("/bin/sh"),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            keep,
            place,
            stdio: [None, Some(w.as_fd()), None],
            signals: &signals,
            seccomp: None,
        };
        let pid = spawn(&spec).unwrap().pid;
        drop(spec);
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 0));
        out
    }

    #[test]
    fn keeps_only_the_listed_fds() {
        let (a_r, _a_w) = nix::unistd::pipe().unwrap(); // not close-on-exec, as inherited fds are
        let (b_r, _b_w) = nix::unistd::pipe().unwrap();
        let a = a_r.as_raw_fd();
        let b = b_r.as_raw_fd();
        let out = run_sh(
            &format!("for f in {a} {b}; do [ -e /proc/self/fd/$f ] && echo open $f || echo closed $f; done"),
            vec![a],
            vec![],
        );
        assert_eq!(out, format!("open {a}\nclosed {b}\n"));
    }

    #[test]
    fn places_fds_at_chosen_numbers_even_when_they_cross() {
        let (x, _xw) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (y, _yw) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Swap them: x goes where y is and y where x is.
        let (xn, yn) = (x.as_raw_fd(), y.as_raw_fd());
        let ino = |fd: &OwnedFd| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
        let (xi, yi) = (ino(&x), ino(&y));
        let out = run_sh(
            &format!("stat -L -c %i /proc/self/fd/{yn} /proc/self/fd/{xn} /proc/self/fd/77"),
            vec![],
            vec![(x.as_fd(), yn), (y.as_fd(), xn), (x.as_fd(), 77)],
        );
        assert_eq!(out, format!("{xi}\n{yi}\n{xi}\n"));
    }

    #[test]
    fn exec_failure_is_reported_with_errno() {
        let signals = InheritedSignals::capture();
        let spec = Spec {
            program: Path::new("/nonexistent/qemu"),
            argv: vec!["qemu".into()],
            keep: vec![],
            place: vec![],
            stdio: [None, None, None],
            signals: &signals,
            seccomp: None,
        };
        match spawn(&spec) {
            Err(ChildError::Exec {
                source: Errno::ENOENT,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn child_gets_default_dispositions_and_the_inherited_mask() {
        let out = run_sh(
            "grep -E '^(SigBlk|SigIgn)' /proc/self/status",
            vec![],
            vec![],
        );
        let signals = InheritedSignals::capture();
        let ign_mask: u64 = signals.ignored.iter().fold(0, |m, s| m | 1u64 << (s - 1));
        // Signals 32 and 33 belong to glibc's threading and cannot be changed through it.
        let ign = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ign = u64::from_str_radix(ign, 16).unwrap() & !(0b11u64 << 31);
        assert_eq!(ign, ign_mask, "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    }
}
