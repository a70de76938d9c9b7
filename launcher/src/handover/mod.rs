//! The supervisor upgrades itself: a running launcher hands the VM to a new qemu-liveupgrade
//! binary by `execve` in place, so that a fix to the launcher reaches running VMs without
//! restarting a guest. The pid stays the VM's, QEMU stays its child, and every connection,
//! console and listener the launcher serves stays open: the guest never pauses.
//!
//! Read [`Supervisor::hand_over`] top to bottom; the steps, in order:
//! 1. the new binary: the one named, or the file now at the path the launcher started from
//!    (a package upgrade replaced it there);
//! 2. the whole state written ([`state`]): nothing changes yet, and a launcher that is not at
//!    rest (an upgrade or check under way, an old QEMU not reaped) says why not;
//! 3. the new binary run in its check mode on that state ([`check`]): it must read it and say
//!    so, with its version and build. One that cannot (an older release, a schema it does not
//!    know, a command line it would plan differently) stops the handover here, and the VM
//!    stays on this launcher, which says why;
//! 4. the launcher's signals blocked (pending ones cross the exec and reach the new image's
//!    handlers), and those already caught acted on;
//! 5. the state written again, as it is at this instant, into a sealed memfd; close-on-exec
//!    cleared on exactly the fds it names; `execve` from the loop's top, on the one thread
//!    that forked QEMU: `PR_SET_PDEATHSIG` fires when the thread that forked the child exits,
//!    and an exec ends no thread but the others (there are none: the launcher has one);
//! 6. if the exec fails, everything is put back and the launcher carries on, unchanged.
//!
//! The new image ([`resume`]) reads the state, checks it again, takes every fd, registers
//! each in a new loop and moves what the old image had read and not yet passed on; then it
//! reports, on stderr (the VM's log) and to the clients that asked, and serves on. If it
//! cannot read the state after all, it executes the old binary again (kept open across the
//! exec) on the same state.
//!
//! Nothing is lost: bytes still in socket and pipe buffers stay in the kernel with the fds;
//! bytes the old image had read into its own buffers (a client's half-sent command, QEMU's
//! reply the client has not read yet, console output) are in the state; commands QEMU has not
//! answered yet are in the state with their ids, so their replies are matched as before; and
//! events arriving meanwhile wait in the sockets.

pub mod check;
mod exec;
pub mod fds;
pub mod state;

use std::ffi::OsString;
use std::io::{self, Read, Seek};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::child::Exit;
use crate::control::Client;
use crate::generation::Base;
use crate::installed::FileId;
use crate::json::JsonExt;
use crate::supervisor::Supervisor;

/// Names the sealed memfd holding the state, in the new image's environment.
pub const ENV_STATE: &str = "QEMU_LIVEUPGRADE_HANDOVER";
/// Set, with [`CHECK_ARG`] as the only argument, to run a binary in its check mode.
pub const ENV_CHECK: &str = "QEMU_LIVEUPGRADE_HANDOVER_CHECK";
/// The check mode's one argument. A binary from before supervisor upgrades passes it to QEMU,
/// which refuses it as an invalid option: the check fails, and nothing else happens.
pub const CHECK_ARG: &str = "-qemu-liveupgrade-handover-check";
/// Set by a new image that could not read the state, when it goes back to the old binary:
/// why, for the old image's report.
pub const ENV_FALLBACK: &str = "QEMU_LIVEUPGRADE_HANDOVER_FALLBACK";
/// For the tests only: `unreadable` makes every new image fail to read the state it was
/// handed after the check said it would, which no real build does, so that the way back to
/// the old binary can be seen to work. Nothing happens without it.
pub const ENV_TEST: &str = "QEMU_LIVEUPGRADE_TEST_HANDOVER";

