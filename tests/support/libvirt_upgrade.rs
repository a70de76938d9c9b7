//! An upgrade of a libvirt domain by SIGUSR2 to the pid libvirt tracks, as a package upgrade
//! would do it (the `.real` link repointed first), and everything libvirt and root's CLI show
//! of it: `virsh domstate` polled throughout, the report in the domain log (through
//! virtlogd), the version on libvirt's own monitor connection, `qemu-liveupgrade status NAME`,
//! and where the new vCPU 0 thread runs.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::libvirt::{
    cli_status, credentials, libvirtd_log_mark, qemu_user, repoint, try_virsh, Domain, QEMU_USER,
};
use crate::liveupgrade::{version, UPGRADE_TIMEOUT};
use crate::shim::{is_running, wait_qemu_child};
use crate::shim_bin;

/// `virsh domstate` during an upgrade: about every 20 ms.
const POLL: Duration = Duration::from_millis(20);

/// What one upgrade looked like from libvirt's side and root's.
pub struct Upgrade {
    /// The launcher's report, from the domain log.
    pub report: Value,
    /// From SIGUSR2 to the report.
    pub took: Duration,
    /// Every `virsh domstate` answer from just before SIGUSR2 until after the report.
    pub states: Vec<String>,
    /// `query-version` through libvirt afterwards.
    pub version: String,
    /// libvirtd's log while it ran: (from, to) byte marks.
    pub log_window: (u64, u64),
    /// QEMU's own messages in the domain log while it ran (a failed upgrade's details).
    pub qemu_messages: Vec<String>,
    /// `qemu-liveupgrade status --json NAME` as root afterwards.
    pub status: Result<Value, String>,
    /// The pid libvirt tracks.
    pub pid: Pid,
    /// Whether the new vCPU 0 thread is in libvirt's `vcpu0` cgroup, and its cgroups.
    pub vcpu0_placed: bool,
    /// The new vCPU 0 thread's `/proc/TID/cgroup` lines.
    pub vcpu0_cgroups: Vec<String>,
}

/// Repoints the `.real` link `real` at `binary`, sends SIGUSR2 to the pid libvirt tracks,
/// polls `virsh domstate` until the report is in the domain log, then asks libvirt's monitor
/// connection for the version, root's CLI for the status, and `/proc` where vCPU 0 runs.
pub fn upgrade_by_signal(dom: &Domain, real: &Path, binary: &Path) -> Upgrade {
    repoint(real, binary);
    let pid = dom.pid();
    assert_is_shim(pid);
    let before = dom.reports().len();
    let from_mark = libvirtd_log_mark();
    let domain_log_mark = dom.log_mark();

    let ((report, took), states) = polling_domstate(dom.name(), || {
        let started = Instant::now();
        kill(pid, Signal::SIGUSR2).unwrap_or_else(|e| panic!("kill -USR2 {pid}: {e}"));
        let report = dom.wait_report(before, UPGRADE_TIMEOUT);
        (report, started.elapsed())
    });
    let version = dom
        .qmp("query-version", Value::Null)
        .map(|v| version(&v))
        .unwrap_or_else(|e| format!("query-version failed: {e}"));
    let to_mark = libvirtd_log_mark();
    let qemu_messages = dom
        .log_since(domain_log_mark)
        .lines()
        .filter(|l| !l.starts_with('{') && l.contains("qemu-system-x86_64:"))
        .map(str::to_owned)
        .collect();
    let status = cli_status(dom.name());
    let vcpu0_placed = dom.vcpu_in_libvirt_cgroup(0);
    let vcpu0_cgroups = dom.vcpu_cgroups(0);
    assert_eq!(dom.pid(), pid, "libvirt's pid changed across the upgrade");
    assert!(is_running(pid), "the shim (pid {pid}) is gone");
    Upgrade {
        report,
        took,
        states,
        version,
        log_window: (from_mark, to_mark),
        qemu_messages,
        status,
        pid,
        vcpu0_placed,
        vcpu0_cgroups,
    }
}

/// Runs `f` while `virsh domstate NAME` is polled about every 20 ms (from just before `f`
/// until it returned); returns what `f` did and every answer.
pub fn polling_domstate<T>(name: &str, f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = {
        let stop = Arc::clone(&stop);
        let name = name.to_owned();
        thread::spawn(move || {
            let mut states = Vec::new();
            loop {
                let state = match try_virsh(&["domstate", &name]) {
                    Ok(s) => s.trim().to_owned(),
                    Err(e) => format!("virsh error: {e}"),
                };
                states.push(state);
                if states.len() == 1 {
                    let _ = tx.send(());
                }
                if stop.load(Ordering::Relaxed) {
                    return states;
                }
                thread::sleep(POLL);
            }
        })
    };
    rx.recv_timeout(Duration::from_secs(30))
        .expect("first virsh domstate");
    let out = f();
    stop.store(true, Ordering::Relaxed);
    (out, poller.join().expect("domstate poller"))
}

