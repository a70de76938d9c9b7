//! The placer: a small service, run as root (`qemu-liveupgrade placer`), that moves a VM's
//! new vCPU threads and iothreads into the cgroups its old ones were in, for launchers that
//! may not write root's cgroup files themselves (libvirt's packaged configuration runs QEMU,
//! and so the launcher, as `libvirt-qemu`, while libvirt made the `vcpuN` cgroups as root).
//!
//! It listens on `/run/qemu-liveupgrade/placer.sock` (mode 0666: any launcher may ask) and
//! trusts a caller for nothing but the pairing of thread names and ids. An upgrade asks twice,
//! one JSON line each time, on a connection of its own:
//!
//! 1. `{"execute":"snapshot","threads":[["vcpu0",TID],...]}` before the swap, while the old
//!    QEMU runs: the placer reads those threads' cgroups and affinity itself and keeps them
//!    for the caller, identified by `SO_PEERCRED` (its pid and that process's start time, so a
//!    reused pid finds nothing);
//! 2. `{"execute":"apply","threads":[["vcpu0",TID],...]}` once the new QEMU runs the guest:
//!    the placer moves each new thread into the cgroups it recorded for the old thread of
//!    that name, then sets its affinity, and answers what it could not do.
//!
//! A launcher that finds its uid's run directory taken by someone else (see [`crate::rundir`])
//! asks `{"execute":"rundir"}`: the placer, as root, puts the impostor aside and makes the
//! directory for the caller's uid (`SO_PEERCRED`), and answers `{"moved": NAME|null}`.
//!
//! Every thread id must belong to a child process of the caller (`/proc/TID/status` `Tgid`,
//! then that process's parent in `/proc/PID/stat`): a launcher's children are its QEMUs, so a
//! caller can only move its own VM's threads, and only into cgroups its own VM's threads were
//! in. A thread that exits between that check and the move could in principle leave its id to
//! another thread; ids are not reused that fast in practice (pid_max wraps first).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::json::JsonExt;
use crate::rundir::{self, RunDirError};
use crate::threads::Placement;

mod ask;
pub use ask::Asking;

/// The placer's socket, in [`rundir::BASE`].
pub const SOCKET: &str = "placer.sock";
/// How long either side waits for the other's line; a launcher's request takes this long at
/// most in all.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Most threads one request may name; more than any VM has.
const MAX_THREADS: usize = 4096;
/// Longest request or answer line.
const MAX_LINE: u64 = 1 << 20;
/// Connections served at once; each takes at most [`TIMEOUT`] per line.
const MAX_CLIENTS: usize = 64;

/// Why the placer could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlacerError {
    /// Only root may write cgroup files and make the run directory.
    #[error("the placer must run as root")]
    NotRoot,
    /// No run directory.
    #[error("no run directory")]
    Dir(#[source] RunDirError),
    /// bind(2) or chmod(2) failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How one request to the placer is made: by the supervisor's loop while it serves the VM
/// ([`crate::supervisor::Supervisor::ask_placer`]), or by [`ask`].
pub type Ask<'a> = dyn FnMut(&Value) -> Result<Value, String> + 'a;

/// Has the placer record the placement of `threads` (the old generation's) for this process.
pub fn snapshot(threads: &[(String, i32)], ask: &mut Ask<'_>) -> Result<(), String> {
    let reply = ask(&json!({"execute": "snapshot", "threads": threads}))?;
    match reply.at("/problems").as_array() {
        Some(p) if !p.is_empty() => Err(format!("the placer refused: {}", Value::from(p.clone()))),
        _ => Ok(()),
    }
}

/// Has the placer give `threads` (the new generation's) the placement it recorded; returns
/// what it could not do, one line each.
pub fn apply(threads: &[(String, i32)], ask: &mut Ask<'_>) -> Result<Vec<String>, String> {
    let reply = ask(&json!({"execute": "apply", "threads": threads}))?;
    Ok(reply
        .at("/problems")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect())
}

/// Has the placer make this process's uid's run directory, putting aside whatever took its
/// name; returns the name that was put aside, if anything was. Asked while the launcher
/// starts, before its loop serves anything.
pub fn claim_rundir() -> Result<Option<String>, String> {
    let reply = ask(&json!({"execute": "rundir"}))?;
    Ok(reply.at("/moved").as_str().map(str::to_owned))
}

/// One request to the placer, answered within [`TIMEOUT`] in all by a process that runs as
/// root; the caller waits for it.
pub fn ask(req: &Value) -> Result<Value, String> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    Asking::start(req)?.wait(deadline)
}

