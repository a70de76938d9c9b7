//! Waiting for dpkg to finish before a rollout starts.
//!
//! The package's dpkg trigger starts the rollout in the background while dpkg (and apt above
//! it) still runs: more packages of the same QEMU (its modules, firmware) may not be unpacked
//! yet, and a QEMU started against half of them fails ("could not load module"). dpkg holds
//! `lock-frontend` for a whole run of apt (or of dpkg alone) and `lock` while it works; both
//! are fcntl(2) write locks (dpkg's `lock_file`). Asking for a read lock on each with
//! `F_SETLKW` sleeps until the writer is gone; the lock is dropped at once, so that the next
//! apt is never kept waiting by a rollout.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};

/// dpkg's database directory: `$DPKG_ADMINDIR` (dpkg sets it for its maintainer scripts,
/// whose children we are), else `/var/lib/dpkg`.
pub fn admin_dir() -> PathBuf {
    std::env::var_os("DPKG_ADMINDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/dpkg"))
}

/// Blocks until no dpkg or apt run holds the locks in `admin`, and returns how long that took.
/// A lock file that does not exist is no lock.
pub fn wait_unlocked(admin: &Path) -> std::io::Result<Duration> {
    let start = Instant::now();
    for name in ["lock-frontend", "lock"] {
        let file = match File::open(admin.join(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut lock = libc::flock {
            l_type: libc::F_RDLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        loop {
            match fcntl(file.as_raw_fd(), FcntlArg::F_SETLKW(&lock)) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        lock.l_type = libc::F_UNLCK as libc::c_short;
        let _ = fcntl(file.as_raw_fd(), FcntlArg::F_SETLK(&lock));
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn waits_for_a_write_lock_held_by_another_process() {
        let dir = std::env::temp_dir().join(format!("qlu-dpkg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join("lock");
        std::fs::write(&lock, "").unwrap();
        wait_unlocked(&dir).unwrap();
        // Another process takes a write lock as dpkg does, and holds it until told.
        let script = format!(
            "import fcntl, sys\nf = open('{}', 'w')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.readline()\n",
            lock.display()
        );
        let mut holder = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "locked\n");
        let waiter = std::thread::spawn({
            let dir = dir.clone();
            move || wait_unlocked(&dir).unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished(), "returned while the lock was held");
        drop(holder.stdin.take());
        holder.wait().unwrap();
        waiter.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
