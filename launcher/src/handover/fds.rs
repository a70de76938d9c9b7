//! The fds that cross the exec: which ones the state names, close-on-exec cleared on exactly
//! those before the exec (and set again if it fails), and each taken once by the new image.
//!
//! `execve(2)` keeps every fd without `FD_CLOEXEC` open at its number, with its open file
//! description: socket buffers, pipe contents, file offsets, `lockf` locks (fcntl(2): record
//! locks are kept across an execve) and epoll-independent state all stay in the kernel. The
//! launcher makes its own fds close-on-exec, so only those the state lists survive.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::state::{Fd, State};

/// Why an fd of the state cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// The state names it twice, or it was taken already.
    #[error("fd {0} is named twice")]
    Twice(i32),
    /// The state names it but does not list it in `fds`.
    #[error("fd {0} is not listed")]
    Unlisted(i32),
    /// It is not open in this process.
    #[error("fd {0} is not open")]
    Closed(i32),
}

impl Fd {
    /// The number of an fd the launcher owns, for the state.
    pub fn of(fd: &impl AsRawFd) -> Fd {
        Fd(fd.as_raw_fd())
    }
}

/// Every fd the state names, in document order; duplicates included, for [`check_listed`].
pub fn named(state: &State) -> Vec<Fd> {
    let mut out = Vec::new();
    out.extend(state.fallback_exe);
    let vm = &state.vm;
    out.extend(&vm.ram);
    out.extend(vm.taps.iter().flat_map(|t| t.fds.iter().copied()));
    out.extend(vm.outputs.iter().map(|r| r.fd));
    out.extend(&vm.child_out);
    out.extend(vm.pidfile.iter().map(|p| p.fd));
    let gen = &state.current;
    out.push(gen.qmp.fd);
    out.extend(gen.tap_guard.iter().map(|g| g.fd));
    out.extend(gen.stderr.iter().map(|r| r.fd));
    let proxy = &state.proxy;
    out.extend(proxy.monitors.iter().map(|m| m.listener.fd));
    for c in &proxy.conns {
        out.push(c.client);
        out.extend(c.fds_in.iter().flat_map(|b| b.fds.iter().copied()));
        if let Some(b) = &c.back {
            out.push(b.fd);
            out.extend(b.fds_out.iter().flat_map(|b| b.fds.iter().copied()));
            out.extend(b.qemu_fd);
            out.extend(b.pending.iter().filter_map(|p| p.fd));
        }
    }
    out.extend(
        proxy
            .journal
            .entries
            .iter()
            .flat_map(|e| e.fds.iter().copied()),
    );
    out.extend(
        proxy
            .handoff
            .iter()
            .flat_map(|d| d.listeners.iter().map(|l| l.fd)),
    );
    out.extend(proxy.viewers.iter().map(|(_, fd)| *fd));
    for p in &state.ptys.ptys {
        out.push(p.master);
        out.extend(p.ends.iter().flat_map(|e| [e.ours, e.theirs]));
    }
    if let Some(c) = &state.control {
        out.push(c.listener);
        out.push(c.dir.fd);
        out.extend(c.clients.iter().flatten().map(|c| c.fd));
    }
    let r = &state.requests;
    out.extend(r.waiters.iter().map(|c| c.fd));
    out.extend(r.checks.iter().map(|(c, _)| c.fd));
    out.extend(r.handovers.iter().map(|(c, _)| c.fd));
    out.extend(r.handed_over.iter().map(|c| c.fd));
    out
}

/// Checks that the state names each fd once and lists exactly those it names.
pub fn check_listed(state: &State) -> Result<(), FdError> {
    let mut seen = BTreeSet::new();
    for fd in named(state) {
        if !seen.insert(fd.0) {
            return Err(FdError::Twice(fd.0));
        }
    }
    let listed: BTreeSet<i32> = state.fds.iter().map(|f| f.0).collect();
    if let Some(fd) = seen.difference(&listed).next() {
        return Err(FdError::Unlisted(*fd));
    }
    if let Some(fd) = listed.difference(&seen).next() {
        return Err(FdError::Unlisted(*fd));
    }
    if listed.len() != state.fds.len() {
        let dup = state
            .fds
            .iter()
            .find(|f| state.fds.iter().filter(|g| g == f).count() > 1);
        return Err(FdError::Twice(dup.map_or(-1, |f| f.0)));
    }
    Ok(())
}

