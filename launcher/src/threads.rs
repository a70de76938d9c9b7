//! Thread placement carried from one generation to the next.
//!
//! libvirt pins each vCPU thread and iothread (`<vcpupin>`, `<iothreadpin>`) and moves it into
//! its own cgroup (`.../vcpu0`, `.../iothread1`), by thread id, right after QEMU starts. A new
//! generation's threads are new threads: they start with the process's affinity and cgroup.
//! After a swap the launcher gives each new thread the CPU affinity of the old thread with the
//! same index, and moves it into the same cgroup where the launcher may write there, and says
//! what it could not copy.
//!
//! libvirt's own record of the thread ids goes stale: a later `virsh vcpupin` or `emulatorpin`
//! acts on ids that no longer exist (it fails, or on cgroup v2 moves nothing) until the domain
//! restarts. The pinning done before the upgrade carries over; changes made after it do not.

use std::fs;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The threads of one generation that placement is copied for: `(name, thread id)`, named
/// `vcpu<index>` and `iothread:<id>` so that old and new threads pair up.
pub fn threads(cpus: &Value, iothreads: &Value) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for cpu in cpus.as_array().into_iter().flatten() {
        if let (Some(index), Some(tid)) = (cpu["cpu-index"].as_u64(), cpu["thread-id"].as_i64()) {
            out.push((format!("vcpu{index}"), tid as i32));
        }
    }
    for io in iothreads.as_array().into_iter().flatten() {
        if let (Some(id), Some(tid)) = (io["id"].as_str(), io["thread-id"].as_i64()) {
            out.push((format!("iothread:{id}"), tid as i32));
        }
    }
    out
}

/// Where one old thread ran: taken before the old QEMU goes, applied to the new threads after.
#[derive(Debug, Clone)]
pub struct Placement {
    name: String,
    affinity: Result<CpuSet, String>,
    cgroups: Result<String, String>,
}

/// Reads the placement of the old generation's threads.
pub fn snapshot(old: &[(String, i32)]) -> Vec<Placement> {
    old.iter()
        .map(|(name, tid)| {
            let tid = Pid::from_raw(*tid);
            Placement {
                name: name.clone(),
                affinity: sched_getaffinity(tid).map_err(|e| e.desc().to_owned()),
                cgroups: read_cgroups(tid),
            }
        })
        .collect()
}

/// Gives each new thread the placement of the old thread of the same name. Returns a report:
/// how many threads were placed and what could not be copied.
pub fn apply(old: &[Placement], new: &[(String, i32)]) -> Value {
    let mut copied = 0;
    let mut problems = Vec::new();
    for (name, new_tid) in new {
        let Some(p) = old.iter().find(|p| &p.name == name) else {
            problems.push(format!("{name}: no such thread in the old QEMU"));
            continue;
        };
        let new_tid = Pid::from_raw(*new_tid);
        match p
            .affinity
            .as_ref()
            .map_err(String::clone)
            .and_then(|set| sched_setaffinity(new_tid, set).map_err(|e| e.desc().to_owned()))
        {
            Ok(()) => copied += 1,
            Err(e) => problems.push(format!("{name}: affinity: {e}")),
        }
        let moved = p
            .cgroups
            .as_ref()
            .map_err(String::clone)
            .and_then(|from| copy_cgroup(from, new_tid));
        if let Err(why) = moved {
            problems.push(format!("{name}: cgroup: {why}"));
        }
    }
    json!({ "placed": copied, "problems": problems })
}

fn read_cgroups(tid: Pid) -> Result<String, String> {
    fs::read_to_string(format!("/proc/self/task/{tid}/cgroup"))
        .or_else(|_| fs::read_to_string(format!("/proc/{tid}/cgroup")))
        .map_err(|e| e.to_string())
}

/// Moves `new` into every cgroup listed in `from` (an old thread's /proc/TID/cgroup) where it
/// is not already: on cgroup v2 through the group's `cgroup.threads`, on v1 through each
/// controller hierarchy's `tasks` (libvirt 9 on a v1 host keeps `machine/<vm>/vcpuN` under
/// cpu, cpuacct and cpuset).
fn copy_cgroup(from: &str, new: Pid) -> Result<(), String> {
    let to = read_cgroups(new)?;
    let mut problems = Vec::new();
    for line in from.lines().filter(|l| !to.lines().any(|t| t == *l)) {
        // "hierarchy-id:controllers:path"
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_end_matches('/');
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/cgroup.threads")
        } else {
            let mount = controllers.strip_prefix("name=").unwrap_or(controllers);
            format!("/sys/fs/cgroup/{mount}{path}/tasks")
        };
        // A hierarchy that is not mounted where libvirt looks has nothing to copy.
        if controllers.is_empty()
            && !std::path::Path::new(&file).exists()
            && from.lines().count() > 1
        {
            continue;
        }
        if let Err(e) = fs::write(&file, new.to_string()) {
            problems.push(format!("{file}: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sched::CpuSet;

    #[test]
    fn pairs_threads_by_index_and_id() {
        let cpus = json!([{"cpu-index": 0, "thread-id": 11}, {"cpu-index": 1, "thread-id": 12}]);
        let io = json!([{"id": "iothread1", "thread-id": 13}]);
        assert_eq!(
            threads(&cpus, &io),
            [
                ("vcpu0".to_owned(), 11),
                ("vcpu1".to_owned(), 12),
                ("iothread:iothread1".to_owned(), 13)
            ]
        );
    }

    #[test]
    fn copies_affinity_between_real_threads() {
        let me = nix::unistd::gettid();
        let online = sched_getaffinity(me).unwrap();
        let first = (0..CpuSet::count())
            .find(|&c| online.is_set(c).unwrap_or(false))
            .unwrap();
        let mut one = CpuSet::new();
        one.set(first).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let old = std::thread::spawn(move || {
            sched_setaffinity(Pid::from_raw(0), &one).unwrap();
            tx.send(nix::unistd::gettid()).unwrap();
            done_rx.recv().unwrap();
        });
        let old_tid = rx.recv().unwrap();
        let report = apply(
            &snapshot(&[("vcpu0".into(), old_tid.as_raw())]),
            &[("vcpu0".into(), me.as_raw())],
        );
        assert_eq!(report["placed"], 1, "{report}");
        assert_eq!(sched_getaffinity(me).unwrap(), one);
        let missing = apply(&[], &[("vcpu1".into(), me.as_raw())]);
        assert_eq!(
            missing["problems"][0],
            "vcpu1: no such thread in the old QEMU"
        );
        sched_setaffinity(me, &online).unwrap();
        done_tx.send(()).unwrap();
        old.join().unwrap();
    }
}