/// A caller: its pid and that process's start time (clock ticks since boot, `/proc/PID/stat`
/// field 22), which tells a reused pid apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Caller {
    pid: u32,
    start: u64,
}

/// The placer's state: the placement recorded for each caller between its two requests.
#[derive(Debug, Default)]
pub struct Placer {
    records: Mutex<HashMap<Caller, Vec<Placement>>>,
}

impl Placer {
    /// Answers one request from the process `peer` (its pid by `SO_PEERCRED`).
    pub fn handle(&self, peer: u32, req: &Value) -> Value {
        let Some(start) = stat(peer).map(|s| s.start) else {
            return json!({"error": format!("pid {peer} is gone")});
        };
        let caller = Caller { pid: peer, start };
        let threads = match parse_threads(req) {
            Ok(t) => t,
            Err(e) => return json!({ "error": e }),
        };
        let Ok(mut records) = self.records.lock() else {
            return json!({"error": "internal: lock poisoned"});
        };
        // Records of callers that died without asking to apply.
        records.retain(|c, _| stat(c.pid).is_some_and(|s| s.start == c.start));
        match req.at("/execute").as_str() {
            Some("snapshot") => {
                let mut problems = Vec::new();
                let mut placements = Vec::new();
                for (name, tid) in threads {
                    match child_thread(peer, tid) {
                        Ok(()) => placements.push(Placement::read(&name, tid)),
                        Err(e) => problems.push(format!("{name}: {e}")),
                    }
                }
                let recorded = placements.len();
                if recorded > 0 {
                    records.insert(caller, placements);
                }
                json!({ "recorded": recorded, "problems": problems })
            }
            Some("apply") => {
                let Some(placements) = records.remove(&caller) else {
                    return json!({"error": format!("nothing recorded for pid {peer}: ask for a snapshot before the swap")});
                };
                drop(records);
                let mut problems = Vec::new();
                let mut placed = 0;
                for (name, tid) in threads {
                    let done = match (
                        child_thread(peer, tid),
                        placements.iter().find(|p| p.name == name),
                    ) {
                        (Err(e), _) => vec![format!("{name}: {e}")],
                        (Ok(()), None) => vec![format!("{name}: no such thread recorded")],
                        (Ok(()), Some(p)) => p.apply(tid),
                    };
                    placed += usize::from(done.is_empty());
                    problems.extend(done);
                }
                json!({ "placed": placed, "problems": problems })
            }
            _ => json!({"error": "unknown request"}),
        }
    }
}

/// Binds the placer's socket (root only): [`rundir::BASE`] made if missing, a stale socket
/// replaced, mode 0666 so that every uid's launchers may ask.
pub fn bind() -> Result<UnixListener, PlacerError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PlacerError::NotRoot);
    }
    let base = rundir::base(true).map_err(PlacerError::Dir)?;
    let fail = |source| PlacerError::Bind {
        path: base.shown(SOCKET),
        source,
    };
    base.unlink(SOCKET).map_err(fail)?;
    let listener = UnixListener::bind(base.reach(SOCKET)).map_err(fail)?;
    std::fs::set_permissions(base.reach(SOCKET), std::fs::Permissions::from_mode(0o666))
        .map_err(fail)?;
    Ok(listener)
}

