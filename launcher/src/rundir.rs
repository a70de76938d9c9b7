//! Where control sockets live, and why the launcher and the root CLI may trust that place.
//!
//! ```text
//! /run/qemu-liveupgrade/                  root:root 1733   made by root: the package, the
//!                                                          placer service, a root launcher
//!                                                          or a root `qemu-liveupgrade`
//! /run/qemu-liveupgrade/<uid>/            <uid>     0700   made by that uid's first launcher
//!                                                          (or by root, see [`reclaim`])
//! /run/qemu-liveupgrade/<uid>/<pid>.sock  <uid>     0600   one VM's control socket
//! /run/qemu-liveupgrade/placer.sock       root      0666   the placer service (`placer`)
//! ```
//!
//! VMs run as many users: root for scripts, `libvirt-qemu` under libvirt's packaged
//! configuration, whose launchers have no `XDG_RUNTIME_DIR` (libvirt sets only `HOME` and
//! `XDG_{DATA,CACHE,CONFIG}_HOME`, pointing into the domain's directory). So every launcher
//! binds in one root-owned directory that anyone may create an entry in but nobody but root
//! may list (`1733`: write and search for all, read for root only), with the sticky bit so
//! that no user can rename or remove another's entry (`inode(7)`, `S_ISVTX`). Each uid gets
//! its own directory there, mode 0700: only that uid and root reach its sockets.
//!
//! A name in a world-writable directory can be taken first. A directory named for a uid but
//! owned by someone else, a symlink, or one writable by others is never used: root puts it
//! aside and makes the right one ([`reclaim`], done by the placer service for launchers that
//! are not root); where no root step can, that uid's launcher runs its VM without a control
//! socket and says so in one line, and the root CLI skips the directory.
//! Every check is made with `fstat` on the directory opened `O_DIRECTORY | O_NOFOLLOW`, and
//! the socket is then reached through that open directory (`/proc/self/fd/N/NAME`), so a
//! rename after the check cannot redirect it. The CLI also checks who answers
//! (`SO_PEERCRED`): the uid the directory is named for, and the pid the socket is named for.
//!
//! `QEMU_LIVEUPGRADE_RUNDIR` names one directory instead (tests, private setups): owned by
//! the caller or root and not writable by others; launcher and CLI then both use it alone.

use std::ffi::OsStr;
use std::fs::Permissions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, Uid, UnlinkatFlags};

/// The directory every launcher's directory is in.
pub const BASE: &str = "/run/qemu-liveupgrade";
/// Environment variable naming one directory to use instead of [`BASE`]'s layout.
pub const ENV_RUNDIR: &str = "QEMU_LIVEUPGRADE_RUNDIR";
/// [`BASE`]'s mode: sticky, everyone may create an entry, only root may list.
pub const BASE_MODE: u32 = 0o1733;