/// Why a handed-over state could not be taken up.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An fd the state names could not be taken.
    #[error(transparent)]
    Fd(#[from] fds::FdError),
    /// A system call on a handed-over resource failed.
    #[error("cannot take up {what}")]
    Io {
        /// What was being taken up.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state says something this build cannot take.
    #[error("{0}")]
    Invalid(String),
}

impl ImportError {
    /// An [`ImportError::Io`] maker for `what`.
    pub(crate) fn io(what: &'static str) -> impl Fn(io::Error) -> ImportError {
        move |source| ImportError::Io { what, source }
    }
}

/// What the supervisor keeps about supervisor upgrades.
#[derive(Debug, Default)]
pub struct Handovers {
    /// Clients asking for a handover, with the binary they named.
    pub(crate) requests: Vec<(Client, Option<PathBuf>)>,
    /// Clients of the handover that brought this image, waiting for its report.
    pub(crate) answer: Vec<Client>,
    /// The latest upgrade reports of this VM, QEMU's and the supervisor's, oldest first.
    pub(crate) history: Vec<Value>,
    /// Supervisor upgrades done over the VM's life.
    pub(crate) done: u64,
    /// The executable the VM's first launcher started from, where a package puts the new
    /// build: a handover without a binary named goes to the file there now.
    pub(crate) exe: Option<PathBuf>,
}

impl Handovers {
    /// For a launcher starting a VM: remembers the executable it runs from.
    pub fn new() -> Handovers {
        Handovers {
            exe: running_exe(),
            ..Handovers::default()
        }
    }

    /// For a launcher that took a VM over, with the history it brought.
    pub(crate) fn resumed(history: Vec<Value>, done: u64) -> Handovers {
        Handovers {
            history,
            done,
            ..Handovers::default()
        }
    }

    /// Whether this process runs the very file now at the path the VM's first launcher
    /// started from, told by identity as for QEMU ([`crate::installed`]): a package upgrade
    /// renames its new build over that path, and the running image is then another inode
    /// (`/proc/self/exe` still reaches it, as `PATH (deleted)`). False when nothing is there
    /// any more; `None` when either side cannot be looked at.
    pub fn runs_installed(&self) -> Option<bool> {
        let running = FileId::of(Path::new("/proc/self/exe"))?;
        Some(FileId::of(self.exe.as_deref()?) == Some(running))
    }

    /// A report to keep; the oldest goes once [`HISTORY`] are kept, so that the state a
    /// handover writes stays small however long the VM runs.
    pub(crate) fn record(&mut self, report: &Value) {
        if report.at("/qemu-liveupgrade") == SUPERVISOR_REPORT && report.at("/result") == "ok" {
            self.done += 1;
        }
        self.history.push(report.clone());
        let excess = self.history.len().saturating_sub(HISTORY);
        self.history.drain(..excess);
    }

    /// The supervisor's part of `status`: which launcher runs the VM, whether that is the
    /// file now installed where it started from, how many times it was upgraded, and the last
    /// attempt, failed or not.
    pub fn status(&self) -> Value {
        let attempts: Vec<&Value> = self
            .history
            .iter()
            .filter(|r| r.at("/qemu-liveupgrade") == SUPERVISOR_REPORT)
            .collect();
        let mut s = crate::identity::describe();
        s.put(
            "started_from",
            json!(self.exe.as_ref().map(|p| p.to_string_lossy())),
        );
        s.put("runs_installed", json!(self.runs_installed()));
        s.put("upgrades", json!(self.done));
        s.put("last_upgrade", json!(attempts.last()));
        s
    }
}

/// How many upgrade reports the history keeps.
pub const HISTORY: usize = 32;

/// The `qemu-liveupgrade` field of a supervisor upgrade's report.
pub const SUPERVISOR_REPORT: &str = "supervisor-upgrade";

/// What the process was started for: a VM, the check mode, or taking a VM over.
#[derive(Debug)]
pub enum Incoming {
    /// Neither: start a VM (or pass a query to QEMU) as usual.
    None,
    /// Run the check mode on the state on stdin.
    Check,
    /// Take over the VM whose state is in this fd.
    Resume(RawFd),
}

/// Reads what this process was started for from its environment and argv. Call first thing
/// in `main`, before anything reads the signal state: a resumed image starts with the old
/// image's signals blocked.
pub fn incoming() -> Incoming {
    if std::env::var_os(ENV_CHECK).is_some() {
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if args == [OsString::from(CHECK_ARG)] {
            return Incoming::Check;
        }
    }
    match std::env::var(ENV_STATE).ok().and_then(|v| v.parse().ok()) {
        Some(fd) => Incoming::Resume(fd),
        None => Incoming::None,
    }
}

/// The check mode: reads a state on stdin and prints one JSON line saying whether this build
/// takes it, with its version and build. Returns whether it does.
pub fn check_mode() -> bool {
    // A preflight, not the VM's work: on a busy host the guests come first.
    // SAFETY: setpriority with integer arguments changes only this process's niceness.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    let mut input = Vec::new();
    let answer = match io::stdin().lock().read_to_end(&mut input) {
        Ok(_) => check::answer(&input),
        Err(e) => check::refusal(&format!("cannot read the state: {e}")),
    };
    println!("{answer}");
    answer.at("/ok") == true
}

/// Takes over the VM whose state the old image left in `fd`, reports, and supervises it until
/// QEMU exits. `Err` is fatal: it is printed, the process exits and QEMU dies with it.
pub fn resume(fd: RawFd) -> Result<Exit, String> {
    let fallback = std::env::var(ENV_FALLBACK).ok();
    // QEMU inherits this process's environment: the variables go before any QEMU is started.
    std::env::remove_var(ENV_STATE);
    std::env::remove_var(ENV_FALLBACK);
    let bytes = read_state(fd).map_err(|e| format!("cannot read the handed-over state: {e}"))?;
    let read = match std::env::var(ENV_TEST).ok().filter(|_| fallback.is_none()) {
        Some(test) if test == "unreadable" => Err(format!("{ENV_TEST}={test}")),
        _ => check::read(&bytes),
    };
    let (state, base) = match read {
        Ok(read) => read,
        // The check said it would read this; if it cannot after all, the old binary can (once:
        // the old binary going back would only come here again).
        Err(why) if fallback.is_none() => return Err(exec::go_back(&bytes, &why)),
        Err(why) => return Err(format!("cannot read the state it wrote itself: {why}")),
    };
    let info = Arrival::of(&state, bytes.len());
    let mask = crate::child::set_of(&state.vm.supervisor_mask);
    let mut sup = Supervisor::resume(state, base).map_err(|e| crate::error_chain(&e))?;
    // The handlers are in place: signals that came during the exec are delivered now.
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&mask),
        None,
    );
    let report = info.report(&sup, fallback);
    sup.report_handover(report);
    sup.supervise().map_err(|e| crate::error_chain(&e))
}

