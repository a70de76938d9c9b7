//! The sockets under the proxy: the ones clients connect to, and each generation's backends.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockaddrLike, SockaddrStorage};

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

/// A bound path as a supervisor handover writes and reads it ([`crate::handover`]): the new
/// image removes it at the end as this one would have, by the inode this process made.
impl BoundPath {
    pub(super) fn export(&self) -> crate::handover::state::BoundPath {
        crate::handover::state::BoundPath {
            path: crate::handover::state::Text::path(&self.path),
            dev: self.dev,
            ino: self.ino,
        }
    }

    pub(super) fn import(s: &crate::handover::state::BoundPath) -> BoundPath {
        BoundPath {
            path: s.path.to_path(),
            dev: s.dev,
            ino: s.ino,
        }
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

    /// The directory, made now if it was not yet.
    pub(super) fn path(&mut self) -> io::Result<PathBuf> {
        self.dir()
    }

    /// A new name in the directory for generation `gen`'s socket `name`, for QEMU to bind.
    pub(super) fn path_for(&mut self, gen: u32, name: &str) -> io::Result<PathBuf> {
        let dir = self.dir()?;
        self.serial += 1;
        Ok(dir.join(format!("{gen}.{}.{name}", self.serial)))
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

/// The private directory as a supervisor handover writes and reads it: where it is, and the
/// serial that keeps the names of sockets made in it unique.
impl BackendDir {
    pub(super) fn export(&self) -> (PathBuf, Option<PathBuf>, u64) {
        (self.base.clone(), self.dir.clone(), self.serial)
    }

    pub(super) fn import(base: PathBuf, dir: Option<PathBuf>, serial: u64) -> BackendDir {
        BackendDir { base, dir, serial }
    }
}

impl Drop for BackendDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

pub(super) use crate::fdio::send;

/// `recvmsg` taking the fds a client passed with SCM_RIGHTS (libvirt's `getfd` and `add-fd`).
pub(super) fn recv_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    crate::fdio::recv_with_fds(fd, buf, MsgFlags::empty())
}

/// [`send`] passing `fds` with the first byte written, by SCM_RIGHTS.
pub(super) fn send_fds(fd: BorrowedFd<'_>, buf: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    crate::fdio::send_with_fds(fd, buf, &fds)
}
