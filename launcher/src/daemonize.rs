//! `-daemonize` and `-pidfile`, done by the launcher so that the pid callers see is its own.
//!
//! QEMU daemonizes like this (os-posix.c): the foreground process forks and waits on a pipe;
//! the child calls `setsid` and forks again; the grandchild runs the VM and, once every monitor
//! listens, writes a zero byte to the pipe, after which the foreground exits 0. Any failure
//! before that makes the foreground exit non-zero. libvirt's capability probes depend on
//! exactly this: the foreground exits 0 only once the QMP socket accepts connections, and the
//! pid in the pidfile is the process whose death ends the VM.
//!
//! The launcher does the same with itself as the grandchild, and starts QEMU without either
//! option. Unlike QEMU, the daemon keeps its working directory: later generations must open
//! the same relative paths the first one did.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::ForkResult;

/// A failure while daemonizing or writing the pidfile.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `pipe`, `fork` or `setsid` failed.
    #[error("cannot daemonize")]
    Daemonize(#[source] Errno),
    /// The pidfile could not be created, locked or written. The text is QEMU's own
    /// ("Cannot lock pid file: Resource temporarily unavailable"), errno included, so no
    /// source follows it.
    #[error("cannot create PID file: {reason}")]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// What failed, and the errno text.
        reason: String,
    },
}

/// Tells the waiting foreground process how start-up went. Held by the daemon.
#[derive(Debug)]
pub struct Daemon {
    notify: Option<OwnedFd>,
}

/// What the daemon reports to the foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartResult {
    /// QEMU is up and its monitors listen: the foreground exits 0.
    Ready,
    /// QEMU failed to start: the foreground exits with this status (never 0).
    Failed(u8),
}

/// Forks into the background. Only the daemon returns; the foreground process waits for the
/// daemon's [`Daemon::report`] and exits with the status it carries.
pub fn daemonize() -> Result<Daemon, DaemonError> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(DaemonError::Daemonize)?;
    // SAFETY: the launcher is single-threaded at this point (no generation, no loop yet).
    match unsafe { nix::unistd::fork() }.map_err(DaemonError::Daemonize)? {
        ForkResult::Parent { .. } => {
            drop(w);
            let mut buf = [0u8; 2];
            let n = loop {
                match nix::unistd::read(r.as_raw_fd(), &mut buf) {
                    Err(Errno::EINTR) => continue,
                    Ok(n) => break n,
                    Err(_) => break 0,
                }
            };
            let status = match (n, buf) {
                (2, [0, _]) => 0,
                (2, [1, code]) if code != 0 => code as i32,
                _ => 1,
            };
            // The foreground ends here, as QEMU's does, without running any destructor that
            // could touch state the daemon now owns.
            std::process::exit(status);
        }
        ForkResult::Child => {}
    }
    drop(r);
    nix::unistd::setsid().map_err(DaemonError::Daemonize)?;
    // SAFETY: still single-threaded; the intermediate process only exits.
    match unsafe { nix::unistd::fork() }.map_err(DaemonError::Daemonize)? {
        // SAFETY: _exit is always safe; it skips atexit handlers that belong to the daemon.
        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        ForkResult::Child => {}
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    Ok(Daemon { notify: Some(w) })
}

impl Daemon {
    /// Reports the start-up result to the foreground, which then exits. On success the
    /// daemon's stdio is pointed at /dev/null, as QEMU does once daemonized, so a caller that
    /// reads the foreground's output to EOF (libvirt does) is not held open by the daemon.
    pub fn report(&mut self, result: StartResult) {
        let Some(fd) = self.notify.take() else { return };
        if result == StartResult::Ready {
            // QEMU's start-up messages, relayed, reach the caller before its pipes are let go,
            // unless it does not read them within a second.
            crate::stdio::drain(std::time::Instant::now() + std::time::Duration::from_secs(1));
            redirect_stdio_to_null();
        }
        let msg = match result {
            StartResult::Ready => [0, 0],
            StartResult::Failed(code) => [1, code.max(1)],
        };
        let _ = nix::unistd::write(&fd, &msg);
    }

