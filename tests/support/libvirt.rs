//! Driving a real libvirtd (`qemu:///system`) with `virsh`, the way an operator does.
//!
//! libvirtd runs with Debian's packaged `qemu.conf` (`scripts/libvirtd` restores it and
//! starts virtlogd and libvirtd), as hosts run it: the emulator (the shim, and the QEMU it
//! starts) runs as `libvirt-qemu:kvm` with no capabilities, in a private mount namespace,
//! with the files of the domain relabelled to that user, and its stdout and stderr go through
//! virtlogd. So everything a domain uses must be reachable by that user: [`domain_dir`] makes
//! a directory it may enter, and [`install_emulator`] and [`reachable_copy`] put the shim and
//! the guest's kernel there (the test's own `target/` may sit under a home directory it
//! cannot enter).
//!
//! libvirt runs the emulator itself, so a test sees the VM only through libvirt's own
//! records: `virsh` for state and monitor commands, `/run/libvirt/qemu/NAME.pid` for the pid
//! it tracks, `/var/log/libvirt/qemu/NAME.log` for the emulator's stderr (written by
//! virtlogd; the shim's upgrade reports land there), the domain's serial file or pty for the
//! guest's heartbeats, and libvirtd's own log.
//!
//! Anything that talks to libvirtd takes `/work/locks/libvirt.lock` on the shared development
//! machine (`flock /work/locks/libvirt.lock cargo test ...`); the harness itself does not.
//!
//! A [`Domain`] is destroyed and undefined when dropped, test failure or not.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use nix::unistd::{Gid, Group, Pid, Uid, User};
use serde_json::{json, Value};

use crate::paths::repo_root;
use crate::shim::{output_within, QEMU_NAME};
use crate::{cli_bin, shim_bin, tempdir, wait_until, TempDir};

/// The connection every command uses: the system instance, where domains run as root.
pub const URI: &str = "qemu:///system";

/// libvirtd's log, as `scripts/libvirtd` starts it (warnings and errors).
pub const LIBVIRTD_LOG: &str = "/var/log/libvirt/libvirtd.log";

/// How long one `virsh` command may take. Starting a domain whose emulator libvirt has not
/// seen before includes probing it (several QEMU runs).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(90);

/// The user and the group packaged libvirt runs QEMU as (`#user = "libvirt-qemu"` and
/// `#group = "libvirt-qemu"` in Debian's `qemu.conf`).
pub const QEMU_USER: &str = "libvirt-qemu";

/// Makes sure libvirtd answers on [`URI`] with the packaged `qemu.conf` and virtlogd running,
/// by running `scripts/libvirtd` (once per test process; it installs what is missing, puts
/// the packaged `qemu.conf` back if it was changed and restarts libvirtd then, and leaves a
/// libvirtd that is already right alone). Panics naming what is missing: libvirt is part of
/// what these tests check, so its absence is a failure, never a skip.
pub fn ensure_libvirtd() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the libvirt tests drive the system libvirtd ({URI}) and set it up with scripts/libvirtd: run them as root"
        );
        let script = repo_root().join("scripts/libvirtd");
        let out = output_within(Command::new(&script), Duration::from_secs(600));
        assert!(
            out.status.success(),
            "libvirt is not available here: {} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            answers(),
            "{} succeeded but libvirtd still does not answer on {URI}; see {LIBVIRTD_LOG}",
            script.display()
        );
        // `/run/qemu-liveupgrade`, where launchers that run as libvirt-qemu bind their
        // control sockets, is root's to make (the package does at boot); any root
        // qemu-liveupgrade command makes it too.
        let mut list = Command::new(cli_bin());
        list.arg("list").env_remove("QEMU_LIVEUPGRADE_RUNDIR");
        let out = output_within(list, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "qemu-liveupgrade list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure_placer();
    });
}

