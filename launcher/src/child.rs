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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::socket::MsgFlags;
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

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(Signal),
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

/// The signal state as a supervisor handover writes it ([`crate::handover`]).
impl InheritedSignals {
    /// Its part of the handed-over state.
    pub(crate) fn export(&self) -> crate::handover::state::Signals {
        crate::handover::state::Signals {
            blocked: members(&self.mask),
            ignored: self.ignored.clone(),
        }
    }

    /// The state a handover brought.
    pub(crate) fn import(s: &crate::handover::state::Signals) -> InheritedSignals {
        InheritedSignals {
            mask: set_of(&s.blocked),
            ignored: s.ignored.clone(),
        }
    }
}

/// The signal numbers in `set`, real-time ones included.
pub(crate) fn members(set: &SigSet) -> Vec<libc::c_int> {
    (1..=max_signal())
        // SAFETY: sigismember reads the initialized set; an invalid number just returns -1.
        .filter(|&sig| unsafe { libc::sigismember(set.as_ref(), sig) } == 1)
        .collect()
}

/// The set of the signal numbers `sigs`; numbers that are not signals are left out.
pub(crate) fn set_of(sigs: &[libc::c_int]) -> SigSet {
    let mut raw = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the storage; sigaddset only sets bits of it and fails
    // with EINVAL for a number that is no signal; the set is fully initialized before use.
    unsafe {
        libc::sigemptyset(raw.as_mut_ptr());
        for &sig in sigs {
            libc::sigaddset(raw.as_mut_ptr(), sig);
        }
        SigSet::from_sigset_t_unchecked(raw.assume_init())
    }
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
    /// last before exec; the listener comes back in [`Executed::listener`].
    pub seccomp: Option<&'a [libc::sock_filter]>,
    /// A signal the child sends itself just before exec: the test fault hook
    /// ([`crate::fault`]), the only way to act between fork and exec.
    pub before_exec: Option<Signal>,
}

/// A forked child on its way to executing its binary. Whether it got there arrives later on
/// [`Started::exec`], which the caller waits on in its event loop: a child stopped before
/// exec, or an exec stuck on a hung mount, must never stall the launcher.
#[derive(Debug)]
pub struct Started {
    /// Its pid. Reaping it is the caller's business, whatever the exec status says.
    pub pid: Pid,
    /// Where the exec status arrives.
    pub exec: ExecStatus,
}

/// The parent's end of a child's exec-status pipe (close-on-exec in the child: EOF means
/// execve succeeded, four bytes are the errno that made it fail), and of the socket the child
/// sends its seccomp listener on just before exec.
#[derive(Debug)]
pub struct ExecStatus {
    pipe: OwnedFd,
    program: PathBuf,
    listener: Option<UnixStream>,
    buf: [u8; 4],
    got: usize,
}

/// What a child reported once it executed its binary.
#[derive(Debug)]
pub struct Executed {
    /// The seccomp notification listener, when a filter was asked for and could be installed.
    pub listener: Option<OwnedFd>,
}

impl ExecStatus {
    /// The status pipe's read end (non-blocking), for registration.
    pub fn raw_fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Reads what the child reported so far: `None` while it has neither executed its binary
    /// nor failed to, else the outcome. Call when the pipe is readable; never blocks.
    pub fn poll(&mut self) -> Option<Result<Executed, ChildError>> {
        loop {
            let rest = self.buf.get_mut(self.got..).unwrap_or_default();
            match crate::fdio::retry(|| nix::unistd::read(self.pipe.as_raw_fd(), rest)) {
                Ok(0) => break,
                Ok(n) => self.got += n,
                Err(Errno::EAGAIN) => return None,
                Err(e) => return Some(Err(ChildError::Pipe(e))),
            }
            if self.got == self.buf.len() {
                break;
            }
        }
        if self.got > 0 {
            let errno = match self.got {
                4 => Errno::from_raw(i32::from_ne_bytes(self.buf)),
                _ => Errno::EIO,
            };
            return Some(Err(ChildError::Exec {
                path: self.program.clone(),
                source: errno,
            }));
        }
        // The child sent its listener before exec, so it is in the socket by now, if it came.
        let listener = self.listener.as_ref().and_then(|sock| {
            let mut byte = [0u8; 1];
            crate::fdio::recv_with_fds(sock.as_fd(), &mut byte, MsgFlags::MSG_DONTWAIT)
                .ok()
                .and_then(|(_, fds)| fds.into_iter().next())
        });
        Some(Ok(Executed { listener }))
    }

