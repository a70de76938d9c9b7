//! The version of a QEMU binary on disk, asked of the binary itself (`-version`), once per path.
//!
//! A running VM reports the version its QEMU answered `query-version` with; what is installed
//! is only known by running the file. `-version` starts no VM and exits at once; a binary that
//! does not answer within [`TIMEOUT`] is reported as unknown rather than waited for.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one `-version` may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Versions already asked for, by path.
#[derive(Debug, Default)]
pub struct Versions {
    known: HashMap<PathBuf, Option<String>>,
}

impl Versions {
    /// `"7.2.22"` for the QEMU at `path`, or `None` if it cannot say.
    pub fn of(&mut self, path: &Path) -> Option<String> {
        self.known
            .entry(path.to_owned())
            .or_insert_with(|| ask(path))
            .clone()
    }
}

fn ask(path: &Path) -> Option<String> {
    let mut child = Command::new(path)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    parse(&out)
}

/// The version in QEMU's `-version` banner: `QEMU emulator version 7.2.22 (Debian ...)`.
pub fn parse(banner: &str) -> Option<String> {
    let rest = banner.lines().next()?.split("version ").nth(1)?;
    let version = rest.split_whitespace().next()?;
    version
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_of_debian_and_upstream_builds() {
        assert_eq!(
            parse("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"),
            Some("7.2.22".into())
        );
        assert_eq!(
            parse("QEMU emulator version 10.0.2\n"),
            Some("10.0.2".into())
        );
        assert_eq!(
            parse("qemu-system-x86_64: -version: invalid option\n"),
            None
        );
        assert_eq!(parse(""), None);
    }

    #[test]
    fn a_program_that_is_not_qemu_has_no_version() {
        let mut v = Versions::default();
        assert_eq!(v.of(Path::new("/bin/true")), None);
        assert_eq!(v.of(Path::new("/nonexistent/qemu")), None);
    }
}