/// Makes sure the placer service runs (`scripts/placer start`, with this build's CLI): it
/// moves the new vCPU threads of launchers that are not root, libvirt's among them, into the
/// cgroups the old ones were in. The package runs it as a service.
pub fn ensure_placer() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let script = repo_root().join("scripts/placer");
        let mut placer = Command::new(&script);
        placer.arg("start").arg(cli_bin());
        let out = output_within(placer, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// `qemu-liveupgrade status --json VM` as root, with the default directories (as an operator
/// runs it): `Err` carries what the CLI said.
pub fn cli_status(vm: &str) -> Result<Value, String> {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["status", "--json", vm])
        .env_remove("QEMU_LIVEUPGRADE_RUNDIR");
    let out = output_within(cmd, Duration::from_secs(30));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The uid and gid QEMU runs as: user and group [`QEMU_USER`] (64055 and 64055 on Debian;
/// the user's primary group, kvm, is not the one libvirt uses).
pub fn qemu_user() -> (Uid, Gid) {
    let user = User::from_name(QEMU_USER)
        .unwrap_or_else(|e| panic!("looking up user {QEMU_USER}: {e}"))
        .unwrap_or_else(|| panic!("no user {QEMU_USER}: is libvirt-daemon-system installed?"));
    let group = Group::from_name(QEMU_USER)
        .unwrap_or_else(|e| panic!("looking up group {QEMU_USER}: {e}"))
        .unwrap_or_else(|| panic!("no group {QEMU_USER}: is libvirt-daemon-system installed?"));
    (user.uid, group.gid)
}

/// A temporary directory for one domain's files, which [`QEMU_USER`] may enter and list
/// (mode 0755 whatever the umask): QEMU opens the files libvirt relabels for it by path.
pub fn domain_dir() -> TempDir {
    let dir = tempdir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", dir.path().display()));
    dir
}

/// Installs the shim in `dir` (made by [`domain_dir`]) for libvirt: a copy of the binary as
/// `<dir>/bin/qemu-liveupgrade-shim`, `<dir>/bin/qemu-system-x86_64` linking to it, and, if
/// given, `<dir>/bin/qemu-system-x86_64.real` linking to `real`, the layout
/// `dpkg-divert --rename` leaves (libvirt clears the environment, so the shim finds its QEMU
/// there). A copy, not a link into `target/`: [`QEMU_USER`] must be able to execute it.
/// Returns the path for `<emulator>`.
pub fn install_emulator(dir: &Path, real: Option<&Path>) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("mkdir {}: {e}", bin.display()));
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", bin.display()));
    let shim = shim_bin();
    let copy = bin.join(shim.file_name().expect("the shim has a file name"));
    fs::copy(&shim, &copy)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", shim.display(), copy.display()));
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", copy.display()));
    let emulator = bin.join(QEMU_NAME);
    symlink(&copy, &emulator).unwrap_or_else(|e| panic!("symlink {}: {e}", emulator.display()));
    if let Some(real) = real {
        let path = bin.join(format!("{QEMU_NAME}.real"));
        symlink(real, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
    }
    emulator
}

/// Copies `file` (a guest kernel, an initrd) into `dir` (made by [`domain_dir`]), readable by
/// everyone, and returns the copy's path. libvirt's DAC driver hands `<kernel>` and `<initrd>`
/// to [`QEMU_USER`] while the domain runs, but QEMU still needs to reach them by path.
pub fn reachable_copy(dir: &Path, file: &Path) -> PathBuf {
    let copy = dir.join(file.file_name().expect("a file name"));
    fs::copy(file, &copy)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", file.display(), copy.display()));
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", copy.display()));
    copy
}

/// The real uid and gid of process `pid` (proc(5) `status`: `Uid:` and `Gid:`, real first).
pub fn credentials(pid: Pid) -> (Uid, Gid) {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("{path} has no {name} line"))
    };
    (Uid::from_raw(field("Uid:")), Gid::from_raw(field("Gid:")))
}

fn answers() -> bool {
    let Ok(out) = Command::new("virsh").args(["-c", URI, "version"]).output() else {
        return false;
    };
    out.status.success()
}

/// Runs `virsh -c qemu:///system ARGS`, to completion within a deadline.
pub fn virsh(args: &[&str]) -> Output {
    let mut cmd = Command::new("virsh");
    cmd.args(["-c", URI]).args(args);
    output_within(cmd, VIRSH_TIMEOUT)
}

