//! Running the shim the way its callers do, and looking at what it left running.
//!
//! The shim stays the VM's pid and runs the real QEMU as its child, so most checks are about
//! process relationships: which pid is whose child, which binary it runs, which fds it holds,
//! whether it is still alive. They read `/proc` directly (proc(5)), the same view libvirt and
//! an operator have.
//!
//! Every shim started here gets an environment that keeps the host's own configuration out:
//! the real QEMU comes from `QEMU_LIVEUPGRADE_BINARY`, the config file is one that does not
//! exist, and the control socket goes to a directory the test owns.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{cli_bin, shim_bin, wait_until, Vm};

/// The name the shim is installed as; QEMU's messages start with it.
pub const QEMU_NAME: &str = "qemu-system-x86_64";

/// The shim, invoked as `qemu-system-x86_64` (argv\[0\]), running `qemu` as the real QEMU, with
/// no config file and its control socket in `rundir`.
pub fn shim_command(qemu: &Path, rundir: &Path) -> Command {
    let mut cmd = Command::new(shim_bin());
    cmd.arg0(QEMU_NAME)
        .env("QEMU_LIVEUPGRADE_BINARY", qemu)
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
        .env("QEMU_LIVEUPGRADE_RUNDIR", rundir);
    cmd
}

/// Installs the shim as `<dir>/bin/qemu-system-x86_64` (a symlink), with `real`, if given,
/// as `<dir>/bin/qemu-system-x86_64.real`: the layout `dpkg-divert --rename` leaves behind.
/// Returns the shim's path.
pub fn install_shim(dir: &Path, real: Option<&Path>) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("mkdir {}: {e}", bin.display()));
    let shim = bin.join(QEMU_NAME);
    symlink(shim_bin(), &shim).unwrap_or_else(|e| panic!("symlink {}: {e}", shim.display()));
    if let Some(real) = real {
        let path = bin.join(format!("{QEMU_NAME}.real"));
        symlink(real, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
    }
    shim
}

/// Runs `cmd` in its own process group to completion, reading stdout and stderr to EOF as
/// [`Command::output`] does (and as libvirt does with a probe), but panics if that takes
/// longer than `timeout`: a process left holding the pipes must fail the test, not hang it.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {:?}: {e}", cmd.get_program()));
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            // Its group, which is all of it unless part of it left with setsid.
            let _ = killpg(pid, Signal::SIGKILL);
            panic!("{cmd:?} (pid {pid}) did not exit and close stdout/stderr within {timeout:?}")
        }
    }
}

/// The children of `pid` (proc(5) `/proc/PID/task/TID/children`, over all its threads).
pub fn children(pid: Pid) -> Vec<Pid> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.filter_map(Result::ok) {
        let path = task.path().join("children");
        if let Ok(text) = fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out
}

/// The QEMU the shim `pid` runs: its only child, if it has one.
pub fn qemu_child(pid: Pid) -> Option<Pid> {
    match children(pid)[..] {
        [child] => Some(child),
        _ => None,
    }
}

/// Waits until the shim `pid` has a QEMU child and returns it.
pub fn wait_qemu_child(pid: Pid, timeout: Duration) -> Pid {
    let mut found = None;
    wait_until(timeout, &format!("a QEMU child of pid {pid}"), || {
        found = qemu_child(pid);
        found.is_some()
    });
    found.expect("checked by wait_until")
}

/// Whether `pid` exists and is not a zombie. A process reparented to an init that reaps
/// lazily stays a zombie for a while after it died; it is dead all the same.
pub fn is_running(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any
        // byte, hence the last ')'.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The executable `pid` runs, with symlinks resolved.
pub fn exe_of(pid: Pid) -> PathBuf {
    fs::canonicalize(format!("/proc/{pid}/exe")).unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e}"))
}

/// `pid`'s argv.
pub fn cmdline_of(pid: Pid) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/cmdline: {e}"));
    raw.split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

/// The fds `pid` has open, with the (device, inode) of what each refers to.
pub fn open_fds(pid: Pid) -> Vec<(i32, (u64, u64))> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    let mut fds: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            // stat(2) through the magic link reaches the open file itself, sockets included.
            let st = nix::sys::stat::stat(&e.path()).ok()?;
            Some((fd, (st.st_dev, st.st_ino)))
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// Context switches of every thread of `pid`, voluntary and not (proc(5) `status`). A
/// process asleep in `epoll_wait` adds none.
pub fn ctxt_switches(pid: Pid) -> u64 {
    let dir = format!("/proc/{pid}/task");
    let tasks = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    let mut total = 0;
    for task in tasks.filter_map(Result::ok) {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += rest.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// The launcher's JSON reports (lines with a `"qemu-liveupgrade"` key) on the shim's stderr,
/// in order.
pub fn reports(vm: &Vm) -> Vec<Value> {
    vm.stderr_text()
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("qemu-liveupgrade"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("qemu-liveupgrade").is_some())
        .collect()
}

/// `qemu-liveupgrade status --json PID` for the VM whose shim has `pid`.
pub fn cli_status(rundir: &Path, pid: Pid) -> Value {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["status", "--json", &pid.to_string()])
        .env("QEMU_LIVEUPGRADE_RUNDIR", rundir);
    cli_json(cmd, &format!("status {pid}"))
}

/// `qemu-liveupgrade plan --json -- ARGS`, with `binary` as the real QEMU.
pub fn plan_json<S: AsRef<std::ffi::OsStr>>(binary: &Path, args: &[S]) -> Value {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["plan", "--json", "--"])
        .args(args)
        .env("QEMU_LIVEUPGRADE_BINARY", binary)
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent");
    cli_json(cmd, "plan")
}

/// Runs a `qemu-liveupgrade` command that prints JSON and returns it; panics, naming `what`,
/// if it fails or prints something else.
pub fn cli_json(cmd: Command, what: &str) -> Value {
    let out = output_within(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "qemu-liveupgrade {what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-liveupgrade {what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A shim that daemonized itself (so left the test's process group), killed with SIGKILL
/// when dropped, if it still runs the shim binary; its QEMU follows by `PR_SET_PDEATHSIG`.
pub struct Daemon {
    pid: Pid,
}

impl Daemon {
    /// Takes charge of the daemon whose pid is in `pidfile`.
    pub fn from_pidfile(pidfile: &Path) -> Daemon {
        let mut text = String::new();
        fs::File::open(pidfile)
            .and_then(|mut f| f.read_to_string(&mut text))
            .unwrap_or_else(|e| panic!("pidfile {}: {e}", pidfile.display()));
        let pid = text
            .strip_suffix('\n')
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("pidfile {} holds {text:?}", pidfile.display()));
        Daemon {
            pid: Pid::from_raw(pid),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only while the pid is still the shim: after it exited the number may be reused.
        let ours = fs::canonicalize(format!("/proc/{}/exe", self.pid))
            .is_ok_and(|exe| fs::canonicalize(shim_bin()).is_ok_and(|s| s == exe));
        if ours && is_running(self.pid) {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}