/// Why a directory was not used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// open(2) failed: missing, not a directory, or a symlink (ENOTDIR or ELOOP).
    #[error("cannot open {}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mkdir(2) failed.
    #[error("cannot create {}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`BASE`] does not exist and only root may make it.
    #[error("{} does not exist; root creates it (the package does, and so do `qemu-liveupgrade placer` and any qemu-liveupgrade command run as root)", path.display())]
    Missing {
        /// The directory.
        path: PathBuf,
    },
    /// Owned by someone it must not be owned by.
    #[error("{} is owned by uid {owner}, not {expected}: refusing it", path.display())]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who may own it, in words.
        expected: String,
    },
    /// Writable by others (and not sticky, where that would do).
    #[error("{} has mode {mode:04o}, writable by others: refusing it", path.display())]
    Mode {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A directory checked for ownership and mode, held open: everything in it is reached
/// through the fd, never by its path again.
#[derive(Debug)]
pub struct RunDir {
    fd: OwnedFd,
    path: PathBuf,
    owner: Uid,
}

impl RunDir {
    /// Its part of a supervisor handover's state ([`crate::handover`]).
    pub(crate) fn export(&self) -> crate::handover::state::RunDir {
        crate::handover::state::RunDir {
            fd: crate::handover::state::Fd::of(&self.fd),
            path: crate::handover::state::Text::path(&self.path),
            owner: self.owner.as_raw(),
        }
    }

    /// The directory a handover brought, open as `fd`, checked when it was first opened.
    pub(crate) fn import(s: &crate::handover::state::RunDir, fd: OwnedFd) -> RunDir {
        RunDir {
            fd,
            path: s.path.to_path(),
            owner: Uid::from_raw(s.owner),
        }
    }

    /// Its path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its owner: the uid whose launchers bind in it.
    pub fn owner(&self) -> Uid {
        self.owner
    }

    /// A path to `name` inside the open directory (`/proc/self/fd/N/name`; 30-odd bytes,
    /// well within `sun_path`), for bind(2) and connect(2), which take no directory fd.
    pub fn reach(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// `name`'s path for people: the directory's path joined with it.
    pub fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Removes the entry `name`, if there is one.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        match unlinkat(Some(self.fd.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in it.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(self.reach(""))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Opens `name`, a subdirectory, and checks it as a uid's directory: owned by `uid`, not
    /// writable by others.
    fn child(&self, name: &str, uid: Uid) -> Result<RunDir, RunDirError> {
        let path = self.path.join(name);
        let fd = open_dir(Some(self.fd.as_fd()), OsStr::new(name), &path)?;
        let dir = checked(fd, path)?;
        if dir.owner != uid {
            return Err(RunDirError::Owner {
                path: dir.path,
                owner: dir.owner.as_raw(),
                expected: format!("uid {uid} it is named for"),
            });
        }
        not_writable_by_others(&dir, false)?;
        Ok(dir)
    }
}

impl AsFd for RunDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The directory this process's launcher binds its control socket in: `<BASE>/<euid>/`,
/// made (mode 0700) if missing, with [`BASE`] made first if this is root. Or the
/// `QEMU_LIVEUPGRADE_RUNDIR` directory, made if missing.
pub fn for_launcher() -> Result<RunDir, RunDirError> {
    let me = nix::unistd::geteuid();
    if let Some(dir) = override_dir() {
        return private(&dir, me, true);
    }
    let base = base(me.is_root())?;
    let name = me.to_string();
    match mkdirat(Some(base.fd.as_raw_fd()), name.as_str(), Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => {
            return Err(RunDirError::Create {
                path: base.shown(&name),
                source: e.into(),
            })
        }
    }
    base.child(&name, me)
}

/// Whether `e` says a uid's directory is there but is not that uid's to use (another
/// owner, a symlink or a file, open to others), as opposed to missing or unreachable.
pub fn is_taken(e: &RunDirError) -> bool {
    match e {
        RunDirError::Owner { .. } | RunDirError::Mode { .. } => true,
        RunDirError::Open { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
        }
        RunDirError::Create { .. } | RunDirError::Missing { .. } => false,
    }
}

/// Root's repair of `uid`'s directory in `base` ([`BASE`]): made (0700, owned by `uid`) if
/// missing; if another uid took the name first, or left a symlink or a file there, that entry
/// is renamed aside (`.taken-<uid>-<seconds>`, kept as evidence, never followed) and the
/// directory made. Returns the name it was moved to, if it was.
///
/// Safe against a racing user: an entry root makes in a sticky directory can be renamed or
/// removed by nobody else (`S_ISVTX`, inode(7)), and it is chowned only once made.
pub fn reclaim(base: &RunDir, uid: Uid) -> Result<Option<String>, RunDirError> {
    let name = uid.to_string();
    let gid = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.gid);
    let mut moved = None;
    for attempt in 0..3 {
        match base.child(&name, uid) {
            Ok(_) => return Ok(moved),
            Err(RunDirError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let created = mkdirat(Some(base.fd.as_raw_fd()), name.as_str(), Mode::S_IRWXU);
                match created {
                    Ok(()) => nix::unistd::fchownat(
                        Some(base.fd.as_raw_fd()),
                        name.as_str(),
                        Some(uid),
                        gid,
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| RunDirError::Create {
                        path: base.shown(&name),
                        source: e.into(),
                    })?,
                    // Made meanwhile by someone: looked at again.
                    Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(RunDirError::Create {
                            path: base.shown(&name),
                            source: e.into(),
                        })
                    }
                }
            }
            Err(e) if is_taken(&e) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = format!(".taken-{uid}-{secs}-{attempt}");
                nix::fcntl::renameat(
                    Some(base.fd.as_raw_fd()),
                    name.as_str(),
                    Some(base.fd.as_raw_fd()),
                    aside.as_str(),
                )
                .map_err(|err| RunDirError::Create {
                    path: base.shown(&aside),
                    source: err.into(),
                })?;
                moved = Some(aside);
            }
            Err(e) => return Err(e),
        }
    }
    base.child(&name, uid).map(|_| moved)
}

/// The directories `qemu-liveupgrade` looks for VMs in, and what it refused on the way.
/// Root: every uid's directory under [`BASE`] (made if missing) that is owned by that uid.
/// Others: their own, if it exists. Or the `QEMU_LIVEUPGRADE_RUNDIR` directory alone.
pub fn for_cli() -> (Vec<RunDir>, Vec<RunDirError>) {
    let me = nix::unistd::geteuid();
    if let Some(dir) = override_dir() {
        return match private(&dir, me, false) {
            Ok(d) => (vec![d], Vec::new()),
            Err(RunDirError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                (Vec::new(), Vec::new())
            }
            Err(e) => (Vec::new(), vec![e]),
        };
    }
    let base = match base(me.is_root()) {
        Ok(b) => b,
        Err(RunDirError::Missing { .. }) => return (Vec::new(), Vec::new()),
        Err(e) => return (Vec::new(), vec![e]),
    };
    let names = if me.is_root() {
        base.names().unwrap_or_default()
    } else {
        // Only root may list the base; a user looks in its own directory.
        vec![me.to_string()]
    };
    let mut dirs = Vec::new();
    let mut refused = Vec::new();
    for name in names {
        let Ok(uid) = name.parse::<u32>() else {
            continue;
        };
        match base.child(&name, Uid::from_raw(uid)) {
            Ok(d) => dirs.push(d),
            Err(RunDirError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => refused.push(e),
        }
    }
    (dirs, refused)
}

/// [`BASE`], checked: root's, and sticky where others may write. Root makes it if it is
/// missing and gives it [`BASE_MODE`] if it has another.
pub fn base(as_root: bool) -> Result<RunDir, RunDirError> {
    let path = PathBuf::from(BASE);
    if as_root {
        match nix::unistd::mkdir(&path, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(RunDirError::Create {
                    path,
                    source: e.into(),
                })
            }
        }
    }
    let fd = match open_dir(None, path.as_os_str(), &path) {
        Err(RunDirError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(RunDirError::Missing { path })
        }
        other => other?,
    };
    let dir = checked(fd, path)?;
    if !dir.owner.is_root() {
        return Err(RunDirError::Owner {
            path: dir.path,
            owner: dir.owner.as_raw(),
            expected: "root".into(),
        });
    }
    if as_root && mode_of(&dir)? != BASE_MODE {
        // Made just now under a umask, or by an older version with another mode: it is
        // root's directory, and its mode is what lets other uids' launchers in.
        // Through /proc: fchmod(2) takes no O_PATH fd.
        std::fs::set_permissions(dir.reach(""), Permissions::from_mode(BASE_MODE)).map_err(
            |source| RunDirError::Create {
                path: dir.path.clone(),
                source,
            },
        )?;
    }
    not_writable_by_others(&dir, true)?;
    Ok(dir)
}

/// The uid and pid at the other end of a connected unix socket (`SO_PEERCRED`, unix(7)): for
/// a client, those of the process that called listen(2).
pub fn peer(stream: &UnixStream) -> io::Result<(Uid, u32)> {
    let cred = getsockopt(stream, PeerCredentials)?;
    Ok((Uid::from_raw(cred.uid()), cred.pid() as u32))
}

fn override_dir() -> Option<PathBuf> {
    std::env::var_os(ENV_RUNDIR)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// A directory named by the caller (`QEMU_LIVEUPGRADE_RUNDIR`), checked: owned by this
/// process's euid or root, not writable by others unless sticky. Made (0700) if missing and
/// `create`.
pub fn at(path: &Path, create: bool) -> Result<RunDir, RunDirError> {
    private(path, nix::unistd::geteuid(), create)
}

fn private(path: &Path, me: Uid, create: bool) -> Result<RunDir, RunDirError> {
    if create {
        std::fs::create_dir_all(path).map_err(|source| RunDirError::Create {
            path: path.to_owned(),
            source,
        })?;
    }
    let fd = open_dir(None, path.as_os_str(), path)?;
    let dir = checked(fd, path.to_owned())?;
    if dir.owner != me && !dir.owner.is_root() {
        return Err(RunDirError::Owner {
            path: dir.path,
            owner: dir.owner.as_raw(),
            expected: format!("uid {me} or root"),
        });
    }
    not_writable_by_others(&dir, true)?;
    Ok(dir)
}

fn open_dir(at: Option<BorrowedFd<'_>>, name: &OsStr, path: &Path) -> Result<OwnedFd, RunDirError> {
    // O_PATH: a directory others may not read ([`BASE`]) can still be checked and used as
    // the base of *at calls and /proc/self/fd paths (open(2)).
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw =
        nix::fcntl::openat(at.map(|f| f.as_raw_fd()), name, flags, Mode::empty()).map_err(|e| {
            RunDirError::Open {
                path: path.to_owned(),
                source: e.into(),
            }
        })?;
    // SAFETY: openat(2) just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn checked(fd: OwnedFd, path: PathBuf) -> Result<RunDir, RunDirError> {
    let st = fstat(fd.as_raw_fd()).map_err(|e| RunDirError::Open {
        path: path.clone(),
        source: e.into(),
    })?;
    // O_DIRECTORY made sure of this; checked again because the rest rests on it.
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return Err(RunDirError::Open {
            path,
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    Ok(RunDir {
        fd,
        path,
        owner: Uid::from_raw(st.st_uid),
    })
}

fn mode_of(dir: &RunDir) -> Result<u32, RunDirError> {
    fstat(dir.fd.as_raw_fd())
        .map(|st| st.st_mode & 0o7777)
        .map_err(|e| RunDirError::Open {
            path: dir.path.clone(),
            source: e.into(),
        })
}

/// Group or others may not write in `dir`, unless `sticky_will_do` and it is sticky (then
/// they may add entries but not touch anyone else's).
fn not_writable_by_others(dir: &RunDir, sticky_will_do: bool) -> Result<(), RunDirError> {
    let mode = mode_of(dir)?;
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if others_write && !(sticky_will_do && sticky) {
        return Err(RunDirError::Mode {
            path: dir.path.clone(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qlu-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_private_directory_is_made_and_reached_through_its_fd() {
        let path = tmp("private");
        let dir = private(&path, nix::unistd::geteuid(), true).unwrap();
        std::fs::write(dir.reach("x"), b"1").unwrap();
        assert_eq!(std::fs::read(path.join("x")).unwrap(), b"1");
        assert_eq!(dir.names().unwrap(), ["x"]);
        dir.unlink("x").unwrap();
        dir.unlink("x").unwrap();
        assert!(!path.join("x").exists());
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn refuses_a_directory_others_may_write_unless_sticky() {
        let path = tmp("mode");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private(&path, nix::unistd::geteuid(), false).unwrap_err();
        assert!(
            matches!(err, RunDirError::Mode { mode: 0o777, .. }),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private(&path, nix::unistd::geteuid(), false).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn refuses_a_symlink_and_a_uid_directory_owned_by_another() {
        let path = tmp("owner");
        std::fs::create_dir_all(path.join("real")).unwrap();
        std::os::unix::fs::symlink(path.join("real"), path.join("link")).unwrap();
        let parent = private(&path, nix::unistd::geteuid(), false).unwrap();
        let me = nix::unistd::geteuid();
        let err = parent.child("link", me).unwrap_err();
        assert!(
            // Linux says ENOTDIR for a symlink opened O_DIRECTORY | O_NOFOLLOW, ELOOP without
            // O_DIRECTORY.
            matches!(&err, RunDirError::Open { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))),
            "{err}"
        );
        let other = Uid::from_raw(me.as_raw() + 1);
        let err = parent.child("real", other).unwrap_err();
        assert!(matches!(err, RunDirError::Owner { .. }), "{err}");
        parent.child("real", me).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn reclaim_makes_a_missing_directory_and_puts_a_taken_one_aside() {
        let path = tmp("reclaim");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1733)).unwrap();
        let base = private(&path, nix::unistd::geteuid(), false).unwrap();
        let me = nix::unistd::geteuid();
        assert_eq!(reclaim(&base, me).unwrap(), None, "made when missing");
        assert_eq!(
            mode_of(&base.child(&me.to_string(), me).unwrap()).unwrap(),
            0o700
        );
        assert_eq!(reclaim(&base, me).unwrap(), None, "left alone when right");

        // Another uid's name taken by this one (a stand-in for an intruder), and a symlink.
        let other = Uid::from_raw(me.as_raw() + 1);
        std::fs::create_dir(path.join(other.to_string())).unwrap();
        std::fs::write(path.join(other.to_string()).join("planted"), b"x").unwrap();
        let aside = reclaim(&base, other).unwrap().expect("moved aside");
        assert!(aside.starts_with(&format!(".taken-{other}-")), "{aside}");
        assert!(path.join(&aside).join("planted").exists(), "kept as it was");
        let fresh = base.child(&other.to_string(), other).unwrap();
        assert_eq!(fresh.names().unwrap(), Vec::<String>::new());

        let third = Uid::from_raw(me.as_raw() + 2);
        std::os::unix::fs::symlink("/", path.join(third.to_string())).unwrap();
        assert!(
            reclaim(&base, third).unwrap().is_some(),
            "a symlink goes aside"
        );
        base.child(&third.to_string(), third).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (uid, pid) = peer(&a).unwrap();
        assert_eq!(uid, nix::unistd::geteuid());
        assert_eq!(pid, std::process::id());
    }
}
