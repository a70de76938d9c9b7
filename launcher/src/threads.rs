//! Thread placement carried from one generation to the next.
//!
//! libvirt pins each vCPU thread and iothread (`<vcpupin>`, `<iothreadpin>`) and moves it into
//! its own cgroup (`.../vcpu0`, `.../iothread1`), by thread id, right after QEMU starts. A new
//! generation's threads are new threads: they start with the process's affinity and cgroups.
//! After a swap each new thread gets the cgroups and then the CPU affinity of the old thread
//! with the same name (cgroups first: joining a cpuset resets a thread's affinity to the
//! cpuset's CPUs), and the report says what could not be copied.
//!
//! Moving a thread means writing its id into root's cgroup files. A launcher that runs as
//! root does it itself. One that does not (libvirt's packaged configuration runs QEMU, and so
//! the launcher, as `libvirt-qemu`) asks the placer service (see [`crate::placer`]), which
//! runs as root and reads the old threads' placement itself before the swap: it takes the
//! launcher's word for nothing but which of its own children's threads are which. Affinity
//! the launcher may set itself (same uid), and does, so that it carries over even without the
//! placer.
//!
//! libvirt's own record of the thread ids goes stale: a later `virsh vcpupin` or `emulatorpin`
//! acts on ids that no longer exist (it fails, or on cgroup v2 moves nothing) until the domain
//! restarts. The placement made before the upgrade carries over; changes made after it do not.

use std::fs;
use std::path::PathBuf;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::placer;

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

/// Gives every thread of process `pid` the lowest priority, nice 19 (setpriority(2) acts on
/// one thread on Linux): its weight is 15 against 1024 for a task at nice 0 (sched(7)), so it
/// runs mostly on CPU time nothing else wants, yet is not starved outright as the SCHED_IDLE
/// class would be on a busy host. Unprivileged callers may do this to their own children, not
/// undo it. Best effort: a thread that is gone or refuses keeps its priority.
pub fn to_lowest_priority(pid: Pid) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<libc::id_t>().ok())
    {
        // SAFETY: setpriority takes integers only; a stale thread id fails with ESRCH and
        // changes nothing.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
    }
}

/// Where one thread ran: its affinity and its cgroups, read while it existed.
#[derive(Debug, Clone)]
pub struct Placement {
    /// `vcpu0`, `iothread:iothread1`.
    pub name: String,
    affinity: Result<CpuSet, String>,
    cgroups: Result<Vec<Membership>, String>,
}

impl Placement {
    /// Reads thread `tid`'s placement.
    pub fn read(name: &str, tid: Pid) -> Placement {
        Placement {
            name: name.to_owned(),
            affinity: sched_getaffinity(tid).map_err(|e| e.desc().to_owned()),
            cgroups: memberships(tid),
        }
    }

    /// Gives thread `tid` this placement: cgroups first, then affinity. Returns what failed,
    /// one line each, prefixed with the thread's name.
    pub fn apply(&self, tid: Pid) -> Vec<String> {
        let mut problems = self.apply_cgroups(tid);
        if let Err(e) = self.apply_affinity(tid) {
            problems.push(format!("{}: affinity: {e}", self.name));
        }
        problems
    }

    /// Moves `tid` into every cgroup this placement has that it is not in yet.
    pub fn apply_cgroups(&self, tid: Pid) -> Vec<String> {
        let fail = |why: String| vec![format!("{}: cgroup: {why}", self.name)];
        let from = match &self.cgroups {
            Ok(m) => m,
            Err(e) => return fail(e.clone()),
        };
        let now = match memberships(tid) {
            Ok(m) => m,
            Err(e) => return fail(e),
        };
        let mounts = cgroup_mounts();
        from.iter()
            .filter(|m| !now.contains(m))
            .filter_map(|m| {
                let file = m.file(&mounts)?;
                fs::write(&file, tid.to_string())
                    .err()
                    .map(|e| format!("{}: cgroup: {}: {e}", self.name, file.display()))
            })
            .collect()
    }

    /// Whether `tid` is in every cgroup this placement has.
    pub fn cgroups_match(&self, tid: Pid) -> bool {
        match (&self.cgroups, memberships(tid)) {
            (Ok(from), Ok(now)) => from.iter().all(|m| now.contains(m)),
            _ => false,
        }
    }