/// Serves `listener` forever, a thread per connection (one slow client holds up no other), at
/// most [`MAX_CLIENTS`] at once: the socket is open to every local user, and a connection
/// beyond that is closed unanswered rather than given a thread. Returns only if accept(2)
/// fails for good.
pub fn serve(listener: UnixListener, placer: Arc<Placer>) -> io::Error {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return e,
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let placer = Arc::clone(&placer);
        let busy = Arc::clone(&busy);
        std::thread::spawn(move || {
            if let Err(e) = serve_one(&stream, &placer) {
                eprintln!("qemu-liveupgrade placer: {e}");
            }
            busy.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn serve_one(stream: &UnixStream, placer: &Placer) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let (uid, peer) = rundir::peer(stream)?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Value>(&line) {
        Ok(req) if req.at("/execute").as_str() == Some("rundir") => {
            let reply = claim_for(uid);
            if reply.at("/moved").is_string() || reply.get("error").is_some() {
                eprintln!("qemu-liveupgrade placer: pid {peer} (uid {uid}) rundir: {reply}");
            }
            reply
        }
        Ok(req) => {
            let reply = placer.handle(peer, &req);
            if reply
                .at("/problems")
                .as_array()
                .is_some_and(|p| !p.is_empty())
                || reply.get("error").is_some()
            {
                eprintln!(
                    "qemu-liveupgrade placer: pid {peer} {}: {reply}",
                    req.at("/execute").as_str().unwrap_or("?")
                );
            }
            reply
        }
        Err(e) => json!({"error": format!("not JSON: {e}")}),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    let mut w = stream;
    w.write_all(&out)
}

/// The `rundir` request of a process running as `uid`.
fn claim_for(uid: nix::unistd::Uid) -> Value {
    match rundir::base(true).and_then(|base| rundir::reclaim(&base, uid)) {
        Ok(moved) => json!({ "moved": moved }),
        Err(e) => json!({ "error": crate::error_chain(&e) }),
    }
}

fn parse_threads(req: &Value) -> Result<Vec<(String, Pid)>, String> {
    let list = req.at("/threads").as_array().ok_or("no threads")?;
    if list.len() > MAX_THREADS {
        return Err(format!("more than {MAX_THREADS} threads"));
    }
    list.iter()
        .map(|t| {
            let name = t[0].as_str().ok_or("a thread without a name")?;
            let tid = t[1]
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or("a thread without an id")?;
            Ok((name.to_owned(), Pid::from_raw(tid)))
        })
        .collect()
}

/// What the placer reads of a process in `/proc/PID/stat` (proc(5)).
struct Stat {
    ppid: u32,
    start: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything, hence the last ')'. After
    // it: state (field 3), ppid (4), ..., starttime (22).
    let rest: Vec<&str> = text.rsplit_once(") ")?.1.split(' ').collect();
    Some(Stat {
        ppid: rest.get(1)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

/// `tid` is a thread of a child process of `parent`.
fn child_thread(parent: u32, tid: Pid) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .map_err(|e| format!("thread {tid}: {e}"))?;
    let tgid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("thread {tid}: no Tgid"))?;
    match stat(tgid) {
        Some(s) if s.ppid == parent && tgid != parent => Ok(()),
        _ => Err(format!("thread {tid} is not in a child of pid {parent}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn accepts_only_threads_of_the_callers_children() {
        let me = std::process::id();
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let kid = Pid::from_raw(child.id() as i32);
        assert_eq!(child_thread(me, kid), Ok(()));
        let own = nix::unistd::gettid();
        assert!(child_thread(me, own).is_err(), "the caller's own thread");
        assert!(child_thread(1, kid).is_err(), "someone else's child");

        let placer = Placer::default();
        let req =
            |what: &str, tid: Pid| json!({"execute": what, "threads": [["vcpu0", tid.as_raw()]]});
        let refused = placer.handle(me, &req("snapshot", own));
        assert_eq!(refused["recorded"], 0, "{refused}");
        let early = placer.handle(me, &req("apply", kid));
        assert!(
            early["error"]
                .as_str()
                .unwrap()
                .contains("nothing recorded"),
            "{early}"
        );
        let taken = placer.handle(me, &req("snapshot", kid));
        assert_eq!(taken["recorded"], 1, "{taken}");
        let other = placer.handle(1, &req("apply", kid));
        assert!(
            other.get("error").is_some(),
            "pid 1 applied pid {me}'s record: {other}"
        );
        let applied = placer.handle(me, &req("apply", kid));
        assert_eq!(applied["placed"], 1, "{applied}");
        let again = placer.handle(me, &req("apply", kid));
        assert!(
            again.get("error").is_some(),
            "a record is used once: {again}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn answers_one_line_per_connection() {
        let path = std::env::temp_dir().join(format!("qlu-placer-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve(listener, Arc::default()));
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"execute\":\"apply\",\"threads\":[]}\n")
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        let reply: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("nothing recorded"),
            "{reply}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reads_ppid_and_start_time() {
        let me = stat(std::process::id()).unwrap();
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(me.start > 0);
    }
}