/// The state's bytes, from the sealed memfd the old image left at `fd`, which is closed.
fn read_state(fd: RawFd) -> io::Result<Vec<u8>> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)?;
    // SAFETY: the fd is open (F_GETFD succeeded) and was named by the old image for this
    // image alone; nothing else in this process knows its number.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What the new image knows of the handover that brought it, for its report.
struct Arrival {
    from: state::Supervisor,
    handover: Option<state::Handover>,
    written_unix_us: u64,
    bytes: usize,
    version: u32,
}

impl Arrival {
    fn of(s: &state::State, bytes: usize) -> Arrival {
        Arrival {
            from: s.from.clone(),
            handover: s.handover.clone(),
            written_unix_us: s.written_unix_us,
            bytes,
            version: s.version,
        }
    }

    fn report(&self, sup: &Supervisor, fallback: Option<String>) -> Value {
        let now = unix_us();
        let ms = |us: u64| (now.saturating_sub(us) as f64 / 100.0).round() / 10.0;
        let mut r = json!({
            "qemu-liveupgrade": SUPERVISOR_REPORT,
            "result": "ok",
            "from": self.from,
            "to": crate::identity::describe(),
            "pid": std::process::id(),
            "qemu_pid": sup.current.pid.as_raw(),
            "generation": sup.current.number,
            "state_version": self.version,
            "state_bytes": self.bytes,
            "handover_ms": ms(self.written_unix_us),
        });
        if let Some(h) = &self.handover {
            r.put("check_ms", json!(h.check_ms));
            r.put("total_ms", json!(ms(h.requested_unix_us)));
            r.put("coalesced_requests", json!(h.coalesced));
        }
        if let Some(why) = fallback {
            // This is the old binary again, gone back to.
            r.put("result", "failed");
            let why = format!("the new supervisor could not read the state: {why}");
            r.put("reason", why);
            let to = self.handover.as_ref().map(|h| h.to.to_path());
            r.put(
                "to",
                json!({ "exe": to.map(|p| p.to_string_lossy().into_owned()) }),
            );
        }
        r
    }
}

