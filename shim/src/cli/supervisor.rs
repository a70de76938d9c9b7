//! `qemu-liveupgrade upgrade --supervisor VM|--all [--to PATH] [--json]`: the VM's launcher
//! hands itself over to a new qemu-liveupgrade binary in place ([`launcher::handover`]): the
//! same pid, the same QEMU, every connection kept. By default the binary is the file now at
//! the path the launcher started from, which is where a package upgrade puts the new build.
//!
//! One VM at a time: each handover takes milliseconds, and a host's launchers are then never
//! all in the middle of one at once.

use std::path::PathBuf;

use launcher::discover;
use serde_json::{json, Value};

/// The outcome for every VM asked: `(label, report)`; a VM that could not be asked gets a
/// report of its own saying why.
pub fn run(
    vms: Vec<(discover::Vm, String)>,
    to: Option<PathBuf>,
    mut progress: impl FnMut(&str, &str),
) -> Vec<(String, Value)> {
    let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let req = json!({
        "execute": "upgrade-supervisor",
        "to": to.map(|p| p.to_string_lossy().into_owned()),
    });
    let mut out = Vec::new();
    for (vm, label) in vms {
        let mut report = None;
        let asked = vm.request(&req, |line| match line.get("progress") {
            Some(step) => progress(&label, step.as_str().unwrap_or("")),
            None => report = Some(line.clone()),
        });
        let report = match (asked, report) {
            (_, Some(r)) => r,
            (Err(why), None) => failed(&why),
            (Ok(()), None) => failed("the launcher closed the connection without a report"),
        };
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

/// The JSON for `--json`: the report itself for one VM, else every VM's with a count.
pub fn to_json(reports: &[(String, Value)], one: bool) -> Value {
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
    json!({ "vms": vms, "ok": ok, "failed": reports.len() - ok })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(to_json(&all, false)["failed"], 1);
        assert_eq!(to_json(&all[..1], true), ok);
    }
}
