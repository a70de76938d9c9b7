//! Supervisor upgrades under test: other builds of the launcher to hand a VM over to, and
//! what a test watches while it happens.
//!
//! - [`builds`]: build A is this workspace's shim; build B is the same source built again with
//!   another build string (`QEMU_LIVEUPGRADE_BUILD=B`), as a package's next release would be;
//!   the old-schema build also writes and reads state version 0
//!   (`QEMU_LIVEUPGRADE_STATE_VERSION=0`), standing for a release from before the current
//!   schema, which must refuse the state. Both are built once, by `cargo build` into their own
//!   target directory, and kept while they are newer than build A.
//! - [`Lines`]: a console read by a thread, each line stamped with when it arrived.
//! - [`Chatter`]: a QMP client that keeps talking through the handovers (commands written in
//!   two halves, hot-plug and unplug whose DEVICE_DELETED events it counts) and checks that
//!   every reply came, once, in order.
//! - [`supervisor_upgrade`]: `qemu-liveupgrade upgrade --supervisor --json`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::paths::{profile_dir, repo_root};
use crate::shim::output_within;
use crate::{cli_bin, shim_bin};

/// The launcher builds a test hands VMs over between.
#[derive(Debug)]
pub struct Builds {
    /// This workspace's shim: build `dev` (or whatever `QEMU_LIVEUPGRADE_BUILD` said).
    pub a: PathBuf,
    /// The same source, build `B`.
    pub b: PathBuf,
    /// The same source, build `old-schema`, which reads state version 0 only.
    pub old_schema: PathBuf,
}

/// Builds B and the old-schema build (once per test process, and only when older than build
/// A), under `target/handover-builds/`.
pub fn builds() -> &'static Builds {
    static BUILDS: OnceLock<Builds> = OnceLock::new();
    BUILDS.get_or_init(|| {
        let a = shim_bin();
        let root = profile_dir()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| repo_root().join("target"))
            .join("handover-builds");
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        // Test binaries run side by side: one builds, the others wait for it.
        let lock = fs::File::create(root.join(".lock")).expect("the builds' lock file");
        // SAFETY: flock on an open fd; released when the file is closed.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let b = variant(&root, &a, "B", &[("QEMU_LIVEUPGRADE_BUILD", "B")]);
        let old_schema = variant(
            &root,
            &a,
            "old-schema",
            &[
                ("QEMU_LIVEUPGRADE_BUILD", "old-schema"),
                ("QEMU_LIVEUPGRADE_STATE_VERSION", "0"),
            ],
        );
        drop(lock);
        Builds { a, b, old_schema }
    })
}

/// `<root>/<name>/qemu-liveupgrade-shim`, built with `env` unless it is newer than `a`.
fn variant(root: &Path, a: &Path, name: &str, env: &[(&str, &str)]) -> PathBuf {
    let out = root.join(name).join("qemu-liveupgrade-shim");
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(source)) = (modified(&out), modified(a)) {
        if built > source {
            return out;
        }
    }
    let target = root.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = profile_dir().file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new("nice");
    cmd.arg(&cargo)
        .args(["build", "--quiet", "-p", "qemu-liveupgrade-shim"])
        .args(["--bin", "qemu-liveupgrade-shim"])
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", &target);
    if release {
        cmd.arg("--release");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let built: Output = output_within(cmd, Duration::from_secs(1800));
    assert!(
        built.status.success(),
        "building the launcher as {name} ({env:?}) failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let profile = if release { "release" } else { "debug" };
    let artifact = target.join(profile).join("qemu-liveupgrade-shim");
    fs::create_dir_all(root.join(name)).expect("mkdir for a build");
    let tmp = out.with_extension("new");
    fs::copy(&artifact, &tmp)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", artifact.display(), tmp.display()));
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("rename {}: {e}", out.display()));
    out
}

/// Puts `build` at `path` the way a package upgrade replaces a binary: a new file renamed over
/// the old one, which a running launcher keeps executing.
pub fn install(build: &Path, path: &Path) {
    let tmp = path.with_extension("installing");
    fs::copy(build, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", build.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod the new build");
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// `qemu-liveupgrade upgrade --supervisor VM [--to PATH] --json` with control sockets under
/// `rundir` (or the default directories when `None`): the report, and whether the CLI exited 0.
pub fn supervisor_upgrade(rundir: Option<&Path>, vm: &str, to: Option<&Path>) -> (Value, bool) {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["upgrade", "--supervisor", "--json", vm]);
    if let Some(to) = to {
        cmd.arg("--to").arg(to);
    }
    match rundir {
        Some(dir) => cmd.env("QEMU_LIVEUPGRADE_RUNDIR", dir),
        None => cmd.env_remove("QEMU_LIVEUPGRADE_RUNDIR"),
    };
    let out = output_within(cmd, Duration::from_secs(60));
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "upgrade --supervisor printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.success())
}