    fn apply_affinity(&self, tid: Pid) -> Result<(), String> {
        let set = self.affinity.as_ref().map_err(String::clone)?;
        sched_setaffinity(tid, set).map_err(|e| e.desc().to_owned())
    }
}

/// The old generation's threads' placement, taken before the swap; for a launcher that is not
/// root, also what the placer said when asked to take its own copy.
#[derive(Debug)]
pub struct Snapshot {
    threads: Vec<Placement>,
    /// `None` for a root launcher, which moves threads itself.
    placer: Option<Result<(), String>>,
}

/// Reads the placement of the old generation's threads (`old`, from [`threads`]); a launcher
/// that is not root also has the placer read it, asking it by `ask`.
pub fn snapshot(old: &[(String, i32)], ask: &mut placer::Ask<'_>) -> Snapshot {
    let threads = old
        .iter()
        .map(|(name, tid)| Placement::read(name, Pid::from_raw(*tid)))
        .collect();
    let placer = (!nix::unistd::geteuid().is_root()).then(|| placer::snapshot(old, ask));
    Snapshot { threads, placer }
}

/// Gives each new thread the placement of the old thread of the same name. Returns the
/// report: how many threads were placed with nothing amiss, what could not be copied, and who
/// moved them between cgroups (`launcher` or `placer`, asked by `ask`).
pub fn apply(old: &Snapshot, new: &[(String, i32)], ask: &mut placer::Ask<'_>) -> Value {
    let mut problems = Vec::new();
    let mut amiss = std::collections::BTreeSet::new();
    for (name, tid) in new {
        match old.threads.iter().find(|p| &p.name == name) {
            None => problems.push(format!("{name}: no such thread in the old QEMU")),
            Some(p) => {
                // Affinity first here: the placer, if it moves the thread into a cpuset,
                // sets it again after.
                if let Err(e) = p.apply_affinity(Pid::from_raw(*tid)) {
                    problems.push(format!("{name}: affinity: {e}"));
                }
                if old.placer.is_none() {
                    problems.extend(p.apply_cgroups(Pid::from_raw(*tid)));
                }
            }
        }
    }
    let by = match &old.placer {
        None => "launcher",
        Some(asked) => {
            // Only threads whose cgroups differ need the placer; a VM nobody placed (a
            // script's) needs nothing from it.
            let moving: Vec<(String, i32)> = new
                .iter()
                .filter(|(name, tid)| {
                    old.threads
                        .iter()
                        .find(|p| &p.name == name)
                        .is_some_and(|p| !p.cgroups_match(Pid::from_raw(*tid)))
                })
                .cloned()
                .collect();
            match asked {
                _ if moving.is_empty() => {}
                Err(why) => problems.extend(
                    moving
                        .iter()
                        .map(|(name, _)| format!("{name}: cgroup: not moved: {why}")),
                ),
                Ok(()) => match placer::apply(&moving, ask) {
                    Ok(theirs) => problems.extend(theirs),
                    Err(why) => problems.extend(
                        moving
                            .iter()
                            .map(|(name, _)| format!("{name}: cgroup: not moved: {why}")),
                    ),
                },
            }
            "placer"
        }
    };
    for p in &problems {
        // "NAME: what": names have colons of their own (`iothread:io1`), never ": ".
        amiss.insert(p.split_once(": ").map_or(p.as_str(), |(n, _)| n).to_owned());
    }
    let placed = new.iter().filter(|(n, _)| !amiss.contains(n)).count();
    json!({ "placed": placed, "problems": problems, "by": by })
}

/// One line of `/proc/TID/cgroup` (cgroups(7)): `hierarchy-id:controllers:path`; cgroup v2
/// is hierarchy 0 with no controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    hierarchy: u32,
    controllers: String,
    path: String,
}

impl Membership {
    /// The file that moves one thread into this cgroup: `tasks` on v1, `cgroup.threads` on
    /// v2 (a thread moves on its own only within a threaded subtree, which is how libvirt
    /// lays out `.../libvirt/vcpuN` on v2). `None` if the hierarchy is not mounted here.
    fn file(&self, mounts: &[CgroupMount]) -> Option<PathBuf> {
        let v2 = self.hierarchy == 0;
        let mount = mounts.iter().find(|m| {
            m.v2 == v2
                && (v2
                    || self
                        .controllers
                        .split(',')
                        .all(|c| m.options.iter().any(|o| o == c)))
        })?;
        let below = self
            .path
            .strip_prefix(mount.root.trim_end_matches('/'))
            .unwrap_or(&self.path)
            .trim_matches('/');
        let dir = if below.is_empty() {
            mount.point.clone()
        } else {
            mount.point.join(below)
        };
        Some(dir.join(if v2 { "cgroup.threads" } else { "tasks" }))
    }
}

