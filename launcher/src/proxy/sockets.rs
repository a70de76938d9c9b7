//! The sockets under the proxy: the ones clients connect to, and each generation's backends.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrLike,
    SockaddrStorage,
};

/// A socket path the launcher bound; unlinked on drop while it is still the launcher's socket.
#[derive(Debug)]
pub(super) struct BoundPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundPath {
    /// Binds `path`. A socket already there is unlinked first, as QEMU does for `server=on`
    /// (`unix_listen_saddr` in `util/qemu-sockets.c`): it is a leftover of an earlier run.
    /// Anything else there is left alone and the bind fails.
    pub(super) fn bind(path: &Path) -> io::Result<(UnixListener, BoundPath)> {
        if let Ok(md) = fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        let md = fs::symlink_metadata(path)?;
        Ok((
            listener,
            BoundPath {
                path: path.to_owned(),
                dev: md.dev(),
                ino: md.ino(),
            },
        ))
    }
}

impl Drop for BoundPath {
    fn drop(&mut self) {
        // Someone may have bound a new socket at the same path since (a new VM of the same
        // name): only the inode this process created is removed.
        if let Ok(md) = fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Takes over an inherited listening socket, as libvirt passes with `fd=N,server=on`.
pub(super) fn inherited(fd: OwnedFd) -> io::Result<UnixListener> {
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn).map_err(io::Error::from)?;
    let unix = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(io::Error::from)?
        .family()
        == Some(AddressFamily::Unix);
    if !listening || !unix {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {} is not a listening unix socket", fd.as_raw_fd()),
        ));
    }
    Ok(UnixListener::from(fd))
}

/// A private directory for the generations' backend sockets.
///
/// A backend socket gives full control of the VM to whoever connects, and QEMU accepts
/// whoever is next in its backlog. An abstract address can be connected to by any process in
/// the network namespace (and is listed in `/proc/net/unix`), so the backends live in a
/// directory of mode 0700 instead.
#[derive(Debug)]
pub(super) struct BackendDir {
    base: PathBuf,
    dir: Option<PathBuf>,
    serial: u64,
}

impl BackendDir {
    /// Backends will live in a new directory under `base`, made on first use.
    pub(super) fn new(base: PathBuf) -> BackendDir {
        BackendDir {
            base,
            dir: None,
            serial: 0,
        }
    }

    fn dir(&mut self) -> io::Result<PathBuf> {
        if let Some(dir) = &self.dir {
            return Ok(dir.clone());
        }
        let pid = std::process::id();
        for n in 0..1000 {
            let dir = self.base.join(format!("qemu-liveupgrade-{pid}-{n}"));
            // mkdir fails on an existing name, so the directory is surely this process's.
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    self.dir = Some(dir.clone());
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free backend directory name",
        ))
    }

    /// A new listening socket for monitor `index` of generation `gen`: its path and its fd
    /// (close-on-exec; the child module places it for QEMU).
    pub(super) fn listener(&mut self, gen: u32, index: usize) -> io::Result<(PathBuf, OwnedFd)> {
        let dir = self.dir()?;
        // A serial keeps names unique when a generation number is tried again after an abort
        // while the failed QEMU may still hold the old socket.
        self.serial += 1;
        let path = dir.join(format!("{gen}.{}.{index}", self.serial));
        let listener = UnixListener::bind(&path)?;
        Ok((path, listener.into()))
    }
}

impl Drop for BackendDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Waits until `fd` is ready for `events`, or fails with `TimedOut` at `deadline`.
pub(super) fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // Rounded up, so a sub-millisecond remainder does not spin.
        let left = left
            .max(Duration::from_millis(1))
            .min(Duration::from_secs(60));
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd, events)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// `send` without SIGPIPE: a client that went away must show up as EPIPE, not kill the
/// supervisor (whose signal dispositions are its own business).
pub(super) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    socket::send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

/// Most fds one read takes, as many as QEMU's own socket channel accepts per message
/// (`SOCKET_MAX_FDS` in `io/channel-socket.c`); the kernel closes any beyond.
const MAX_FDS: usize = 16;

/// `recvmsg` taking the fds a client passed with SCM_RIGHTS (libvirt's `getfd` and `add-fd`),
/// close-on-exec from the start so that no QEMU generation inherits them by accident.
pub(super) fn recv_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
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

/// [`send`] passing `fds` with the first byte written, by SCM_RIGHTS. On a partial write the
/// fds went with the part written; on `WouldBlock` nothing was sent.
pub(super) fn send_fds(fd: BorrowedFd<'_>, buf: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(buf)];
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}
