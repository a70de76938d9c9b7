//! A process under test, usually QEMU (or the shim) running the heartbeat guest.
//!
//! The process gets its own process group so that dropping the handle can kill it
//! together with everything it started (a QEMU the shim spawned, a helper), and
//! its stdout/stderr are read by background threads that stamp every line with
//! the host's `Instant` on arrival. The guest writes its serial console byte by
//! byte and QEMU passes each byte straight to stdout, so the arrival time of a
//! heartbeat is, to within scheduling noise, when the guest sent it: the longest
//! gap between heartbeats is the pause a guest saw.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// One `HB <counter> err=<errors> pass=<passes>` line of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// When the host read the line.
    pub at: Instant,
    /// Guest heartbeat counter: +1 per heartbeat, kept in guest RAM.
    pub counter: u64,
    /// Memory-check mismatches the guest has counted so far.
    pub err: u64,
    /// Completed passes over guest RAM.
    pub pass: u64,
}

/// What the guest reported about its memory check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestErrors {
    /// The highest `err=` of any heartbeat.
    pub max_err: u64,
    /// The guest's `ERR addr=... want=... got=...` lines (it prints the first few).
    pub err_lines: Vec<String>,
}

impl GuestErrors {
    /// True if the guest saw no mismatch.
    pub fn is_clean(&self) -> bool {
        self.max_err == 0 && self.err_lines.is_empty()
    }
}

#[derive(Default)]
struct Output {
    stdout: String,
    stderr: String,
    heartbeats: Vec<Heartbeat>,
    ready_at: Option<Instant>,
    err_lines: Vec<String>,
    stdout_eof: bool,
    stderr_eof: bool,
}

struct Shared {
    out: Mutex<Output>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        // A reader thread that panicked leaves consistent data behind.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A spawned process in its own process group, killed (SIGKILL to the group) and
/// reaped on drop.
pub struct Vm {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    shared: Arc<Shared>,
}

impl Vm {
    /// Spawns `cmd` in a new process group with stdin from /dev/null and
    /// stdout/stderr captured.
    pub fn spawn(mut cmd: Command) -> Vm {
        let name = std::path::Path::new(cmd.get_program())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {:?}: {e}", cmd.get_program()));
        let shared = Arc::new(Shared {
            out: Mutex::new(Output::default()),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let s = Arc::clone(&shared);
        thread::spawn(move || read_lines(stdout, &s, on_stdout_line, |o| o.stdout_eof = true));
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            read_lines(
                stderr,
                &s,
                |o, line, _| o.stderr.push_str(line),
                |o| o.stderr_eof = true,
            )
        });
        Vm {
            name,
            child,
            status: None,
            shared,
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the guest's `READY` line (its RAM is filled) and returns when the
    /// host saw it. Panics on timeout, or at once if the process closed stdout.
    pub fn wait_ready(&self, timeout: Duration) -> Instant {
        self.wait_for(timeout, "the guest's READY line", |o| o.ready_at)
    }

    /// All heartbeats seen so far, oldest first.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.shared.lock().heartbeats.clone()
    }

    /// The latest heartbeat, if any.
    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.shared.lock().heartbeats.last().copied()
    }

    /// Waits until `n` heartbeats have arrived after `after`, and returns them.
    pub fn wait_heartbeats_after(
        &self,
        after: Instant,
        n: usize,
        timeout: Duration,
    ) -> Vec<Heartbeat> {
        let what = format!("{n} heartbeats");
        self.wait_for(timeout, &what, |o| {
            let first = o.heartbeats.partition_point(|h| h.at <= after);
            let newer = &o.heartbeats[first..];
            (newer.len() >= n).then(|| newer[..n].to_vec())
        })
    }

    /// The longest time without a heartbeat within `[from, to]`: the largest
    /// difference between consecutive arrival times of the heartbeats in that
    /// window, with `from` and `to` themselves counted as ends, so a stall at
    /// either edge counts too. `to - from` if none arrived.
    pub fn max_gap_between(&self, from: Instant, to: Instant) -> Duration {
        let o = self.shared.lock();
        let mut prev = from;
        let mut max = Duration::ZERO;
        for h in o.heartbeats.iter().filter(|h| h.at >= from && h.at <= to) {
            max = max.max(h.at - prev);
            prev = h.at;
        }
        max.max(to.saturating_duration_since(prev))
    }

    /// The guest's memory-check results so far.
    pub fn errors(&self) -> GuestErrors {
        let o = self.shared.lock();
        GuestErrors {
            max_err: o.heartbeats.iter().map(|h| h.err).max().unwrap_or(0),
            err_lines: o.err_lines.clone(),
        }
    }

