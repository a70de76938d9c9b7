//! `qemu-liveupgrade upgrade --all`: every VM (or every outdated one) moved onto the installed
//! QEMU, at most N at a time, with a line per VM as it ends and a summary at the end.
//!
//! Each VM's launcher does its own upgrade; the rollout only asks for it over the VM's control
//! socket and waits for the report. A worker sends its next request only once the previous
//! report arrived, and the launcher sends the report once the swap is over (the new QEMU runs
//! the guest, or the old one does again), so no more than `max_parallel` swaps ever overlap.
//! A VM whose upgrade fails stays on its QEMU, as every failed upgrade does, and is listed.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use launcher::json::JsonExt;
use launcher::{control, discover};
use serde_json::{json, Value};

/// How the rollout reaches a VM's launcher: its control socket, found by a scan
/// ([`discover::Vm`], which checks who answers).
pub trait Reach: Send + Sync {
    /// A connection to the launcher.
    fn connect(&self) -> io::Result<UnixStream>;
    /// The socket, for messages.
    fn shown(&self) -> PathBuf;
}

impl Reach for discover::Vm {
    fn connect(&self) -> io::Result<UnixStream> {
        discover::Vm::connect(self)
    }

    fn shown(&self) -> PathBuf {
        discover::Vm::shown(self)
    }
}

/// A VM the rollout may upgrade: how to reach its launcher, and its status when the rollout
/// began.
pub struct Vm {
    /// Its control socket.
    pub reach: Box<dyn Reach>,
    /// Its `status` answer.
    pub status: Value,
}

impl Vm {
    /// How the VM is called in the output: its name, else its pid.
    pub fn label(&self) -> String {
        label(&self.status)
    }
}

/// A VM's name (`-name guest=`), else its pid.
pub fn label(status: &Value) -> String {
    match status.at("/name").as_str() {
        Some(name) => name.to_owned(),
        None => format!("pid {}", status.at("/pid")),
    }
}

/// How one VM's upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It runs on the new QEMU.
    Ok,
    /// It still runs on its old QEMU; the reason says why.
    Failed,
    /// It ended (or its launcher did) before it could be asked.
    Gone,
}

impl Verdict {
    /// The word used in the table and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Failed => "failed",
            Verdict::Gone => "gone",
        }
    }
}

/// One VM's line of the summary.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Name or pid.
    pub vm: String,
    /// The launcher's pid.
    pub pid: Value,
    /// QEMU version before.
    pub from: Option<String>,
    /// QEMU version after (the one it runs now: the old one if it failed).
    pub to: Option<String>,
    /// Guest pause QEMU reported, for a successful upgrade.
    pub pause_ms: Option<f64>,
    /// How it ended.
    pub result: Verdict,
    /// Why it failed.
    pub reason: Option<String>,
    /// When the request was sent and when the report came, from the rollout's start.
    pub span: (Duration, Duration),
    /// The launcher's report, as it sent it.
    pub report: Value,
}

impl Outcome {
    fn from_report(vm: &Vm, report: Value, span: (Duration, Duration)) -> Outcome {
        let ok = report.at("/result") == "ok";
        let from = report
            .at("/from/version")
            .as_str()
            .or(vm.status.at("/version").as_str())
            .map(str::to_owned);
        Outcome {
            vm: vm.label(),
            pid: vm.status.at("/pid").clone(),
            to: if ok {
                report.at("/to/version").as_str().map(str::to_owned)
            } else {
                from.clone()
            },
            from,
            pause_ms: report.at("/downtime_ms").as_f64().filter(|_| ok),
            result: if ok { Verdict::Ok } else { Verdict::Failed },
            reason: report.at("/reason").as_str().map(str::to_owned),
            span,
            report,
        }
    }

    fn unreachable(
        vm: &Vm,
        result: Verdict,
        reason: String,
        span: (Duration, Duration),
    ) -> Outcome {
        let version = vm.status.at("/version").as_str().map(str::to_owned);
        Outcome {
            vm: vm.label(),
            pid: vm.status.at("/pid").clone(),
            from: version.clone(),
            to: version,
            pause_ms: None,
            result,
            reason: Some(reason),
            span,
            report: Value::Null,
        }
    }

