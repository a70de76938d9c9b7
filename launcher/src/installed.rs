//! Whether a VM runs the QEMU now installed, for `qemu-liveupgrade list` and `upgrade --all
//! --outdated`.
//!
//! A package upgrade replaces the real binary by renaming a new file over the old one (dpkg
//! unpacks to `.dpkg-new`, then `rename(2)`), so the running QEMU keeps executing the old
//! inode and `/proc/PID/exe` reads `PATH (deleted)` (proc(5)). A VM is outdated when the
//! binary an upgrade would run now is not the file its current QEMU was started from: another
//! path (the config changed, or an upgrade named one with `--to`) or another file at the same
//! path. The file is told by its identity when the generation started, not by its name or
//! version: test builds and wrapper scripts are replaced the same way.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::resolve::{self, Binary};

/// What identifies the file at a path: the inode, and its size and modification time in case
/// it was rewritten in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    /// The identity of the file `path` names now (symlinks followed, as `execve` follows
    /// them); `None` if there is none.
    pub fn of(path: &Path) -> Option<FileId> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// A file's identity as a supervisor handover writes and reads it ([`crate::handover`]).
impl FileId {
    pub(crate) fn export(&self) -> crate::handover::state::FileId {
        crate::handover::state::FileId {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime: self.mtime,
        }
    }

    pub(crate) fn import(s: &crate::handover::state::FileId) -> FileId {
        FileId {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime: s.mtime,
        }
    }
}

/// The status fields about the installed QEMU, for the VM whose current generation runs
/// `running` (started from the file `started_from`) as process `qemu_pid`:
///
/// - `installed_binary`: what an upgrade would run now, or null if nothing resolves;
/// - `installed_error`: why nothing resolves, or null;
/// - `runs_installed`: whether the VM runs exactly that file (null when unknown);
/// - `binary_deleted`: whether the running QEMU's executable is gone from disk.
pub fn status(
    argv0: &OsStr,
    running: &Binary,
    started_from: Option<FileId>,
    qemu_pid: Pid,
) -> Value {
    let deleted = binary_deleted(qemu_pid);
    match resolve::resolve(argv0) {
        Ok(now) => {
            let same = now.path == running.path
                && started_from.is_some()
                && FileId::of(&now.path) == started_from;
            json!({
                "installed_binary": now.path.to_string_lossy(),
                "installed_error": null,
                "runs_installed": same && !deleted,
                "binary_deleted": deleted,
            })
        }
        Err(e) => json!({
            "installed_binary": null,
            "installed_error": crate::error_chain(&e),
            "runs_installed": null,
            "binary_deleted": deleted,
        }),
    }
}

/// Whether the executable of `pid` has been unlinked: proc(5) appends ` (deleted)` to the
/// `exe` link's target then.
fn binary_deleted(pid: Pid) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    #[test]
    fn a_file_renamed_over_has_another_identity_and_the_running_copy_reads_deleted() {
        let dir = std::env::temp_dir().join(format!("qlu-installed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("sleeper");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let before = FileId::of(&exe).unwrap();
        assert_eq!(FileId::of(&exe), Some(before), "stable while untouched");
        // Another test thread forking while the copy was open for writing holds a writable fd
        // until its child execs: exec fails with ETXTBSY meanwhile.
        let mut child = (0..100)
            .find_map(|_| match Command::new(&exe).arg("30").spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                }
                other => Some(other.unwrap()),
            })
            .expect("exec kept failing with ETXTBSY");
        let pid = Pid::from_raw(child.id() as i32);
        assert!(!binary_deleted(pid));

        // What dpkg does: the new file is written aside and renamed over the old name.
        let new = dir.join("sleeper.dpkg-new");
        std::fs::copy("/bin/sleep", &new).unwrap();
        std::fs::rename(&new, &exe).unwrap();
        assert_ne!(FileId::of(&exe), Some(before));
        assert!(binary_deleted(pid), "the running copy's inode is gone");
        assert_eq!(FileId::of(&dir.join("none")), None);

        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
