//! The rollout log: what a rollout started by the dpkg trigger did, where the admin finds it.
//!
//! Every line goes to the log file (`/var/log/qemu-liveupgrade/rollout.log` by default),
//! prefixed with the UTC time, and to stdout, which is the journal when the trigger started
//! the rollout as a systemd unit. A log file that cannot be written is said once on stderr and
//! the rollout goes on: the VMs matter more than the record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the package's trigger has rollouts log.
pub const DEFAULT_LOG: &str = "/var/log/qemu-liveupgrade/rollout.log";

/// An open rollout log.
#[derive(Debug)]
pub struct Log {
    file: Option<File>,
    path: PathBuf,
}

impl Log {
    /// Opens `path` for appending, creating it and its directory.
    pub fn open(path: &Path) -> Log {
        let file = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(path));
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "qemu-liveupgrade: cannot write {}: {e}; logging to stdout only",
                    path.display()
                );
                None
            }
        };
        Log {
            file,
            path: path.to_owned(),
        }
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs every line of `text`, each with the time.
    pub fn line(&mut self, text: &str) {
        let stamp = utc_timestamp(SystemTime::now());
        for l in text.lines() {
            println!("{l}");
            if let Some(f) = &mut self.file {
                // One write per line, so that two rollouts logging at once interleave by line.
                let _ = f.write_all(format!("{stamp} {l}\n").as_bytes());
            }
        }
    }
}

/// `2026-12-01T10:00:00.123Z`.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Year, month, day of the `days`th day after 1970-01-01, in the proleptic Gregorian calendar
/// (the well-known era-based conversion: 400-year eras of 146,097 days, years from March).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_match_known_dates() {
        let at = |s: u64| utc_timestamp(UNIX_EPOCH + Duration::from_millis(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn lines_are_appended_with_the_time() {
        let dir = std::env::temp_dir().join(format!("qlu-log-{}", std::process::id()));
        let path = dir.join("sub/rollout.log");
        let mut log = Log::open(&path);
        log.line("one\ntwo");
        drop(log);
        Log::open(&path).line("three");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].ends_with("Z one") && lines[2].ends_with("Z three"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
