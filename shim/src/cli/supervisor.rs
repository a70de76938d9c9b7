//! `qemu-liveupgrade upgrade --supervisor VM|--all [--outdated] [--to PATH] [--json]`: the
//! VM's launcher hands itself over to a new qemu-liveupgrade binary in place
//! ([`launcher::handover`]): the same pid, the same QEMU, every connection kept. By default
//! the binary is the file now at the path the launcher started from, which is where a package
//! upgrade puts the new build.
//!
//! One VM at a time: each handover takes milliseconds, and a host's launchers are then never
//! all in the middle of one at once.

use std::path::PathBuf;

use launcher::control;
use launcher::json::JsonExt;
use serde_json::{json, Value};

use crate::rollout::{Reach, Vm};

/// Whether the VM whose status this is runs the installed shim: its launcher's own
/// judgement (`supervisor.runs_installed`, by file identity), else, from a launcher that
/// predates it, false when its executable is gone from disk (proc(5)'s ` (deleted)`), else
/// unknown.
pub fn runs_installed(status: &Value) -> Option<bool> {
    let s = status.at("/supervisor");
    if let Some(known) = s.at("/runs_installed").as_bool() {
        return Some(known);
    }
    s.at("/exe")
        .as_str()
        .filter(|exe| exe.ends_with(" (deleted)"))
        .map(|_| false)
}

/// Why a VM whose launcher is the installed shim was left out of an `--outdated` run.
pub const CURRENT: &str = "runs the installed supervisor";

/// Which VMs a supervisor upgrade takes: all, or (`outdated_only`) those whose launcher is
/// not the installed shim. Returns the chosen ones and, for the others, why they were left
/// out.
pub fn select(vms: Vec<Vm>, outdated_only: bool) -> (Vec<Vm>, Vec<(Vm, String)>) {
    let mut chosen = Vec::new();
    let mut left = Vec::new();
    for vm in vms {
        match (outdated_only, runs_installed(&vm.status)) {
            (false, _) | (true, Some(false)) => chosen.push(vm),
            (true, Some(true)) => left.push((vm, CURRENT.to_owned())),
            (true, None) => left.push((
                vm,
                "its launcher cannot tell whether it is the installed one".to_owned(),
            )),
        }
    }
    (chosen, left)
}

/// The outcome for every VM asked, `(label, launcher)` in order: `(label, report)`; a VM
/// that could not be asked gets a report of its own saying why. `progress` gets each step
/// as the launcher names it, `done` each report as it comes.
pub fn run<'a>(
    vms: impl IntoIterator<Item = (&'a dyn Reach, String)>,
    to: Option<PathBuf>,
    mut progress: impl FnMut(&str, &str),
    mut done: impl FnMut(&str, &Value),
) -> Vec<(String, Value)> {
    let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let req = json!({
        "execute": "upgrade-supervisor",
        "to": to.map(|p| p.to_string_lossy().into_owned()),
    });
    let mut out = Vec::new();
    for (vm, label) in vms {
        let mut report = None;
        let asked = vm.connect().and_then(|stream| {
            control::request(stream, &req, |line| match line.get("progress") {
                Some(step) => progress(&label, step.as_str().unwrap_or("")),
                None => report = Some(line.clone()),
            })
        });
        let report = match (asked, report) {
            (_, Some(r)) => r,
            (Err(why), None) => failed(&format!("{}: {why}", vm.shown().display())),
            (Ok(()), None) => failed("the launcher closed the connection without a report"),
        };
        done(&label, &report);
        out.push((label, report));
    }
    out
}

fn failed(why: &str) -> Value {
    json!({ "qemu-liveupgrade": "supervisor-upgrade", "result": "failed", "reason": why })
}

/// Whether every report says ok.
pub fn succeeded(reports: &[(String, Value)]) -> bool {
    reports.iter().all(|(_, r)| r["result"] == "ok")
}

/// One line for a report.
pub fn describe(label: &str, r: &Value) -> String {
    let who = |s: &Value| {
        format!(
            "{} (build {})",
            s["version"].as_str().unwrap_or("?"),
            s["build"].as_str().unwrap_or("?")
        )
    };
    if r["result"] == "ok" {
        format!(
            "{label}: supervisor upgraded {} -> {}: pid {} and QEMU pid {} kept, handed over in {} ms ({} ms in all)",
            who(&r["from"]),
            who(&r["to"]),
            r["pid"],
            r["qemu_pid"],
            r["handover_ms"],
            r["total_ms"],
        )
    } else {
        format!(
            "{label}: supervisor not upgraded, the VM stays on its launcher: {}",
            r["reason"].as_str().unwrap_or("unknown reason")
        )
    }
}

/// The JSON for `--json`: the report itself for one VM, else every VM's with a count and
/// the VMs left out, with why.
pub fn to_json(reports: &[(String, Value)], left: &[(Vm, String)], one: bool) -> Value {
    if one {
        if let Some((_, r)) = reports.first() {
            return r.clone();
        }
    }
    let vms: Vec<Value> = reports
        .iter()
        .map(|(label, r)| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.insert("vm".into(), json!(label));
            }
            r
        })
        .collect();
    let ok = reports.iter().filter(|(_, r)| r["result"] == "ok").count();
    let left_out: Vec<Value> = left
        .iter()
        .map(|(vm, why)| json!({"vm": vm.label(), "pid": vm.status.at("/pid"), "reason": why}))
        .collect();
    json!({ "vms": vms, "ok": ok, "failed": reports.len() - ok, "left_out": left_out })
}