    /// Waits until a stdout line containing `needle` has been seen.
    pub fn wait_stdout_contains(&self, needle: &str, timeout: Duration) {
        let what = format!("{needle:?} on stdout");
        self.wait_for(timeout, &what, |o| o.stdout.contains(needle).then_some(()));
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr_contains(&self, needle: &str, timeout: Duration) {
        let what = format!("{needle:?} on stderr");
        self.wait_for(timeout, &what, |o| o.stderr.contains(needle).then_some(()));
    }

    /// Waits for the process to exit and returns its status; panics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {} (pid {}) to exit",
                    self.name,
                    self.pid()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        self.shared.lock().stdout.clone()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.shared.lock().stderr.clone()
    }

    /// Waits until `f` returns `Some` on the captured output. Panics naming `what`
    /// on timeout, or as soon as stdout is closed while `f` still says no (the
    /// process is gone and nothing more will come).
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Output) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut o = self.shared.lock();
        loop {
            if let Some(v) = f(&o) {
                return v;
            }
            if o.stdout_eof {
                panic!(
                    "{} (pid {}) closed stdout before {what}",
                    self.name,
                    self.pid()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} from {} (pid {})",
                    self.name,
                    self.pid()
                );
            }
            o = self
                .shared
                .changed
                .wait_timeout(o, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn report(&self) -> String {
        let o = self.shared.lock();
        let mut s = String::new();
        let _ = writeln!(s, "---- {} (pid {}) stderr ----", self.name, self.pid());
        s.push_str(&o.stderr);
        let lines: Vec<&str> = o.stdout.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        let _ = writeln!(
            s,
            "---- {} stdout: last {} of {} lines, {} heartbeats, errors {:?} ----",
            self.name,
            tail.len(),
            lines.len(),
            o.heartbeats.len(),
            o.err_lines
        );
        for line in tail {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The whole group: the process and anything it started that did not leave.
        let _ = killpg(self.pid(), Signal::SIGKILL);
        if self.status.is_none() {
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

/// Reads `from` line by line into `shared` until EOF. The reader threads are not
/// joined: a process that escaped the group (a daemonized child) may keep the
/// pipe open, and the test must not hang on it.
fn read_lines(
    from: impl Read,
    shared: &Shared,
    mut on_line: impl FnMut(&mut Output, &str, Instant),
    on_eof: impl FnOnce(&mut Output),
) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let at = Instant::now();
                let line = String::from_utf8_lossy(&buf);
                on_line(&mut shared.lock(), &line, at);
                shared.changed.notify_all();
            }
        }
    }
    on_eof(&mut shared.lock());
    shared.changed.notify_all();
}

fn on_stdout_line(o: &mut Output, line: &str, at: Instant) {
    o.stdout.push_str(line);
    let text = line.trim_end();
    if let Some(hb) = parse_heartbeat(text, at) {
        o.heartbeats.push(hb);
    } else if let Some(i) = text.find("ERR addr=") {
        o.err_lines.push(text[i..].to_string());
    } else if text.contains("READY mem=") && o.ready_at.is_none() {
        o.ready_at = Some(at);
    }
}

/// Parses `HB <counter> err=<n> pass=<n>[ ...]`.
fn parse_heartbeat(line: &str, at: Instant) -> Option<Heartbeat> {
    let mut words = line.strip_prefix("HB ")?.split(' ');
    let counter = words.next()?.parse().ok()?;
    let mut err = None;
    let mut pass = None;
    for word in words {
        if let Some(v) = word.strip_prefix("err=") {
            err = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("pass=") {
            pass = v.parse().ok();
        }
    }
    Some(Heartbeat {
        at,
        counter,
        err: err?,
        pass: pass?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heartbeats() {
        let at = Instant::now();
        let hb = parse_heartbeat("HB 42 err=3 pass=7", at).unwrap();
        assert_eq!((hb.counter, hb.err, hb.pass), (42, 3, 7));
        let hb = parse_heartbeat("HB 1 err=0 pass=0 drop=5", at).unwrap();
        assert_eq!(hb.counter, 1);
        assert!(parse_heartbeat("HB 1 err=0", at).is_none());
        assert!(parse_heartbeat("=0 pass=4", at).is_none());
        assert!(parse_heartbeat("READY mem=1", at).is_none());
    }

    #[test]
    fn captures_output_and_kills_group_on_drop() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'HB 1 err=0 pass=0'; echo oops >&2; sleep 1000 & echo \"READY mem=$!\"; wait",
        ]);
        let vm = Vm::spawn(cmd);
        vm.wait_ready(Duration::from_secs(5));
        vm.wait_stderr_contains("oops", Duration::from_secs(5));
        assert_eq!(vm.heartbeats().len(), 1);
        let text = vm.stdout_text();
        let sleep_pid: i32 = text
            .split("READY mem=")
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(vm);
        // SIGKILL went to the whole group: the background sleep is dead too (gone,
        // or a zombie if nothing reaps orphans here).
        crate::wait_until(
            Duration::from_secs(5),
            "the background sleep to die",
            || match std::fs::read_to_string(format!("/proc/{sleep_pid}/stat")) {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit(") ")
                    .next()
                    .is_some_and(|rest| rest.starts_with('Z')),
            },
        );
    }
}
