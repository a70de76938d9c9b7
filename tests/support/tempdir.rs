//! A temporary directory removed on drop.
//!
//! Paths stay short (`/tmp/qlu-<pid>-<n>`) because tests put QMP and migration
//! sockets in them and `sun_path` holds at most 107 bytes (unix(7)).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory that exists until this value is dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

/// Creates a fresh, empty temporary directory.
pub fn tempdir() -> TempDir {
    TempDir::new()
}

impl TempDir {
    /// Creates a fresh, empty temporary directory under `$TMPDIR` (or `/tmp`).
    pub fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("qlu-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                // Left behind by an earlier process with the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temporary directory {}: {e}", path.display()),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
