//! The fd plumbing every part of the launcher needs, written once: fds passed with
//! SCM_RIGHTS (unix(7)), calls retried on EINTR, waiting on one fd with a deadline, pipes.
//!
//! The supervisor's own waits go through its `mio` loop; [`wait_fd`] is for the few places
//! that must wait on a single fd outside it (a last flush before exit, a test).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds one message takes, as many as QEMU's own socket channel accepts per message
/// (`SOCKET_MAX_FDS` in `io/channel-socket.c`); the kernel closes any beyond.
pub const MAX_FDS: usize = 16;

/// Calls `f` until it fails with something other than EINTR.
pub fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// [`retry`] for calls that report `io::Error`.
pub fn retry_io<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Waits until `fd` is ready for `events` (or has hung up), or fails with `TimedOut` at
/// `deadline`.
pub fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut fds = [PollFd::new(fd, events)];
        match nix::poll::poll(&mut fds, poll_timeout(left)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll(2) timeout for `left`: rounded up to a millisecond, so a sub-millisecond remainder
/// does not spin, and capped at a minute (callers loop until their deadline).
pub fn poll_timeout(left: Duration) -> PollTimeout {
    let left = left
        .max(Duration::from_millis(1))
        .min(Duration::from_secs(60));
    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
}

/// `send` without SIGPIPE: a peer that went away shows up as EPIPE, never as a signal.
pub fn send(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    socket::send(sock.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

/// [`send`] passing `fds` with the bytes, by SCM_RIGHTS. On a partial write the fds went with
/// the part written; on `WouldBlock` nothing was sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.is_empty() {
        return send(sock, buf);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(buf)];
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// `recvmsg` taking the fds passed with SCM_RIGHTS, close-on-exec from the start so that no
/// QEMU generation inherits them by accident. `flags` adds to that (`MSG_DONTWAIT`).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these fds in this process for this message just
            // now; nothing else knows their numbers, so each is owned exactly once here.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Sends one byte and `fd` over `sock`, for a forked child before exec: no allocation, only
/// sendmsg(2), which is async-signal-safe (signal-safety(7)). Failure is ignored: the parent
/// sees no fd arrive.
pub fn send_fd_after_fork(sock: RawFd, fd: RawFd) {
    const SPACE: usize = 64;
    #[repr(C, align(8))]
    struct Buf([u8; SPACE]);
    let mut control = Buf([0; SPACE]);
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe {
        let n = std::mem::size_of::<RawFd>() as libc::c_uint;
        (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
    };
    if space > SPACE {
        return;
    }
    // SAFETY: msghdr is plain old data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` aligned, zeroed bytes, room for one header and one
    // fd, so CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside the buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return;
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
    }
}

/// A non-blocking, close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
        let st = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
        let (x, y) = (st(a), st(b));
        (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
    }

    #[test]
    fn fds_cross_a_socket_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe().unwrap();
        let n = send_with_fds(a.as_fd(), b"xy", &[r.as_fd(), w.as_fd()]).unwrap();
        assert_eq!(n, 2);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"xy"[..], 2));
        assert!(same_file(fds[0].as_fd(), r.as_fd()));
        let flags = nix::fcntl::fcntl(fds[1].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
    }

    #[test]
    fn the_fork_safe_sender_is_understood_by_the_receiver() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = pipe().unwrap();
        send_fd_after_fork(a.as_raw_fd(), r.as_raw_fd());
        let mut buf = [0u8; 1];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).unwrap();
        assert_eq!((n, fds.len()), (1, 1));
        assert!(same_file(fds[0].as_fd(), r.as_fd()));
    }

    #[test]
    fn a_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send(a.as_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn waiting_ends_at_the_deadline_or_when_ready() {
        let (r, w) = pipe().unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        let err = wait_fd(r.as_fd(), PollFlags::POLLIN, soon).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        nix::unistd::write(&w, b"x").unwrap();
        let later = Instant::now() + Duration::from_secs(5);
        wait_fd(r.as_fd(), PollFlags::POLLIN, later).unwrap();
    }
}