/// Clears close-on-exec on `fds`, so that they survive the exec. On failure the ones already
/// cleared are set again.
pub fn inherit(fds: &[Fd]) -> io::Result<()> {
    for (i, fd) in fds.iter().enumerate() {
        if let Err(e) = fcntl(fd.0, FcntlArg::F_SETFD(FdFlag::empty())) {
            close_on_exec(fds.get(..i).unwrap_or_default());
            return Err(e.into());
        }
    }
    Ok(())
}

/// Sets close-on-exec on `fds` again: the exec failed, or the new image took them.
pub fn close_on_exec(fds: &[Fd]) {
    for fd in fds {
        let _ = fcntl(fd.0, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// The new image's side: hands out each listed fd once, as an owned fd, close-on-exec again.
#[derive(Debug)]
pub struct Take {
    listed: BTreeSet<RawFd>,
    taken: BTreeSet<RawFd>,
}

impl Take {
    /// For the fds `state` lists.
    pub fn new(state: &State) -> Take {
        Take::for_fds(&state.fds)
    }

    /// For the fds `listed`.
    pub fn for_fds(listed: &[Fd]) -> Take {
        Take {
            listed: listed.iter().map(|f| f.0).collect(),
            taken: BTreeSet::new(),
        }
    }

    /// Takes `fd`: listed, not taken before, open.
    pub fn owned(&mut self, fd: Fd) -> Result<OwnedFd, FdError> {
        if !self.listed.contains(&fd.0) {
            return Err(FdError::Unlisted(fd.0));
        }
        if !self.taken.insert(fd.0) {
            return Err(FdError::Twice(fd.0));
        }
        fcntl(fd.0, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|_| FdError::Closed(fd.0))?;
        // SAFETY: the fd is open (F_SETFD succeeded), was listed by the launcher that owned it
        // before the exec, and is handed out once (the set above), so nothing else in this
        // process owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd.0) })
    }

    /// Closes every listed fd nothing took (a newer writer's, which this image does not
    /// know what to do with); returns their numbers.
    pub fn close_rest(self) -> Vec<RawFd> {
        let rest: Vec<RawFd> = self.listed.difference(&self.taken).copied().collect();
        for &fd in &rest {
            let _ = nix::unistd::close(fd);
        }
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherit_clears_close_on_exec_and_close_on_exec_sets_it() {
        let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let fds = [Fd::of(&r)];
        let flags = || FdFlag::from_bits_truncate(fcntl(r.as_raw_fd(), FcntlArg::F_GETFD).unwrap());
        inherit(&fds).unwrap();
        assert!(!flags().contains(FdFlag::FD_CLOEXEC));
        close_on_exec(&fds);
        assert!(flags().contains(FdFlag::FD_CLOEXEC));
        assert!(inherit(&[Fd(-1)]).is_err());
    }

    #[test]
    fn take_hands_out_each_listed_fd_once() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (rn, wn) = (r.as_raw_fd(), w.as_raw_fd());
        std::mem::forget(r);
        std::mem::forget(w);
        let mut take = Take {
            listed: [rn, wn, 9999].into_iter().collect(),
            taken: BTreeSet::new(),
        };
        let owned = take.owned(Fd(rn)).unwrap();
        assert!(matches!(take.owned(Fd(rn)), Err(FdError::Twice(_))));
        assert!(matches!(take.owned(Fd(12345)), Err(FdError::Unlisted(_))));
        assert!(matches!(take.owned(Fd(9999)), Err(FdError::Closed(_))));
        assert_eq!(take.close_rest(), vec![wn]);
        drop(owned);
    }
}