/// Lines read from a stream by a thread, each with when it arrived.
pub struct Lines {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Lines {
    /// Reads `source` until its end, in the background.
    pub fn read(source: impl Read + Send + 'static) -> Lines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(source).split(b'\n') {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, text));
            }
        });
        Lines { lines }
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `(arrival, counter)` of every heartbeat line so far.
    pub fn beats(&self) -> Vec<(Instant, u64)> {
        self.all()
            .iter()
            .filter_map(|(at, l)| Some((*at, heartbeat_counter(l)?)))
            .collect()
    }

    /// The highest heartbeat counter so far.
    pub fn last(&self) -> u64 {
        self.beats().last().map_or(0, |b| b.1)
    }

    /// Waits until a heartbeat counter at least `n` has arrived.
    pub fn wait_counter(&self, n: u64, what: &str) {
        crate::wait_until(
            Duration::from_secs(60),
            &format!("HB {n} on {what}"),
            || self.last() >= n,
        );
    }
}

/// The counter of an `HB <counter> err=...` line.
pub fn heartbeat_counter(line: &str) -> Option<u64> {
    line.strip_prefix("HB ")?.split(' ').next()?.parse().ok()
}

/// What is wrong with a console's heartbeats: lines lost (a counter skipped), repeated, or
/// dropped by the guest for a console that did not drain (`drop=`). `None` if nothing.
pub fn console_problems(lines: &[(Instant, String)]) -> Option<String> {
    let mut problems = Vec::new();
    let mut prev: Option<u64> = None;
    for (_, line) in lines {
        let Some(n) = heartbeat_counter(line) else {
            continue;
        };
        if line.contains(" drop=") {
            problems.push(format!("the guest dropped lines: {line}"));
        }
        if let Some(p) = prev {
            if n != p + 1 {
                problems.push(format!("HB {n} after HB {p}"));
            }
        }
        prev = Some(n);
    }
    if prev.is_none() {
        problems.push("no heartbeat at all".into());
    }
    problems.truncate(10);
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The longest time without a line within `[from, to]`, the window's ends counted.
pub fn max_gap(arrivals: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut prev = from;
    let mut max = Duration::ZERO;
    for &at in arrivals.iter().filter(|&&at| at >= from && at <= to) {
        max = max.max(at - prev);
        prev = at;
    }
    max.max(to.saturating_duration_since(prev))
}

/// What a [`Chatter`] saw.
#[derive(Debug, Default, Clone)]
pub struct Talk {
    /// Commands sent, in order of their ids.
    pub sent: u64,
    /// Replies received, in the order they came: each command's id.
    pub answered: Vec<String>,
    /// DEVICE_DELETED events by device id.
    pub deleted: BTreeMap<String, u32>,
    /// Every device the client plugged, in order.
    pub plugged: Vec<String>,
    /// Anything unexpected: an error reply, a reply out of order, a broken connection.
    pub problems: Vec<String>,
    /// The longest a command waited for its reply.
    pub slowest: Duration,
}

/// A QMP client that keeps talking while handovers happen: each round plugs a USB keyboard,
/// unplugs it (QEMU then sends DEVICE_DELETED) and asks the run state, the three commands
/// written in two halves split inside a command, so that a handover finds both half-read
/// commands and commands QEMU has not answered yet.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    talk: Arc<Mutex<Talk>>,
    thread: Option<JoinHandle<()>>,
}

impl Chatter {
    /// Connects to the QMP socket at `path` and starts talking.
    pub fn start(path: &Path) -> Chatter {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let talk = Arc::new(Mutex::new(Talk::default()));
        let thread = {
            let stop = Arc::clone(&stop);
            let talk = Arc::clone(&talk);
            thread::spawn(move || chatter(stream, &stop, &talk))
        };
        Chatter {
            stop,
            talk,
            thread: Some(thread),
        }
    }