impl Supervisor {
    /// The handover, run from the loop's top when a client asked for one: it returns only if
    /// the launcher carries on (the VM stays here, and the clients are told why). Requests
    /// for the same binary are answered together; one naming another binary waits its turn.
    pub(crate) fn hand_over(&mut self) {
        let requested = Instant::now();
        let requested_us = unix_us();
        let mut pending = std::mem::take(&mut self.handovers.requests);
        let to = pending.first().and_then(|(_, to)| to.clone());
        let later = pending.split_off(pending.iter().take_while(|(_, t)| *t == to).count());
        self.handovers.requests = later;
        let mut clients: Vec<Client> = pending.into_iter().map(|(c, _)| c).collect();
        let failure = self.try_hand_over(to.clone(), &mut clients, requested_us);
        let mut report = json!({
            "qemu-liveupgrade": SUPERVISOR_REPORT,
            "result": "failed",
            "from": crate::identity::describe(),
            "to": failure.checked.unwrap_or_else(|| json!({ "exe": failure.target })),
            "reason": failure.reason,
            "pid": std::process::id(),
            "total_ms": millis_f(requested.elapsed()),
        });
        if clients.len() > 1 {
            report.put("coalesced_requests", json!(clients.len() - 1));
        }
        self.handovers.answer = clients;
        self.report_handover(report);
    }

    /// Steps 1 to 6; returns why the launcher carries on.
    fn try_hand_over(
        &mut self,
        to: Option<PathBuf>,
        clients: &mut [Client],
        requested_us: u64,
    ) -> Failure {
        // 1. The binary: the one named, or what the package put where this launcher started.
        let Some(target) = to.or_else(|| self.handovers.exe.clone()) else {
            return Failure::new(None, "no binary to hand over to: name one (--to)");
        };
        let shown = target.to_string_lossy().into_owned();
        let fail = |why: String| Failure::new(Some(shown.clone()), why);

        tell(clients, "writing the state");
        // 2. The state, to check the new binary against; nothing changes yet.
        let mask = exec::current_mask();
        let extra = crate::supervisor::handover::Extra {
            mask: &mask,
            clients,
            fallback: None,
            handover: None,
        };
        let state = match self.export_state(&extra) {
            Ok(s) => s,
            Err(why) => return fail(format!("not now: {why}")),
        };

        tell(clients, "asking the new supervisor to read the state");
        // 3. The new binary must read it, and say which release and build it is.
        let started = Instant::now();
        let checked = match self.check_new(&target, &state) {
            Ok(answer) => answer,
            Err(why) => return fail(why),
        };
        let check_ms = millis_f(started.elapsed());
        let new = checked.at("/supervisor");
        let (version, build) = (new.at("/version"), new.at("/build"));
        tell(
            clients,
            &format!(
                "handing over to qemu-liveupgrade {} (build {})",
                version.as_str().unwrap_or("?"),
                build.as_str().unwrap_or("?")
            ),
        );
        let about = json!({ "exe": shown, "version": version, "build": build });

        // 4 to 6. Signals blocked, the state written as it is now, and the exec.
        let handover = state::Handover {
            requested_unix_us: requested_us,
            check_ms,
            to: state::Text::path(&target),
            coalesced: clients.len().saturating_sub(1),
        };
        let why = exec::exec(self, &target, clients, handover);
        Failure {
            target: Some(shown),
            checked: Some(about),
            reason: why,
        }
    }

    /// Prints a supervisor upgrade's report on stderr (the VM's log), sends it to the
    /// clients waiting for it and keeps it in the history.
    pub(crate) fn report_handover(&mut self, report: Value) {
        crate::stderr_line(&report.to_string());
        for mut c in std::mem::take(&mut self.handovers.answer) {
            let _ = c.send(&report);
        }
        self.handovers.record(&report);
    }
}