/// [`virsh`] that must succeed; returns its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`virsh`] that may fail: `Err` carries virsh's error text.
pub fn try_virsh(args: &[&str]) -> Result<String, String> {
    let out = virsh(args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A name no other domain on this host has: `qlu-<test pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// What a heartbeat-guest domain is made of.
pub struct HeartbeatDomain<'a> {
    /// Domain name.
    pub name: &'a str,
    /// `<emulator>`: the shim.
    pub emulator: &'a Path,
    /// `<kernel>`: the heartbeat ELF.
    pub kernel: &'a Path,
    /// The serial console's file.
    pub serial: &'a Path,
    /// Guest RAM.
    pub mem_mib: u64,
}

impl HeartbeatDomain<'_> {
    /// The domain XML: TCG, `pc`, one vCPU, the heartbeat guest told its RAM size, ACPI on
    /// (the power button and PCI hot-unplug go through it), COM1 to a file (appended to,
    /// not truncated, at each start), and none of the devices libvirt adds by default (USB
    /// controller, balloon), so that every PCI device after boot is one the test put there.
    pub fn xml(&self) -> String {
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <cmdline>mem={mem}M</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
            name = self.name,
            mem = self.mem_mib,
            kernel = self.kernel.display(),
            emulator = self.emulator.display(),
            serial = self.serial.display(),
        )
    }
}

/// A persistent domain, destroyed and undefined on drop.
pub struct Domain {
    name: String,
    serial: PathBuf,
}

impl Domain {
    /// Defines the domain `xml` (named `name`, serial console in `serial`) without starting it.
    pub fn define(name: &str, xml: &str, serial: &Path) -> Domain {
        let file = serial.with_file_name(format!("{name}.xml"));
        fs::write(&file, xml).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        // The guard exists before libvirt knows the domain: a define that half-worked is
        // cleaned up too.
        let domain = Domain {
            name: name.to_owned(),
            serial: serial.to_owned(),
        };
        virsh_ok(&["define", &file.display().to_string()]);
        domain
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `virsh start`.
    pub fn start(&self) {
        virsh_ok(&["start", &self.name]);
    }

    /// `virsh domstate`: `running`, `paused`, `shut off`...
    pub fn state(&self) -> String {
        virsh_ok(&["domstate", &self.name]).trim().to_owned()
    }

    /// `virsh domstate --reason`: `shut off (shutdown)`, `running (booted)`...
    pub fn state_reason(&self) -> String {
        virsh_ok(&["domstate", "--reason", &self.name])
            .trim()
            .to_owned()
    }

    /// The `State:` line of `virsh dominfo`.
    pub fn dominfo_state(&self) -> String {
        virsh_ok(&["dominfo", &self.name])
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| panic!("virsh dominfo {} has no State line", self.name))
    }

    /// Waits until `virsh domstate` says `state`.
    pub fn wait_state(&self, state: &str, timeout: Duration) {
        let mut last = String::new();
        wait_until(
            timeout,
            &format!("domain {} to be {state}", self.name),
            || {
                last = self.state();
                last == state
            },
        );
    }

    /// The pid libvirt tracks for the running domain (`/run/libvirt/qemu/NAME.pid`): the
    /// process it executed as `<emulator>`.
    pub fn pid(&self) -> Pid {
        let path = format!("/run/libvirt/qemu/{}.pid", self.name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Pid::from_raw(
            text.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{path} holds {text:?}")),
        )
    }

    /// Runs a QMP command through libvirt's own monitor connection
    /// (`virsh qemu-monitor-command`); `Err` is QMP's error object, or virsh's message as
    /// a string if libvirt refused.
    pub fn qmp(&self, cmd: &str, args: Value) -> Result<Value, Value> {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let out = virsh(&["qemu-monitor-command", &self.name, &msg.to_string()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(Value::String(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        let mut reply: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("qemu-monitor-command {cmd}: not JSON ({e}): {stdout}"));
        if let Some(ret) = reply.get_mut("return") {
            return Ok(ret.take());
        }
        Err(reply.get_mut("error").map(Value::take).unwrap_or(reply))
    }

    /// The thread id of vCPU `index` in the running QEMU, as `query-cpus-fast` through
    /// libvirt's monitor connection says.
    pub fn vcpu_tid(&self, index: u64) -> Pid {
        let cpus = self.qmp_ok("query-cpus-fast", Value::Null);
        let tid = cpus
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["cpu-index"].as_u64() == Some(index))
            .and_then(|c| c["thread-id"].as_i64())
            .unwrap_or_else(|| panic!("query-cpus-fast has no vCPU {index}: {cpus}"));
        Pid::from_raw(tid as i32)
    }

    /// The cgroups (`/proc/TID/cgroup` lines) of vCPU `index`'s thread.
    pub fn vcpu_cgroups(&self, index: u64) -> Vec<String> {
        let tid = self.vcpu_tid(index);
        let path = format!("/proc/{tid}/cgroup");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether vCPU `index`'s thread is in libvirt's own cgroup for it (`.../vcpu<index>`,
    /// cgroup v1 or v2).
    pub fn vcpu_in_libvirt_cgroup(&self, index: u64) -> bool {
        let leaf = format!("/vcpu{index}");
        self.vcpu_cgroups(index).iter().any(|l| l.ends_with(&leaf))
    }

    /// [`Domain::qmp`] that must succeed.
    pub fn qmp_ok(&self, cmd: &str, args: Value) -> Value {
        self.qmp(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd} through libvirt failed: {e}"))
    }

    /// The emulator's stderr as libvirt keeps it.
    pub fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    /// The domain log's length now: a mark for [`Domain::log_since`].
    pub fn log_mark(&self) -> u64 {
        fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }

    /// The domain log from `mark` on.
    pub fn log_since(&self, mark: u64) -> String {
        let bytes = fs::read(self.log_path()).unwrap_or_default();
        let from = (mark as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// The launcher's upgrade reports in the domain log, in order.
    pub fn reports(&self) -> Vec<Value> {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with('{') && l.contains("qemu-liveupgrade"))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("qemu-liveupgrade").is_some())
            .collect()
    }

    /// Waits for report number `index` (0-based) in the domain log and returns it.
    pub fn wait_report(&self, index: usize, timeout: Duration) -> Value {
        wait_until(timeout, "the upgrade report in the domain log", || {
            self.reports().len() > index
        });
        self.reports()[index].clone()
    }

    /// The guest's serial console so far.
    pub fn serial(&self) -> SerialLog {
        SerialLog::read(&self.serial)
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        let tail = |path: &Path, n: usize| -> String {
            let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})\n"));
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let _ = writeln!(s, "---- {} (last 40 lines) ----", self.log_path().display());
        let _ = writeln!(s, "{}", tail(&self.log_path(), 40));
        let _ = writeln!(s, "---- {} (last 10 lines) ----", self.serial.display());
        let _ = writeln!(s, "{}", tail(&self.serial, 10));
        let _ = writeln!(s, "---- {LIBVIRTD_LOG} (last 20 lines) ----");
        let _ = writeln!(s, "{}", tail(Path::new(LIBVIRTD_LOG), 20));
        s
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        // Either may fail: the domain may be shut off already, or never defined.
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        if !thread::panicking() {
            let _ = fs::remove_file(self.log_path());
        }
    }
}

/// Points `link` at `target`, atomically (rename(2) over the old link), as a package
/// upgrade replaces the binary a path names.
pub fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).unwrap_or_else(|e| panic!("symlink {}: {e}", tmp.display()));
    fs::rename(&tmp, link).unwrap_or_else(|e| panic!("rename to {}: {e}", link.display()));
}

/// Byte length of libvirtd's log now: a mark to read what it logs after it.
pub fn libvirtd_log_mark() -> u64 {
    fs::metadata(LIBVIRTD_LOG).map(|m| m.len()).unwrap_or(0)
}

/// libvirtd's log between two marks.
pub fn libvirtd_log_between(from: u64, to: u64) -> String {
    let bytes = fs::read(LIBVIRTD_LOG).unwrap_or_default();
    let to = (to as usize).min(bytes.len());
    let from = (from as usize).min(to);
    String::from_utf8_lossy(&bytes[from..to]).into_owned()
}

/// The error lines of a libvirtd log excerpt that concern domain `name` or a monitor
/// (libvirt names the domain in most messages; monitor trouble comes from
/// `qemuMonitor*` functions, which do not).
pub fn libvirtd_errors(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(": error :"))
        .filter(|l| l.contains(name) || l.to_ascii_lowercase().contains("monitor"))
        .map(str::to_owned)
        .collect()
}

/// One `HB <counter> err=<n> pass=<n>` line of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// +1 per heartbeat within one boot.
    pub counter: u64,
    /// Memory-check mismatches so far.
    pub err: u64,
}

/// The guest's serial file, read at one moment: complete lines only.
#[derive(Debug, Default)]
pub struct SerialLog {
    lines: Vec<String>,
}

impl SerialLog {
    /// The latest heartbeat in `path`, reading only the file's end (the file grows by some
    /// 20 KiB a second; polling it whole would cost more than the guest's work).
    pub fn last_beat(path: &Path) -> Option<Beat> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete.lines().rev().find_map(parse_beat)
    }

    /// Reads `path` (missing: empty).
    pub fn read(path: &Path) -> SerialLog {
        let bytes = fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        // The last line is still being written unless the text ends with a newline.
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        SerialLog {
            lines: complete.lines().map(str::to_owned).collect(),
        }
    }

    /// Lines of the latest boot: from the last `BOOT` line on.
    pub fn current_boot(&self) -> &[String] {
        let start = self
            .lines
            .iter()
            .rposition(|l| l.contains("BOOT tsc_per_ms="))
            .unwrap_or(0);
        &self.lines[start..]
    }

    /// Number of boots seen.
    pub fn boots(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.contains("BOOT tsc_per_ms="))
            .count()
    }

    /// Heartbeats of the latest boot, oldest first.
    pub fn beats(&self) -> Vec<Beat> {
        self.current_boot()
            .iter()
            .filter_map(|l| parse_beat(l))
            .collect()
    }

    /// The latest heartbeat counter of the latest boot (0: none yet).
    pub fn last_counter(&self) -> u64 {
        self.beats().last().map_or(0, |b| b.counter)
    }

    /// Whether the latest boot printed a line containing `needle`.
    pub fn boot_contains(&self, needle: &str) -> bool {
        self.current_boot().iter().any(|l| l.contains(needle))
    }

    /// The guest's `ERR addr=...` lines, all boots.
    pub fn err_lines(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l.contains("ERR addr="))
            .cloned()
            .collect()
    }

    /// Checks the latest boot's heartbeats: consecutive counters, `err=0` throughout, no
    /// `ERR` line. Returns what is wrong, if anything.
    pub fn problems(&self) -> Option<String> {
        let beats = self.beats();
        if let Some(bad) = beats.iter().find(|b| b.err != 0) {
            return Some(format!("heartbeat {} reports err={}", bad.counter, bad.err));
        }
        let errs = self.err_lines();
        if !errs.is_empty() {
            return Some(format!("guest memory errors: {errs:?}"));
        }
        beats
            .windows(2)
            .find(|p| p[1].counter != p[0].counter + 1)
            .map(|p| {
                format!(
                    "heartbeats not consecutive: {} then {}",
                    p[0].counter, p[1].counter
                )
            })
    }
}

fn parse_beat(line: &str) -> Option<Beat> {
    let mut words = line.strip_prefix("HB ")?.split(' ');
    let counter = words.next()?.parse().ok()?;
    let err = words.find_map(|w| w.strip_prefix("err="))?.parse().ok()?;
    Some(Beat { counter, err })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_latest_boot_of_a_serial_file() {
        let dir = crate::tempdir();
        let path = dir.join("serial.log");
        fs::write(
            &path,
            "BOOT tsc_per_ms=1 acpi_pm=0x600\nREADY mem=1\nHB 1 err=0 pass=0\nHB 2 err=0 pass=0\nPOWEROFF\n\
             BOOT tsc_per_ms=1 acpi_pm=0x600\nHB 1 err=0 pass=0\nHB 2 err=0 pass=0\nHB 3 err=0 pa",
        )
        .unwrap();
        let log = SerialLog::read(&path);
        assert_eq!(log.boots(), 2);
        assert_eq!(log.last_counter(), 2, "the partial last line is not read");
        assert!(!log.boot_contains("POWEROFF"));
        assert_eq!(log.problems(), None);
        fs::write(&path, "HB 1 err=0 pass=0\nHB 3 err=1 pass=0\n").unwrap();
        let log = SerialLog::read(&path);
        assert!(log.problems().unwrap().contains("err=1"));
    }

    #[test]
    fn finds_domain_and_monitor_errors_in_libvirtd_log() {
        let log = "2026-01-01 00:00:00.000+0000: 1: error : virNetSocketReadWire:1793 : End of file while reading data: Input/output error\n\
                   2026-01-01 00:00:00.000+0000: 1: error : qemuMonitorIO:123 : internal error: End of file from qemu monitor\n\
                   2026-01-01 00:00:00.000+0000: 1: warning : qemuDomainObjTaint:1 : Domain id=1 name='qlu-1-0' is tainted\n\
                   2026-01-01 00:00:00.000+0000: 1: error : qemuProcessReportLogError:1 : internal error: qemu unexpectedly closed the monitor: qlu-1-0\n";
        let errors = libvirtd_errors(log, "qlu-1-0");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("qemuMonitorIO"));
    }
}
