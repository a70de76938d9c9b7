//! A client of a console socket (`-chardev socket,path=P,server=on`) that holds one
//! connection for the VM's whole life, as a user on the serial console or libvirt's console
//! relay does, and keeps every line with the time it arrived.
//!
//! What the Linux guest prints there is checked by [`check_status_lines`]: its `STAT` lines
//! are numbered and carry their own length, so a line or a byte lost or doubled anywhere in
//! the relay (QEMU, the launcher across a swap) shows.

use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::unix_now;

#[derive(Default)]
struct Text {
    /// Complete lines, without their line end, each with the unix time it arrived.
    lines: Vec<(f64, String)>,
    partial: Vec<u8>,
    /// Why the connection ended, once it did.
    ended: Option<String>,
}

struct Shared {
    text: Mutex<Text>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Text> {
        self.text.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the reader to add something, at most until `deadline` (which is not past).
    fn wait<'a>(&self, text: MutexGuard<'a, Text>, deadline: Instant) -> MutexGuard<'a, Text> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(text, left)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// One connection to a console socket, read by a background thread until it ends.
pub struct Console {
    name: String,
    path: PathBuf,
    inode: (u64, u64),
    shared: Arc<Shared>,
}

impl Console {
    /// Connects to the socket at `path`, retrying until it exists and accepts (QEMU or the
    /// launcher binds it as it starts), for at most `timeout`. `name` is for messages.
    pub fn connect(name: &str, path: &Path, timeout: Duration) -> Console {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= timeout => {
                    panic!("{name}: cannot connect to {}: {e}", path.display())
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        };
        Console::reading(name, path, stream)
    }

    /// Opens the pty `path` (`/dev/pts/N`, as libvirt's `<console type='pty'>` names it) in
    /// raw mode and reads it like a console socket: the guest's serial output arrives there
    /// byte for byte. Holds it for the VM's life, as `virsh console` would; a pty nobody reads
    /// stalls the guest's output once its buffer is full.
    pub fn open_pty(name: &str, path: &Path) -> Console {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .unwrap_or_else(|e| panic!("{name}: open {}: {e}", path.display()));
        let mut termios = tcgetattr(&file)
            .unwrap_or_else(|e| panic!("{name}: tcgetattr {}: {e}", path.display()));
        cfmakeraw(&mut termios);
        tcsetattr(&file, SetArg::TCSANOW, &termios)
            .unwrap_or_else(|e| panic!("{name}: tcsetattr {}: {e}", path.display()));
        Console::reading(name, path, file)
    }

    fn reading(name: &str, path: &Path, from: impl Read + Send + 'static) -> Console {
        let md = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{name}: stat {}: {e}", path.display()));
        let shared = Arc::new(Shared {
            text: Mutex::new(Text::default()),
            changed: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        thread::spawn(move || read_console(from, &s));
        Console {
            name: name.to_owned(),
            path: path.to_owned(),
            inode: (md.dev(), md.ino()),
            shared,
        }
    }

    /// The complete lines so far, without line ends (and without the `\r` of a `\r\n`).
    pub fn lines(&self) -> Vec<String> {
        self.shared
            .lock()
            .lines
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The complete lines so far with the unix time each arrived.
    pub fn stamped_lines(&self) -> Vec<(f64, String)> {
        self.shared.lock().lines.clone()
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn ended(&self) -> Option<String> {
        self.shared.lock().ended.clone()
    }

    /// Whether the socket path is still the one connected to (same inode): the path its
    /// users know has not been replaced or removed.
    pub fn path_unchanged(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|md| (md.dev(), md.ino()) == self.inode)
    }

    /// Waits until `f` holds for the lines so far. Panics on timeout, or as soon as the
    /// connection ended while `f` still says no, showing the last lines.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut text = self.shared.lock();
        loop {
            let lines: Vec<String> = text.lines.iter().map(|(_, l)| l.clone()).collect();
            if f(&lines) {
                return;
            }
            let tail = lines[lines.len().saturating_sub(10)..].join("\n");
            if let Some(why) = &text.ended {
                panic!(
                    "{}: the console ended ({why}) before {what}; last lines:\n{tail}",
                    self.name
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}; last lines:\n{tail}",
                    self.name
                );
            }
            text = self.shared.wait(text, deadline);
        }
    }

    /// Waits for the connection to end (the VM exited) and returns why it did.
    pub fn wait_end(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut text = self.shared.lock();
        loop {
            if let Some(why) = &text.ended {
                return why.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("{}: still connected after {timeout:?}", self.name);
            }
            text = self.shared.wait(text, deadline);
        }
    }
}

fn read_console(mut stream: impl Read, shared: &Shared) {
    let mut chunk = [0u8; 4096];
    let why = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break "end of stream".to_owned(),
            Ok(n) => {
                let at = unix_now();
                let mut text = shared.lock();
                for &b in &chunk[..n] {
                    if b == b'\n' {
                        let raw = std::mem::take(&mut text.partial);
                        let raw = raw.strip_suffix(b"\r").unwrap_or(&raw);
                        let line = String::from_utf8_lossy(raw).into_owned();
                        text.lines.push((at, line));
                    } else {
                        text.partial.push(b);
                    }
                }
                drop(text);
                shared.changed.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break e.to_string(),
        }
    };
    shared.lock().ended = Some(why);
    shared.changed.notify_all();
}

/// What a console's status lines showed, from [`check_status_lines`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusLines {
    /// `STAT` lines seen: numbered 0 to `stats - 1`, each once, in order, each whole.
    pub stats: u64,
    /// Lines that are none of the guest's own (kernel messages, say), for the log.
    pub other: Vec<String>,
}

