//! The domain the lifecycle suite runs every libvirt operation on, once with Debian's QEMU as
//! its `<emulator>` and once with the shim, under libvirtd with its packaged `qemu.conf`.
//!
//! The guest is the Linux test guest (`tests/linux-guest/`) booted with `memcheck=`: it keeps
//! checking a pattern it wrote into RAM, carries the tiny guest agent, brings hot-plugged
//! vCPUs online, powers off on the ACPI button, and prints a numbered `STAT` line with those
//! counters about every 100-200 ms on its virtio console. That console is a file here
//! ([`GuestLog`] reads it), so what the guest says is kept across restores, restarts and
//! upgrades; its serial console is a pty, for `virsh console`.
//!
//! The domain has what the operations need: a qcow2 virtio disk (block jobs, snapshots; the
//! guest writes fsync'd records to it), a NIC on a tap libvirt creates (`domifstat`; the guest
//! sends nothing on it), a balloon, one vCPU of two, the guest agent's channel.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use serde_json::Value;

use crate::libvirt::{
    domain_dir, install_emulator, reachable_copy, repoint, try_virsh, unique_name, virsh, Domain,
};
use crate::linux::linux_guest;
use crate::shim::output_within;
use crate::{qemu_build, wait_until, TempDir};

pub use crate::lifecycle::Runner;

/// Debian's QEMU, as packaged: the plain domain's `<emulator>`, the shim's first real QEMU.
pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The build upgrades alternate with: another 7.2 (libvirt 9.0 cannot probe 10.0, and a
/// restore or start after an upgrade starts whatever QEMU is installed then).
pub const OTHER_QEMU: &str = "7.2.18";
/// MiB of guest RAM the guest keeps checking.
const MEMCHECK_MIB: u64 = 16;
/// How long a boot, or a memory check pass after an operation, may take.
const GUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the shim's upgrade report may take to appear.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(90);

/// One `STAT` line of the guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    /// Its number in this boot.
    pub k: u64,
    /// Memory check passes that found the pattern intact, and those that did not.
    pub mem_good: u64,
    /// See `mem_good`.
    pub mem_bad: u64,
    /// MemTotal in kB: smaller while the balloon holds memory.
    pub ramkb: u64,
    /// The online CPUs, as `/sys/devices/system/cpu/online` lists them (`0`, `0-1`).
    pub cpus: String,
}

/// What the guest wrote on its virtio console, from a byte offset on: boots and status lines.
#[derive(Clone, Debug, Default)]
pub struct GuestLog {
    /// `READY` lines seen (boots that got as far as their status loop).
    pub boots: usize,
    /// The `STAT` lines, in order, with the boot each belongs to (1-based, counted from the
    /// offset read from).
    pub stats: Vec<(usize, Stat)>,
    /// `FAIL` lines: the guest's /init reporting a failure (a memory check that failed).
    pub fails: Vec<String>,
}

impl GuestLog {
    /// Reads `path` from byte `from` on; only complete lines.
    pub fn read(path: &Path, from: u64) -> GuestLog {
        let bytes = fs::read(path).unwrap_or_default();
        let start = (from as usize).min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]);
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        let mut log = GuestLog::default();
        for line in complete.lines() {
            if line.contains("READY ") {
                log.boots += 1;
            } else if let Some(stat) = parse_stat(line) {
                log.stats.push((log.boots, stat));
            } else if line.starts_with("FAIL") {
                log.fails.push(line.to_owned());
            }
        }
        log
    }

    /// The latest status line.
    pub fn last(&self) -> Option<&Stat> {
        self.stats.last().map(|(_, s)| s)
    }
}

fn parse_stat(line: &str) -> Option<Stat> {
    let rest = line.strip_prefix("STAT ")?;
    let mut words = rest.split(' ');
    let k = words.next()?.parse().ok()?;
    let field = |name: &str| {
        rest.split(' ')
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
    };
    let (good, bad) = field("mem=")?
        .split_once('/')
        .map(|(g, b)| (g.to_owned(), b.to_owned()))?;
    Some(Stat {
        k,
        mem_good: good.parse().ok()?,
        mem_bad: bad.parse().ok()?,
        ramkb: field("ramkb=")?.parse().ok()?,
        cpus: field("cpus=")?,
    })
}

/// A point in the guest's console output, taken before an operation.
#[derive(Clone, Debug)]
pub struct Mark {
    /// Byte offset of the console file.
    offset: u64,
    /// The last status line before it.
    last: Option<Stat>,
}

/// How the guest came out of an operation, judged from inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestView {
    /// `continued` (the next status line followed the last), `rebooted`, `went back` (a
    /// status line number already seen: a snapshot's state came back), `skipped` (numbers
    /// missing), `silent` (no status line at all), or `off` (the domain does not run).
    pub course: String,
    /// `intact` once a memory check passed after the operation and none ever failed,
    /// `CORRUPT` otherwise.
    pub memory: String,
    /// Online CPUs afterwards.
    pub cpus: String,
    /// MemTotal afterwards, MiB.
    pub ram_mib: u64,
}