    /// Waits for [`ExecStatus::poll`]'s outcome, blocking until `deadline` at most: for tests
    /// and tools that have no event loop. `None` at the deadline.
    pub fn wait(&mut self, deadline: std::time::Instant) -> Option<Result<Executed, ChildError>> {
        loop {
            if let Some(done) = self.poll() {
                return Some(done);
            }
            let ready = crate::fdio::wait_fd(self.pipe.as_fd(), PollFlags::POLLIN, deadline);
            if ready.is_err() {
                return None;
            }
        }
    }
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

/// Forks a child that executes `spec`. Returns at once; the exec status arrives on
/// [`Started::exec`].
pub fn spawn(spec: &Spec<'_>) -> Result<Started, ChildError> {
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
    // Only the parent's end: the child's write of four bytes into an empty pipe never blocks.
    nix::fcntl::fcntl(
        status_r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(ChildError::Pipe)?;

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
            let before_exec = spec.before_exec.map(|s| s as libc::c_int);
            let err = child_setup(&plan).err().unwrap_or_else(|| {
                if let Some(sig) = before_exec {
                    // SAFETY: raise(3) is async-signal-safe; the signal's disposition is the
                    // default again (reset_signals), so it stops or kills this child.
                    unsafe { libc::raise(sig) };
                }
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
            Ok(Started {
                pid: child,
                exec: ExecStatus {
                    pipe: status_r,
                    program: spec.program.to_owned(),
                    listener: listener_pair.map(|(ours, _)| ours),
                    buf: [0; 4],
                    got: 0,
                },
            })
        }
        Err(e) => {
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            Err(ChildError::Fork(e))
        }
    }
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
    for ((src, _), slot) in place.iter().zip(parked.iter_mut()) {
        // SAFETY: fcntl on an fd the launcher owns; returns a new fd or -1.
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, park_base) };
        if fd < 0 {
            return Err(Errno::last());
        }
        *slot = fd;
    }
    for ((_, target), fd) in place.iter().zip(parked.iter()) {
        dup2(*fd, *target)?;
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
            crate::fdio::send_fd_after_fork(*sock, listener);
            // SAFETY: the listener is ours and was just sent; QEMU must not hold it.
            unsafe { libc::close(listener) };
        }
    }
    Ok(())
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
            before_exec: None,
        };
        let mut started = spawn(&spec).unwrap();
        let soon = std::time::Instant::now() + std::time::Duration::from_secs(10);
        started.exec.wait(soon).unwrap().unwrap();
        let pid = started.pid;
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
            before_exec: None,
        };
        let mut started = spawn(&spec).unwrap();
        let soon = std::time::Instant::now() + std::time::Duration::from_secs(10);
        match started.exec.wait(soon) {
            Some(Err(ChildError::Exec {
                source: Errno::ENOENT,
                ..
            })) => {}
            other => panic!("unexpected {other:?}"),
        }
        // The failed child exits 127 and is the caller's to reap.
        let status = nix::sys::wait::waitpid(started.pid, None).unwrap();
        assert_eq!(status, WaitStatus::Exited(started.pid, 127));
    }

    /// The parent's end of a status pipe whose child end the test holds.
    fn status_pipe() -> (ExecStatus, OwnedFd) {
        let (r, w) = crate::fdio::pipe().unwrap();
        let status = ExecStatus {
            pipe: r,
            program: PathBuf::from("/usr/bin/qemu"),
            listener: None,
            buf: [0; 4],
            got: 0,
        };
        (status, w)
    }

    #[test]
    fn a_child_that_has_not_executed_yet_is_pending_not_waited_for() {
        // A child stopped between fork and exec, or stuck in an exec on a hung mount, holds
        // the write end open and writes nothing.
        let (mut status, w) = status_pipe();
        let t = std::time::Instant::now();
        assert!(status.poll().is_none());
        let soon = t + std::time::Duration::from_millis(50);
        assert!(status.wait(soon).is_none());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // Two bytes of the errno now and two later: still pending in between.
        let code = (Errno::EACCES as i32).to_ne_bytes();
        nix::unistd::write(&w, &code[..2]).unwrap();
        assert!(status.poll().is_none());
        nix::unistd::write(&w, &code[2..]).unwrap();
        match status.poll() {
            Some(Err(ChildError::Exec {
                source: Errno::EACCES,
                ..
            })) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn eof_without_an_errno_means_executed() {
        let (mut status, w) = status_pipe();
        drop(w);
        assert!(matches!(
            status.poll(),
            Some(Ok(Executed { listener: None }))
        ));
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