    /// A second reference to the pipe the foreground waits on. The foreground exits once every
    /// reference is gone, so an error printed before this is dropped reaches the caller first.
    pub fn guard(&self) -> Option<OwnedFd> {
        self.notify.as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// Whether the foreground still waits.
    pub fn is_waiting(&self) -> bool {
        self.notify.is_some()
    }
}

fn redirect_stdio_to_null() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for target in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), target);
            // What waited for the caller's pipe will never reach it now.
            crate::stdio::reopened(target);
        }
    }
}

/// An errno's text without Rust's "(os error N)" suffix, as QEMU prints it.
fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// A pidfile held the way QEMU holds it: created 0600, locked with `lockf` for the process's
/// life, holding the pid and a newline; removed at exit.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    _file: File,
}

impl Pidfile {
    /// Creates, locks and writes the pidfile for the calling process.
    pub fn create(path: &Path) -> Result<Pidfile, DaemonError> {
        let fail = |what: &str, e: io::Error| DaemonError::Pidfile {
            path: path.to_owned(),
            reason: format!("{what}: {}", errno_text(&e)),
        };
        loop {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| fail("Cannot open pid file", e))?;
            // SAFETY: lockf on an fd we own.
            if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } != 0 {
                let e = io::Error::last_os_error();
                return Err(fail("Cannot lock pid file", e));
            }
            // Another process may have unlinked the file between our open and lock; then the
            // lock is on an orphan, and the open must be retried.
            let held =
                nix::sys::stat::fstat(file.as_raw_fd()).map_err(|e| fail("fstat", e.into()))?;
            match nix::sys::stat::stat(path) {
                Ok(now) if now.st_ino == held.st_ino && now.st_dev == held.st_dev => {}
                _ => continue,
            }
            file.set_len(0)
                .map_err(|e| fail("Failed to truncate pid file", e))?;
            writeln!(file, "{}", std::process::id())
                .map_err(|e| fail("Failed to write pid file", e))?;
            return Ok(Pidfile {
                path: path.to_owned(),
                _file: file,
            });
        }
    }

    /// Removes the file, as QEMU does at exit; dropping it does the same.
    pub fn remove(self) {
        drop(self);
    }

    /// Its part of a supervisor handover's state ([`crate::handover`]): the open file keeps
    /// the lock across the exec (fcntl(2): record locks are preserved across execve), as long
    /// as no fd of the file is closed.
    pub(crate) fn export(&self) -> crate::handover::state::Pidfile {
        crate::handover::state::Pidfile {
            path: crate::handover::state::Text::path(&self.path),
            fd: crate::handover::state::Fd::of(&self._file),
        }
    }

    /// The pidfile a handover brought, still locked by `file`.
    pub(crate) fn import(s: &crate::handover::state::Pidfile, file: OwnedFd) -> Pidfile {
        Pidfile {
            path: s.path.to_path(),
            _file: File::from(file),
        }
    }
}

impl Drop for Pidfile {
    /// The VM ended: the file goes, as QEMU removes its own at exit. A supervisor handover
    /// replaces this process's image without dropping anything, so the file and its lock stay.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Daemon {
    /// The daemon a handover brought: start-up was reported long ago, nobody waits.
    pub(crate) fn reported() -> Daemon {
        Daemon { notify: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_holds_pid_and_refuses_a_second_holder() {
        let dir = std::env::temp_dir().join(format!("qlu-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.pid");
        let pf = Pidfile::create(&path).unwrap();
        // lockf locks are per process, so the second holder must be another process. (Reading
        // the file here first would drop the lock: closing any fd of a file releases the
        // process's POSIX locks on it, fcntl(2).)
        // SAFETY: the child only calls lockf and _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            ForkResult::Child => {
                let f = File::options().write(true).open(&path).unwrap();
                // SAFETY: lockf and _exit on owned fd.
                let rc = unsafe { libc::lockf(f.as_raw_fd(), libc::F_TLOCK, 0) };
                // SAFETY: exits the forked test child without unwinding into the harness.
                unsafe { libc::_exit(if rc == 0 { 0 } else { 3 }) };
            }
            ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 3));
            }
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        pf.remove();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