/// `rebooted` (a new boot began), `silent` (no status line), `went back` (a number already
/// seen came again: a snapshot's state), `skipped N` (numbers missing), else `continued`.
fn course(log: &GuestLog, last_before: Option<u64>) -> String {
    if log.boots > 0 {
        return "rebooted".into();
    }
    if log.stats.is_empty() {
        return "silent".into();
    }
    let mut prev = last_before;
    let mut skipped = 0;
    for (_, s) in &log.stats {
        match prev {
            Some(p) if s.k <= p => return "went back".into(),
            Some(p) => skipped += s.k - p - 1,
            None => {}
        }
        prev = Some(s.k);
    }
    if skipped > 0 {
        format!("skipped {skipped}")
    } else {
        "continued".into()
    }
}

/// The lifecycle domain of one runner, destroyed and undefined (with its managed save and
/// snapshot metadata) when dropped.
pub struct LcDomain {
    /// Plain QEMU or the shim.
    pub runner: Runner,
    /// libvirt's handle.
    pub dom: Domain,
    /// The domain's files: emulator, kernel, disks, console, save files.
    pub dir: TempDir,
    /// The guest's virtio console, a file.
    pub console: PathBuf,
    /// The shim's `.real` link (the shim runner only).
    real: Option<PathBuf>,
    /// Upgrades done so far.
    upgrades: usize,
}

impl LcDomain {
    /// Defines the domain (not started), named `lc-<runner>-<pid>-<n>`.
    pub fn define(runner: Runner) -> LcDomain {
        let dir = domain_dir();
        let guest = linux_guest();
        let kernel = reachable_copy(dir.path(), &guest.kernel);
        let initrd = reachable_copy(dir.path(), &guest.initrd);
        let (emulator, real) = match runner {
            Runner::Plain => (PathBuf::from(SYSTEM_QEMU), None),
            Runner::Shim => {
                let emulator = install_emulator(dir.path(), Some(Path::new(SYSTEM_QEMU)));
                (emulator, Some(dir.join("bin/qemu-system-x86_64.real")))
            }
        };
        qemu_build(OTHER_QEMU);
        let disk = dir.join("disk.qcow2");
        create_qcow2(&disk, "16M");
        let console = dir.join("console.log");
        let name = unique_name(match runner {
            Runner::Plain => "lc-plain",
            Runner::Shim => "lc-shim",
        });
        let xml = domain_xml(&name, &emulator, &kernel, &initrd, &disk, &console);
        let dom = Domain::define(&name, &xml, &console);
        LcDomain {
            runner,
            dom,
            dir,
            console,
            real,
            upgrades: 0,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.dom.name()
    }

    /// A path in its directory, as text for virsh.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Starts it and waits until the guest has booted and checked its memory once.
    pub fn boot(&self) {
        let mark = self.mark();
        self.dom.start();
        self.wait_guest(&mark, |log| {
            log.boots >= 1 && log.last().is_some_and(|s| s.mem_good >= 1)
        });
    }

    /// A mark in the guest's output, for [`LcDomain::guest_after`].
    pub fn mark(&self) -> Mark {
        let offset = fs::metadata(&self.console).map_or(0, |m| m.len());
        Mark {
            offset,
            last: GuestLog::read(&self.console, 0).last().cloned(),
        }
    }

    fn wait_guest(&self, mark: &Mark, mut done: impl FnMut(&GuestLog) -> bool) -> GuestLog {
        let mut log = GuestLog::default();
        let what = format!("the guest of {} ({})", self.name(), self.runner);
        wait_until(GUEST_TIMEOUT, &what, || {
            log = GuestLog::read(&self.console, mark.offset);
            done(&log) || !log.fails.is_empty()
        });
        log
    }

    /// How the guest came out of what happened since `mark`. If the domain runs, first waits
    /// for a memory check pass that began after now: the second from now in the same boot,
    /// or the first of a boot that began since.
    pub fn guest_after(&self, mark: &Mark) -> GuestView {
        let running = self.dom.state() == "running";
        let log = if running {
            let now = GuestLog::read(&self.console, mark.offset);
            let (boot, good) = now
                .stats
                .last()
                .map_or((now.boots, 0), |(b, s)| (*b, s.mem_good));
            self.wait_guest(mark, |log| match log.stats.last() {
                Some((b, s)) if *b > boot => s.mem_good >= 1,
                Some((_, s)) => s.mem_good >= good + 2,
                None => false,
            })
        } else {
            GuestLog::read(&self.console, mark.offset)
        };
        let course = if running {
            course(&log, mark.last.as_ref().map(|s| s.k))
        } else {
            "off".to_owned()
        };
        let last = log.last().or(mark.last.as_ref());
        let intact = log.fails.is_empty()
            && log.stats.iter().all(|(_, s)| s.mem_bad == 0)
            && (!running || log.last().is_some_and(|s| s.mem_good > 0));
        GuestView {
            course,
            memory: if intact { "intact" } else { "CORRUPT" }.to_owned(),
            cpus: last.map(|s| s.cpus.clone()).unwrap_or_default(),
            ram_mib: last.map_or(0, |s| s.ramkb >> 10),
        }
    }

    /// `virsh domstate --reason`, or `gone` for a domain libvirt no longer knows.
    pub fn state(&self) -> String {
        try_virsh(&["domstate", "--reason", self.name()])
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "gone".into())
    }