/// The closing line of a run over several VMs: how many were handed over, failed, or left
/// out and why.
pub fn summary(reports: &[(String, Value)], left: &[(Vm, String)]) -> String {
    let ok = reports.iter().filter(|(_, r)| r["result"] == "ok").count();
    let current = left.iter().filter(|(_, why)| why == CURRENT).count();
    let mut text = String::new();
    for (vm, why) in left.iter().filter(|(_, why)| why != CURRENT) {
        text.push_str(&format!("not upgraded: {}: {why}\n", vm.label()));
    }
    text.push_str(&format!(
        "{ok} supervisor(s) upgraded, {} failed, {current} already the installed one, {} left out",
        reports.len() - ok,
        left.len() - current
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Socket;
    use std::io;
    use std::os::unix::net::UnixListener;

    fn vm(name: &str, supervisor: Value) -> Vm {
        Vm {
            reach: Box::new(Socket(PathBuf::from(format!("/nonexistent/{name}.sock")))),
            status: json!({"pid": 1, "name": name, "supervisor": supervisor}),
        }
    }

    #[test]
    fn reports_read_as_one_line_each() {
        let ok = json!({"result": "ok", "from": {"version": "0.1.0", "build": "A"},
            "to": {"version": "0.1.0", "build": "B"}, "pid": 7, "qemu_pid": 8,
            "handover_ms": 4.2, "total_ms": 51.0});
        assert_eq!(
            describe("vm1", &ok),
            "vm1: supervisor upgraded 0.1.0 (build A) -> 0.1.0 (build B): pid 7 and QEMU pid 8 kept, handed over in 4.2 ms (51.0 ms in all)"
        );
        let no = failed("refuses the state");
        assert!(describe("vm2", &no).ends_with("stays on its launcher: refuses the state"));
        let all = [("vm1".to_owned(), ok.clone()), ("vm2".to_owned(), no)];
        assert!(!succeeded(&all));
        assert_eq!(to_json(&all, &[], false)["failed"], 1);
        assert_eq!(to_json(&all[..1], &[], true), ok);
        let left = [(vm("vm3", json!({})), "why".to_owned())];
        assert_eq!(to_json(&all, &left, false)["left_out"][0]["reason"], "why");
        assert_eq!(
            summary(&all, &left),
            "not upgraded: vm3: why\n1 supervisor(s) upgraded, 1 failed, 0 already the installed one, 1 left out"
        );
    }

    #[test]
    fn outdated_means_not_the_installed_file_by_the_launchers_word_or_a_deleted_exe() {
        let all = || {
            vec![
                vm(
                    "new",
                    json!({"runs_installed": true, "exe": "/x (deleted)"}),
                ),
                vm("old", json!({"runs_installed": false, "exe": "/x"})),
                vm("older", json!({"exe": "/usr/lib/x (deleted)"})),
                vm("unknown", json!({"exe": "/usr/lib/x"})),
            ]
        };
        let (chosen, left) = select(all(), true);
        let names = |v: &[Vm]| v.iter().map(Vm::label).collect::<Vec<_>>();
        assert_eq!(names(&chosen), ["old", "older"]);
        assert_eq!(left[0].1, CURRENT);
        assert!(left[1].1.contains("cannot tell"), "{}", left[1].1);
        let (chosen, left) = select(all(), false);
        assert_eq!(chosen.len(), 4);
        assert!(left.is_empty());
    }

    #[test]
    fn each_vm_is_asked_in_turn_and_one_that_cannot_be_reached_is_a_failure() {
        let dir = std::env::temp_dir().join(format!("qlu-supervisor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("a.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let launcher = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(&stream), &mut line).unwrap();
            assert!(line.contains("\"upgrade-supervisor\""), "{line}");
            let mut out = &stream;
            io::Write::write_all(
                &mut out,
                b"{\"progress\":\"writing the state\"}\n{\"result\":\"ok\"}\n",
            )
            .unwrap();
        });
        let a = Socket(socket);
        let b = Socket(dir.join("gone.sock"));
        let mut steps = Vec::new();
        let mut order = Vec::new();
        let reports = run(
            [(&a as &dyn Reach, "a".to_owned()), (&b, "b".to_owned())],
            None,
            |vm, step| steps.push(format!("{vm}: {step}")),
            |vm, r| order.push(format!("{vm} {}", r["result"])),
        );
        launcher.join().unwrap();
        assert_eq!(steps, ["a: writing the state"]);
        assert_eq!(order, ["a \"ok\"", "b \"failed\""]);
        assert!(
            reports[1].1["reason"]
                .as_str()
                .unwrap()
                .contains("gone.sock"),
            "names the socket: {}",
            reports[1].1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