impl Upgrade {
    /// The report says ok.
    pub fn ok(&self) -> bool {
        self.report["result"] == "ok"
    }

    /// The upgrade went from `from` to `to`, and libvirt and root's CLI saw it right: a
    /// running domain all along, the new version on libvirt's connection, vCPU 0 in its
    /// cgroup, the status.
    pub fn assert_ok(&self, from: &str, to: &str) {
        assert_eq!(
            self.report["result"], "ok",
            "upgrade {from} -> {to} failed: {}\nQEMU said: {:?}",
            self.report["reason"], self.qemu_messages
        );
        assert_eq!(self.report["from"]["version"], from, "{}", self.report);
        assert_eq!(self.report["to"]["version"], to, "{}", self.report);
        self.assert_domstate_running();
        assert_eq!(self.version, to, "version through libvirt's monitor");
        self.assert_threads_placed();
        self.assert_status(to);
    }

    /// Every `virsh domstate` during the upgrade said `running`.
    pub fn assert_domstate_running(&self) {
        assert!(
            self.states.len() >= 2,
            "domstate polled only {} time(s) during the upgrade",
            self.states.len()
        );
        let odd: Vec<&String> = self.states.iter().filter(|s| *s != "running").collect();
        assert!(
            odd.is_empty(),
            "virsh domstate during the upgrade: {odd:?} (of {} polls)",
            self.states.len()
        );
    }

    /// The new vCPU thread is where libvirt put the old one: its `vcpu0` cgroup, moved there
    /// by the placer (the launcher runs as libvirt-qemu and may not write root's cgroup files).
    pub fn assert_threads_placed(&self) {
        let threads = &self.report["threads"];
        assert_eq!(threads["problems"], json!([]), "{}", self.report);
        assert_eq!(threads["by"], "placer", "{}", self.report);
        assert!(
            self.vcpu0_placed,
            "the new vCPU 0 thread is not in libvirt's vcpu0 cgroup: {:?}",
            self.vcpu0_cgroups
        );
    }

    /// `qemu-liveupgrade status NAME` as root shows the VM on `to`, at the report's
    /// generation, with this upgrade as its last.
    pub fn assert_status(&self, to: &str) {
        let status = self
            .status
            .as_ref()
            .unwrap_or_else(|e| panic!("qemu-liveupgrade status (as root) failed: {e}"));
        assert_eq!(status["pid"], self.pid.as_raw(), "status: {status}");
        assert_eq!(status["version"], to, "status: {status}");
        assert_eq!(
            status["generation"], self.report["to"]["generation"],
            "status: {status}"
        );
        assert_eq!(status["last_upgrade"]["result"], "ok", "status: {status}");
    }
}

/// `pid` runs the shim. By name: a rebuild replaces the file under a running shim, and then
/// `/proc/PID/exe` names a deleted file.
pub fn assert_is_shim(pid: Pid) {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e} (is the VM gone?)"));
    let shim = shim_bin();
    let name = shim.file_name().unwrap().to_string_lossy();
    assert!(
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&*name)),
        "the pid libvirt tracks ({pid}) runs {}, not the shim",
        exe.display()
    );
}

/// The shim `pid` and its QEMU run as libvirt's packaged configuration runs emulators: as
/// `libvirt-qemu`, with stderr a pipe to virtlogd (not the log file itself, as with
/// `stdio_handler = "file"`).
pub fn assert_packaged_setup(pid: Pid) {
    let user = qemu_user();
    assert_eq!(
        credentials(pid),
        user,
        "the shim (pid {pid}) does not run as {QEMU_USER}: is qemu.conf the packaged one?"
    );
    let qemu = wait_qemu_child(pid, Duration::from_secs(10));
    assert_eq!(
        credentials(qemu),
        user,
        "QEMU (pid {qemu}) runs as another user than the shim"
    );
    let stderr = fs::read_link(format!("/proc/{pid}/fd/2")).expect("the shim's stderr");
    assert!(
        stderr.to_string_lossy().starts_with("pipe:"),
        "the shim's stderr is {} rather than virtlogd's pipe",
        stderr.display()
    );
}