/// Checks the guest's line sequence on one console: one `READY` line, then `STAT 0`,
/// `STAT 1`, ... with none missing, repeated or out of order, each with the length it
/// announces (`len=`); `DISK n` lines, if any, 0, 1, ... likewise, before or after READY
/// (the disk writer starts first). Each of the guest's lines must start a line: its /init
/// ends the firmware's unterminated last line before it prints anything, so a guest line
/// glued to another one is a break too. The error names the first break.
pub fn check_status_lines(lines: &[String]) -> Result<StatusLines, String> {
    let mut out = StatusLines::default();
    let mut ready = false;
    let mut disk: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let at = |what: String| format!("line {i} {line:?}: {what}");
        if line.starts_with("READY ") {
            if ready {
                return Err(at("a second READY (the guest restarted?)".into()));
            }
            ready = true;
        } else if let Some(rest) = line.strip_prefix("STAT ") {
            if !ready {
                return Err(at("STAT before READY".into()));
            }
            let k: Option<u64> = rest.split(' ').next().and_then(|k| k.parse().ok());
            if k != Some(out.stats) {
                return Err(at(format!("STAT {} was due", out.stats)));
            }
            let (body, len) = line
                .rsplit_once(" len=")
                .ok_or_else(|| at("no len=".into()))?;
            if len.parse::<usize>().ok() != Some(body.len()) {
                return Err(at(format!("{} bytes before len=", body.len())));
            }
            out.stats += 1;
        } else if let Some(n) = line.strip_prefix("DISK ") {
            if n.starts_with("FULL") {
                continue;
            }
            let want = disk.map_or(0, |d| d + 1);
            if n.parse::<u64>().ok() != Some(want) {
                return Err(at(format!("DISK {want} was due")));
            }
            disk = Some(want);
        } else if line.starts_with("FAIL") {
            return Err(at("the guest's /init failed".into()));
        } else if !line.starts_with("POWEROFF ") && !line.trim().is_empty() {
            out.other.push(line.clone());
        }
    }
    if !ready {
        return Err("no READY line".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn status_lines_complete_or_the_first_break() {
        let good = lines(
            "[    1.0] a kernel message\n\
             READY ip=x disk=vda hvc=yes\n\
             STAT 0 up=1.0 len=13\n\
             DISK 0\n\
             STAT 1 up=1.10 len=14\n\
             DISK 1\n\
             POWEROFF disk=1",
        );
        let r = check_status_lines(&good).unwrap();
        assert_eq!(r.stats, 2);
        assert_eq!(r.other, ["[    1.0] a kernel message"]);

        let lost = lines("READY x\nSTAT 0 up=1.0 len=13\nSTAT 2 up=1.0 len=13");
        assert!(check_status_lines(&lost)
            .unwrap_err()
            .contains("STAT 1 was due"));
        let torn = lines("READY x\nSTAT 0 up=1. len=13");
        assert!(check_status_lines(&torn).unwrap_err().contains("12 bytes"));
        let disk = lines("READY x\nDISK 0\nDISK 0");
        assert!(check_status_lines(&disk)
            .unwrap_err()
            .contains("DISK 1 was due"));
        // A guest line after the firmware's unterminated one is lost to the check.
        let glued = lines("Booting from ROM..DISK 0\nREADY x\nDISK 1");
        assert!(check_status_lines(&glued)
            .unwrap_err()
            .contains("DISK 0 was due"));
        let early = lines("Booting from ROM..\nDISK 0\nREADY x\nDISK 1\nSTAT 0 len=6");
        assert_eq!(check_status_lines(&early).unwrap().stats, 1);
        assert!(check_status_lines(&lines("STAT 0 len=6")).is_err());
    }
}