/// Thread `tid`'s cgroups, one per hierarchy.
pub fn memberships(tid: Pid) -> Result<Vec<Membership>, String> {
    let text = fs::read_to_string(format!("/proc/{tid}/cgroup"))
        .map_err(|e| format!("/proc/{tid}/cgroup: {e}"))?;
    Ok(parse_memberships(&text))
}

fn parse_memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            Some(Membership {
                hierarchy: parts.next()?.parse().ok()?,
                controllers: parts.next()?.to_owned(),
                path: parts.next()?.to_owned(),
            })
        })
        .collect()
}

/// A mounted cgroup hierarchy: v2, or v1 with its options (controllers, `name=`).
#[derive(Debug)]
struct CgroupMount {
    v2: bool,
    options: Vec<String>,
    /// The cgroup the mount shows as its root (`/` unless a container mounted a subtree).
    root: String,
    point: PathBuf,
}

fn cgroup_mounts() -> Vec<CgroupMount> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The cgroup mounts of a `/proc/PID/mountinfo` text (proc(5)): `id parent dev root point
/// options [optional...] - fstype source super-options`.
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let v2 = match *right.first()? {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                v2,
                options: right.get(2)?.split(',').map(str::to_owned).collect(),
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
            })
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (byte, octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_given_the_lowest_priority_has_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // SAFETY: getpriority takes integers only and reads a thread's nice value.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, pid.as_raw() as libc::id_t) };
        let before = nice();
        to_lowest_priority(pid);
        let got = nice();
        let _ = child.kill();
        let _ = child.wait();
        if before == 19 {
            eprintln!("skipped: the tests run at nice 19 already, so nothing could change");
            return;
        }
        assert_eq!(got, 19);
    }

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
    fn finds_the_file_that_moves_a_thread_on_v1_and_v2() {
        let mounts = parse_mountinfo(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n\
             41 31 0:38 /lxc/c1 /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n\
             23 1 0:21 / /sys rw - sysfs sysfs rw\n",
        );
        assert_eq!(mounts.len(), 3);
        let lines = parse_memberships(
            "3:cpu,cpuacct:/machine/qemu-1-vm.libvirt-qemu/vcpu0\n\
             1:name=systemd:/\n\
             0::/lxc/c1/machine.slice/libvirt/vcpu0\n\
             5:blkio:/machine\n",
        );
        let files: Vec<Option<PathBuf>> = lines.iter().map(|m| m.file(&mounts)).collect();
        assert_eq!(
            files,
            [
                Some(PathBuf::from(
                    "/sys/fs/cgroup/cpu,cpuacct/machine/qemu-1-vm.libvirt-qemu/vcpu0/tasks"
                )),
                Some(PathBuf::from("/sys/fs/cgroup/systemd/tasks")),
                Some(PathBuf::from(
                    "/sys/fs/cgroup/uni fied/machine.slice/libvirt/vcpu0/cgroup.threads"
                )),
                None,
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
        let snap = Snapshot {
            threads: vec![Placement::read("vcpu0", old_tid)],
            placer: None,
        };
        let mut no_placer = |_: &Value| -> Result<Value, String> { panic!("root asks no placer") };
        let report = apply(&snap, &[("vcpu0".into(), me.as_raw())], &mut no_placer);
        assert_eq!(report["placed"], 1, "{report}");
        assert_eq!(sched_getaffinity(me).unwrap(), one);
        let missing = apply(&snap, &[("vcpu1".into(), me.as_raw())], &mut no_placer);
        assert_eq!(missing["placed"], 0, "{missing}");
        assert_eq!(
            missing["problems"][0],
            "vcpu1: no such thread in the old QEMU"
        );
        sched_setaffinity(me, &online).unwrap();
        done_tx.send(()).unwrap();
        old.join().unwrap();
    }
}