    /// Upgrades the shim's QEMU in place: `.real` repointed at the other build, SIGUSR2 to
    /// the pid libvirt tracks, and the report awaited. Panics unless it went through.
    pub fn upgrade(&mut self) -> Value {
        let real = self.real.as_ref().expect("only a shim domain upgrades");
        self.upgrades += 1;
        let to = if self.upgrades % 2 == 1 {
            qemu_build(OTHER_QEMU)
        } else {
            PathBuf::from(SYSTEM_QEMU)
        };
        repoint(real, &to);
        let before = self.dom.reports().len();
        kill(self.dom.pid(), Signal::SIGUSR2).expect("SIGUSR2 to the shim");
        let report = self.dom.wait_report(before, UPGRADE_TIMEOUT);
        assert_eq!(
            report["result"],
            "ok",
            "upgrade of {}: {report}",
            self.name()
        );
        report
    }
}

impl Drop for LcDomain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", self.name()]);
        // What would keep `undefine` from working: a managed save, snapshot metadata.
        let _ = virsh(&[
            "undefine",
            "--managed-save",
            "--snapshots-metadata",
            self.name(),
        ]);
    }
}

/// The domain XML: q35, TCG, 256 MiB, one vCPU of two, the Linux guest with its memory
/// check, the disk, the NIC, both consoles, the agent channel, the balloon.
fn domain_xml(
    name: &str,
    emulator: &Path,
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    console: &Path,
) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>256</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet cryptomgr.notests panic=-1 memcheck={MEMCHECK_MIB}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='file'>
      <source path='{console}' append='on'/>
      <target type='virtio' port='1'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='virtio'/>
  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        emulator = emulator.display(),
        disk = disk.display(),
        console = console.display(),
    )
}

/// Creates an empty qcow2 image of `size` (`16M`) at `path`.
pub fn create_qcow2(path: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &path.display().to_string(),
        size,
    ]);
}

/// Runs `qemu-img ARGS`, which must succeed.
pub fn qemu_img(args: &[&str]) -> String {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    let out = output_within(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "qemu-img {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `/usr/lib/libvirt/libvirt-guests.sh ACTION` (`stop`, `start`) as Debian ships it,
/// with `ON_SHUTDOWN=suspend` and `ON_BOOT=start`: in a mount namespace of its own where
/// `/etc/default/libvirt-guests` is that configuration and its state files
/// (`/var/lib/libvirt/libvirt-guests`, `/var/lock/libvirt-guests`) are in `state`, so the
/// host's are left alone. It acts on every running persistent domain of the system libvirtd,
/// as at a host's shutdown: the caller makes sure only its own run. Returns its output.
pub fn libvirt_guests(state: &Path, action: &str) -> String {
    const SCRIPT: &str = "/usr/lib/libvirt/libvirt-guests.sh";
    assert!(
        Path::new(SCRIPT).is_file(),
        "{SCRIPT} is missing (package libvirt-daemon)"
    );
    let conf = state.join("libvirt-guests.conf");
    let lib = state.join("lib");
    let lock = state.join("lock");
    for d in [&lib, &lock] {
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    fs::write(&conf, "URIS=default\nON_BOOT=start\nON_SHUTDOWN=suspend\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
    let _ = fs::set_permissions(&conf, fs::Permissions::from_mode(0o644));
    let script = format!(
        "mount --bind {conf} /etc/default/libvirt-guests && \
         mount --bind {lib} /var/lib/libvirt && \
         mount --bind {lock} /run/lock && \
         exec sh {SCRIPT} {action}",
        conf = conf.display(),
        lib = lib.display(),
        lock = lock.display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = output_within(cmd, Duration::from_secs(300));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "libvirt-guests.sh {action} failed ({}): {text}",
        out.status
    );
    text
}

/// The running domains libvirt knows, by name.
pub fn running_domains() -> Vec<String> {
    try_virsh(&["list", "--name"])
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `virsh console --force NAME` on a terminal of its own (`script`: virsh wants one) for
/// `for_how_long`; what it printed.
pub fn console_output(name: &str, for_how_long: Duration) -> String {
    let command = format!("virsh -c {} console --force {name}", crate::libvirt::URI);
    let secs = format!("{}", for_how_long.as_secs_f64());
    let mut cmd = Command::new("timeout");
    cmd.args([&secs, "script", "-qfec", &command, "/dev/null"]);
    let out = output_within(cmd, for_how_long + Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