    /// What it saw so far.
    pub fn talk(&self) -> Talk {
        self.talk.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops after the round under way and returns what it saw.
    pub fn finish(mut self) -> Talk {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.talk()
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn chatter(stream: UnixStream, stop: &AtomicBool, talk: &Mutex<Talk>) {
    let note = |p: String| {
        talk.lock()
            .unwrap_or_else(|e| e.into_inner())
            .problems
            .push(p)
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return note(format!("clone: {e}")),
    };
    let mut reader = BufReader::new(stream);
    let mut read = || -> Option<Value> {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
            Err(_) => None,
        }
    };
    match read() {
        Some(g) if g.get("QMP").is_some() => {}
        other => return note(format!("no greeting: {other:?}")),
    }
    let _ = writer.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":\"caps\"}\n");
    match read() {
        Some(r) if r["id"] == "caps" => {}
        other => return note(format!("capabilities: {other:?}")),
    }
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let dev = format!("k{round}");
        let ids = [
            format!("a{round}"),
            format!("d{round}"),
            format!("s{round}"),
        ];
        let text = format!(
            "{{\"execute\":\"device_add\",\"arguments\":{{\"driver\":\"usb-kbd\",\"id\":\"{dev}\"}},\"id\":\"{}\"}}\n\
             {{\"execute\":\"device_del\",\"arguments\":{{\"id\":\"{dev}\"}},\"id\":\"{}\"}}\n\
             {{\"execute\":\"query-status\",\"id\":\"{}\"}}\n",
            ids[0], ids[1], ids[2]
        );
        // Split inside a command, at a place that moves from round to round.
        let cut = 10 + (round as usize * 7) % (text.len() - 20);
        let sent_at = Instant::now();
        let wrote = writer
            .write_all(text.as_bytes().get(..cut).unwrap_or_default())
            .and_then(|()| {
                thread::sleep(Duration::from_millis(1));
                writer.write_all(text.as_bytes().get(cut..).unwrap_or_default())
            });
        if let Err(e) = wrote {
            return note(format!("round {round}: write: {e}"));
        }
        {
            let mut t = talk.lock().unwrap_or_else(|e| e.into_inner());
            t.sent += 3;
            t.plugged.push(dev.clone());
        }
        let mut expect = ids.iter();
        let mut want = expect.next();
        while let Some(id) = want {
            let Some(msg) = read() else {
                return note(format!("round {round}: connection ended or timed out"));
            };
            if msg.get("event").is_some() {
                count_deleted(talk, &msg);
                continue;
            }
            let got = msg["id"].as_str().unwrap_or("?").to_owned();
            if got != *id {
                note(format!(
                    "round {round}: reply {got} where {id} was due: {msg}"
                ));
            }
            if msg.get("error").is_some() {
                note(format!("round {round}: {got} failed: {msg}"));
            }
            let mut t = talk.lock().unwrap_or_else(|e| e.into_inner());
            t.answered.push(got);
            t.slowest = t.slowest.max(sent_at.elapsed());
            drop(t);
            want = expect.next();
        }
        thread::sleep(Duration::from_millis(3));
    }
    // The last round's event may still be on its way.
    let deadline = Instant::now() + Duration::from_secs(5);
    let missing = |t: &Talk| t.plugged.iter().any(|d| !t.deleted.contains_key(d));
    while Instant::now() < deadline && missing(&talk.lock().unwrap_or_else(|e| e.into_inner())) {
        let Some(msg) = read() else { break };
        count_deleted(talk, &msg);
    }
}

/// Counts a DEVICE_DELETED event for its device; other messages are not counted.
fn count_deleted(talk: &Mutex<Talk>, msg: &Value) {
    if msg["event"] != "DEVICE_DELETED" {
        return;
    }
    let device = msg["data"]["device"].as_str().unwrap_or("?").to_owned();
    let mut t = talk.lock().unwrap_or_else(|e| e.into_inner());
    *t.deleted.entry(device).or_default() += 1;
}

impl Talk {
    /// Every way what the client saw falls short: a reply missing, twice or out of order, a
    /// device whose DEVICE_DELETED never came or came twice.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        if self.answered.len() as u64 != self.sent {
            out.push(format!(
                "{} commands sent, {} replies",
                self.sent,
                self.answered.len()
            ));
        }
        for d in &self.plugged {
            match self.deleted.get(d) {
                Some(1) => {}
                Some(n) => out.push(format!("DEVICE_DELETED for {d} came {n} times")),
                None => out.push(format!("no DEVICE_DELETED for {d}")),
            }
        }
        out.truncate(20);
        out
    }
}

/// `{"execute": ..., "id": ...}` as one line.
pub fn command_line(cmd: &str, id: &str) -> String {
    format!("{}\n", json!({ "execute": cmd, "id": id }))
}