    /// The progress line printed when this VM is done: `[3/4] web1: ok, 7.2.18 -> 7.2.22,
    /// paused 3 ms`.
    pub fn progress_line(&self, done: usize, total: usize) -> String {
        let mut line = format!("[{done}/{total}] {}: {}", self.vm, self.result.as_str());
        match self.result {
            Verdict::Ok => {
                let _ = write!(
                    line,
                    ", {} -> {}",
                    self.from.as_deref().unwrap_or("?"),
                    self.to.as_deref().unwrap_or("?")
                );
                if let Some(ms) = self.pause_ms {
                    let _ = write!(line, ", paused {ms} ms");
                }
            }
            Verdict::Failed | Verdict::Gone => {
                let _ = write!(
                    line,
                    ", still on {}: {}",
                    self.from.as_deref().unwrap_or("?"),
                    self.reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
        line
    }

    /// This VM in the JSON summary.
    pub fn to_json(&self) -> Value {
        json!({
            "vm": self.vm,
            "pid": self.pid,
            "from": self.from,
            "to": self.to,
            "pause_ms": self.pause_ms,
            "result": self.result.as_str(),
            "reason": self.reason,
            "started_ms": millis(self.span.0),
            "finished_ms": millis(self.span.1),
            "report": self.report,
        })
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Why a VM that runs the installed QEMU was left out of an `--outdated` rollout.
pub const CURRENT: &str = "runs the installed QEMU";

/// Which VMs a rollout takes: all of them, or (`outdated_only`) those whose QEMU is not the
/// installed one. Returns the chosen ones and, for the others, why they were left out.
pub fn select(vms: Vec<Vm>, outdated_only: bool) -> (Vec<Vm>, Vec<(Vm, String)>) {
    let mut chosen = Vec::new();
    let mut left = Vec::new();
    for vm in vms {
        if !outdated_only {
            chosen.push(vm);
            continue;
        }
        match vm.status.at("/runs_installed").as_bool() {
            Some(false) => chosen.push(vm),
            Some(true) => left.push((vm, CURRENT.to_owned())),
            None => {
                let why = match vm.status.at("/installed_error").as_str() {
                    Some(e) => format!("no installed QEMU to move to: {e}"),
                    // A launcher older than the `installed` fields cannot tell.
                    None => "its launcher cannot tell which QEMU is installed".to_owned(),
                };
                left.push((vm, why));
            }
        }
    }
    (chosen, left)
}

/// Upgrades `vms`, `max_parallel` at a time, calling `on_done` (from the worker threads, one at
/// a time) as each ends. Returns the outcomes in the order of `vms`.
pub fn run(
    vms: &[Vm],
    max_parallel: usize,
    on_done: impl Fn(&Outcome, usize) + Sync,
) -> Vec<Outcome> {
    let start = Instant::now();
    let queue: Mutex<VecDeque<usize>> = Mutex::new((0..vms.len()).collect());
    let results: Mutex<(Vec<Option<Outcome>>, usize)> = Mutex::new((vec![None; vms.len()], 0));
    std::thread::scope(|scope| {
        for _ in 0..max_parallel.clamp(1, vms.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some((i, vm)) = next.and_then(|i| Some((i, vms.get(i)?))) else {
                    break;
                };
                let outcome = upgrade_one(vm, start);
                let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
                results.1 += 1;
                on_done(&outcome, results.1);
                if let Some(slot) = results.0.get_mut(i) {
                    *slot = Some(outcome);
                }
            });
        }
    });
    let (results, _) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.into_iter().flatten().collect()
}

/// Asks one VM's launcher to upgrade and waits for its report.
fn upgrade_one(vm: &Vm, start: Instant) -> Outcome {
    let began = start.elapsed();
    let mut report = None;
    let asked = vm
        .reach
        .connect()
        .map_err(|e| (true, e))
        .and_then(|stream| {
            control::request(stream, &json!({"execute": "upgrade", "to": null}), |line| {
                if line.get("progress").is_none() {
                    report = Some(line.clone());
                }
            })
            .map_err(|e| (false, e))
        });
    let span = (began, start.elapsed());
    match (asked, report) {
        (_, Some(report)) => Outcome::from_report(vm, report, span),
        // No launcher listens any more: the VM ended since it was listed.
        (Err((true, e)), None)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Outcome::unreachable(vm, Verdict::Gone, format!("the VM ended ({e})"), span)
        }
        (Err((_, e)), None) => Outcome::unreachable(
            vm,
            Verdict::Failed,
            format!("{}: {e}", vm.reach.shown().display()),
            span,
        ),
        (Ok(()), None) => Outcome::unreachable(
            vm,
            Verdict::Failed,
            "the launcher closed the connection without a report (did the VM end?)".to_owned(),
            span,
        ),
    }
}

/// The summary table: one row per VM upgraded, then the VMs left out for another reason than
/// running the installed QEMU already, and the totals.
pub fn table(outcomes: &[Outcome], left: &[(Vm, String)]) -> String {
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.vm.clone(),
                o.from.clone().unwrap_or_else(|| "?".into()),
                o.to.clone().unwrap_or_else(|| "?".into()),
                o.pause_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                o.result.as_str().to_owned(),
                o.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut text = crate::table::render(
        &["VM", "FROM", "TO", "PAUSE", "RESULT", "REASON"],
        &rows,
        &[],
    );
    for (vm, why) in left.iter().filter(|(_, why)| why != CURRENT) {
        let _ = writeln!(text, "not upgraded: {}: {why}", vm.label());
    }
    let count = |r: Verdict| outcomes.iter().filter(|o| o.result == r).count();
    let _ = writeln!(
        text,
        "{} upgraded, {} failed, {} gone, {} already on the installed QEMU, {} left out",
        count(Verdict::Ok),
        count(Verdict::Failed),
        count(Verdict::Gone),
        left.iter().filter(|(_, why)| why == CURRENT).count(),
        left.iter().filter(|(_, why)| why != CURRENT).count()
    );
    text
}

/// The whole rollout as one JSON document.
pub fn to_json(outcomes: &[Outcome], left: &[(Vm, String)], max_parallel: usize) -> Value {
    let count = |r: Verdict| outcomes.iter().filter(|o| o.result == r).count();
    json!({
        "max_parallel": max_parallel,
        "upgraded": count(Verdict::Ok),
        "failed": count(Verdict::Failed),
        "gone": count(Verdict::Gone),
        "vms": outcomes.iter().map(Outcome::to_json).collect::<Vec<_>>(),
        "left_out": left
            .iter()
            .map(|(vm, why)| json!({"vm": vm.label(), "pid": vm.status.at("/pid"), "reason": why}))
            .collect::<Vec<_>>(),
    })
}

/// Whether the rollout succeeded: nothing failed. A VM that ended meanwhile is no failure.
pub fn succeeded(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| o.result != Verdict::Failed)
}

/// A socket path, reached without the scan's checks: the tests' launchers.
#[cfg(test)]
pub(crate) struct Socket(pub(crate) PathBuf);

#[cfg(test)]
impl Reach for Socket {
    fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.0)
    }

    fn shown(&self) -> PathBuf {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn vm(socket: PathBuf, status: Value) -> Vm {
        Vm {
            reach: Box::new(Socket(socket)),
            status,
        }
    }

    /// A fake launcher on a real socket: answers one upgrade request after `delay`, counting
    /// how many requests it is handling at once across all fakes sharing `busy`.
    fn fake_launcher(
        dir: &std::path::Path,
        name: &str,
        ok: bool,
        delay: Duration,
        busy: Arc<(AtomicUsize, AtomicUsize)>,
    ) -> (Vm, std::thread::JoinHandle<()>) {
        let socket = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line).unwrap();
            assert!(line.contains("\"upgrade\""), "{line}");
            let now = busy.0.fetch_add(1, Ordering::SeqCst) + 1;
            busy.1.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(delay);
            busy.0.fetch_sub(1, Ordering::SeqCst);
            let report = if ok {
                json!({"result": "ok", "from": {"version": "7.2.18"}, "to": {"version": "7.2.22"}, "downtime_ms": 3})
            } else {
                json!({"result": "failed", "from": {"version": "7.2.18"}, "reason": "new QEMU refused"})
            };
            let mut out = &stream;
            std::io::Write::write_all(
                &mut out,
                format!("{{\"progress\":\"x\"}}\n{report}\n").as_bytes(),
            )
            .unwrap();
        });
        let status = json!({"pid": 1, "name": name, "version": "7.2.18", "runs_installed": false});
        (vm(socket, status), handle)
    }

    #[test]
    fn never_more_than_max_parallel_at_once_and_failures_listed() {
        let dir = std::env::temp_dir().join(format!("qlu-rollout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let busy = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let mut vms = Vec::new();
        let mut handles = Vec::new();
        for (i, ok) in [true, true, false, true, true].into_iter().enumerate() {
            let (vm, h) = fake_launcher(
                &dir,
                &format!("vm{i}"),
                ok,
                Duration::from_millis(50),
                busy.clone(),
            );
            vms.push(vm);
            handles.push(h);
        }
        // A VM that ended after it was listed.
        vms.push(vm(
            dir.join("gone.sock"),
            json!({"pid": 2, "name": "gone", "version": "7.2.18"}),
        ));
        let lines = Mutex::new(Vec::new());
        let outcomes = run(&vms, 2, |o, done| {
            lines.lock().unwrap().push(o.progress_line(done, 6))
        });
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert!(busy.1.load(Ordering::SeqCst) <= 2, "more than 2 at once");
        assert_eq!(
            busy.1.load(Ordering::SeqCst),
            2,
            "2 ran at once at some point"
        );
        let results: Vec<_> = outcomes.iter().map(|o| o.result).collect();
        use Verdict::*;
        assert_eq!(results, [Ok, Ok, Failed, Ok, Ok, Gone]);
        assert!(!succeeded(&outcomes));
        assert_eq!(
            outcomes[2].to.as_deref(),
            Some("7.2.18"),
            "a failed VM stays"
        );
        assert_eq!(lines.lock().unwrap().len(), 6);
        assert!(lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("vm2: failed, still on 7.2.18: new QEMU refused")));
        let t = table(&outcomes, &[]);
        assert!(
            t.starts_with("VM    FROM    TO      PAUSE  RESULT  REASON\n"),
            "{t}"
        );
        assert!(t.contains("vm0   7.2.18  7.2.22  3 ms   ok\n"), "{t}");
        assert!(
            t.ends_with(
                "4 upgraded, 1 failed, 1 gone, 0 already on the installed QEMU, 0 left out\n"
            ),
            "{t}"
        );
        let j = to_json(&outcomes, &[], 2);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["vms"][2]["reason"], "new QEMU refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outdated_selects_by_the_launchers_own_judgement() {
        let all = || {
            [("a", json!(false)), ("b", json!(true)), ("c", Value::Null)]
                .into_iter()
                .map(|(name, runs)| {
                    vm(
                        PathBuf::from("/x"),
                        json!({"pid": 1, "name": name, "runs_installed": runs,
                               "installed_error": "no real QEMU binary found"}),
                    )
                })
                .collect::<Vec<_>>()
        };
        let (chosen, left) = select(all(), true);
        assert_eq!(chosen.iter().map(Vm::label).collect::<Vec<_>>(), ["a"]);
        assert_eq!(left[0].1, "runs the installed QEMU");
        assert!(
            left[1].1.contains("no real QEMU binary found"),
            "{}",
            left[1].1
        );
        let (chosen, left) = select(all(), false);
        assert_eq!(chosen.len(), 3);
        assert!(left.is_empty());
    }
}