/// Why a handover did not happen.
struct Failure {
    target: Option<String>,
    checked: Option<Value>,
    reason: String,
}

impl Failure {
    fn new(target: Option<String>, reason: impl Into<String>) -> Failure {
        Failure {
            target,
            checked: None,
            reason: reason.into(),
        }
    }
}

/// Tells the clients waiting on the handover which step it has reached.
fn tell(clients: &mut [Client], step: &str) {
    let line = crate::control::progress(step);
    for c in clients {
        let _ = c.send(&line);
    }
}

/// The executable this process runs from, as `/proc` names it (without the `(deleted)` a
/// replaced file gets).
fn running_exe() -> Option<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let text = exe.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// This launcher's identity, for the state.
pub(crate) fn this_supervisor() -> state::Supervisor {
    state::Supervisor {
        version: crate::identity::VERSION.into(),
        build: crate::identity::BUILD.into(),
        exe: running_exe().map(|p| state::Text::path(&p)),
    }
}

/// The resources a base plans, by identity, for [`state::Plan`].
pub(crate) fn plan(base: &Base) -> state::Plan {
    state::Plan {
        ram: base
            .regions
            .iter()
            .map(|r| (r.id.clone(), r.size))
            .collect(),
        proxied: base
            .proxied
            .iter()
            .map(|p| format!("{} {:?}", p.listen, p.mode))
            .collect(),
        taps: base
            .taps
            .iter()
            .map(|t| (t.ifname.clone(), t.queues))
            .collect(),
        ptys: base.ptys.iter().map(|p| p.label.clone()).collect(),
        displays: base
            .displays
            .iter()
            .map(|d| d.protocol.name().to_owned())
            .collect(),
    }
}

/// Microseconds since the Unix epoch, for times that cross the exec.
pub(crate) fn unix_us() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(u64::MAX)
}

/// Whole milliseconds of `d`, for the state.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds of `d` to a tenth, for reports.
fn millis_f(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// The instant `ms` milliseconds ago (or the earliest this clock has).
pub(crate) fn since(ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_the_latest_reports_and_counts_every_upgrade() {
        let mut h = Handovers::default();
        for i in 0..HISTORY + 8 {
            let kind = if i % 2 == 0 {
                SUPERVISOR_REPORT
            } else {
                "upgrade"
            };
            h.record(&json!({"qemu-liveupgrade": kind, "result": "ok", "n": i}));
        }
        h.record(&json!({"qemu-liveupgrade": SUPERVISOR_REPORT, "result": "failed"}));
        assert_eq!(h.history.len(), HISTORY);
        assert_eq!(
            h.history.first().map(|r| r.at("/n").clone()),
            Some(json!(9))
        );
        assert_eq!(
            h.done, 20,
            "every supervisor upgrade that went through, kept or not"
        );
        let status = h.status();
        assert_eq!(status.at("/upgrades"), 20);
        assert_eq!(status.at("/last_upgrade/result"), "failed");
    }

    #[test]
    fn runs_installed_tells_the_running_file_from_one_put_at_its_path_since() {
        let with = |exe: Option<PathBuf>| Handovers {
            exe,
            ..Handovers::default()
        };
        let me = running_exe().unwrap();
        assert_eq!(with(Some(me.clone())).runs_installed(), Some(true));
        assert_eq!(with(None).runs_installed(), None);
        let dir = std::env::temp_dir().join(format!("qlu-handover-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The same bytes in another file, as a package reinstalling the same build leaves.
        let copy = dir.join("qemu-liveupgrade-shim");
        std::fs::copy(&me, &copy).unwrap();
        assert_eq!(with(Some(copy.clone())).runs_installed(), Some(false));
        std::fs::remove_file(&copy).unwrap();
        assert_eq!(with(Some(copy)).runs_installed(), Some(false), "removed");
        let status = with(Some(me)).status();
        assert_eq!(status.at("/runs_installed"), true);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
