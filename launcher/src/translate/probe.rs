//! Asking a QEMU binary what it accepts, before a generation is started with it.
//!
//! Version numbers say little here: distributions backport and split builds into modules
//! (Debian's 10.0 has SPICE and OpenGL devices in separate packages), so the binary itself is
//! asked. Two short-lived processes, run side by side:
//! - `BINARY -help`: every command-line option this build accepts for its target. Options
//!   QEMU accepts without listing them are few and internal (`-M`, `-qtest`, `-qtest-log`).
//! - `BINARY -machine none -nodefaults -display none -S -qmp stdio`, fed every question at once
//!   on stdin: `query-version`, `query-machines`, `qom-list-properties` of the VM's machine
//!   type, and `device-list-properties` / `qom-list-properties` for each device driver and
//!   object type the command line uses. Each is asked by name, never by listing every type:
//!   listing makes QEMU load every module, and a build next to another build's modules aborts
//!   on that.
//!
//! A [`Probe`] only reads pipes that are ready, so it can be driven from the supervisor's event
//! loop ([`Probe::fds`], [`Probe::on_readable`]) or to completion by [`run`]. The QMP process
//! is ended once every answer is in; it is signalled through a pidfd, never by pid, because
//! the supervisor reaps every child of its own and a pid may be reused by then.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::child::{self, ChildError, InheritedSignals};
use crate::json::JsonExt;

/// Time a probe gets by default before it is given up.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a binary could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A pipe could not be made.
    #[error("cannot create a pipe for the probe")]
    Pipe(#[source] Errno),
    /// The binary could not be started.
    #[error("cannot start {0}")]
    Spawn(String, #[source] ChildError),
    /// Reading its answers failed.
    #[error("cannot read the probe's output")]
    Read(#[source] Errno),
    /// It ended or stopped answering before every question was answered.
    #[error("{binary} {what}")]
    Incomplete {
        /// The binary.
        binary: String,
        /// What went wrong.
        what: String,
    },
}

/// What a probe asks besides what it always asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Questions {
    /// The machine type whose properties matter (the VM's pinned type).
    pub machine: Option<String>,
    /// Device drivers, as the command line names them.
    pub devices: BTreeSet<String>,
    /// QOM object types of `-object`.
    pub objects: BTreeSet<String>,
}

/// A machine type the binary offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    /// `pc-i440fx-7.2`.
    pub name: String,
    /// `pc` for the newest i440FX type.
    pub alias: Option<String>,
    /// Whether it is the default machine.
    pub default: bool,
}

/// What one binary accepts, as far as a command line's translation needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The binary asked.
    pub binary: PathBuf,
    /// `"10.0.2"`, from `query-version`.
    pub version: Option<String>,
    /// Options without dashes, from `-help`.
    pub options: BTreeSet<String>,
    /// Every machine type.
    pub machines: Vec<MachineType>,
    /// Properties of [`Questions::machine`]; `None` when the binary has no such type or did
    /// not say.
    pub machine_props: Option<BTreeSet<String>>,
    /// For each device driver asked: its properties, or `None` when the binary has no such
    /// device (under that name, nor with `-pci` appended, the form QEMU's aliases take).
    pub devices: BTreeMap<String, Option<BTreeSet<String>>>,
    /// For each object type asked: its properties, or `None` when the binary has none such.
    pub objects: BTreeMap<String, Option<BTreeSet<String>>>,
}

/// Options QEMU accepts without listing them in `-help`: they have no help text.
const UNLISTED: &[&str] = &["M", "qtest", "qtest-log"];

impl Capabilities {
    /// Whether the binary accepts option `name` (without dashes).
    pub fn has_option(&self, name: &str) -> bool {
        self.options.contains(name) || UNLISTED.contains(&name)
    }

    /// Whether the binary has machine type `name`, by name or alias.
    pub fn has_machine(&self, name: &str) -> bool {
        self.machines
            .iter()
            .any(|m| m.name == name || m.alias.as_deref() == Some(name))
    }

    /// Whether the asked machine type has property `prop` (`_` and `-` alike, as QEMU's
    /// `-machine` parsing treats them). `None` when not known.
    pub fn machine_has(&self, prop: &str) -> Option<bool> {
        let props = self.machine_props.as_ref()?;
        Some(props.contains(&prop.replace('_', "-")) || props.contains(prop))
    }

    /// The version for messages: `QEMU 10.0.2 at /usr/bin/qemu-system-x86_64`.
    pub fn describe(&self) -> String {
        match &self.version {
            Some(v) => format!("QEMU {v} at {}", self.binary.display()),
            None => format!("the QEMU at {}", self.binary.display()),
        }
    }
}

/// One pipe read to its end.
#[derive(Debug)]
struct Reader {
    fd: OwnedFd,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    fn new(fd: OwnedFd) -> Result<Reader, ProbeError> {
        let flags =
            nix::fcntl::fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(ProbeError::Pipe)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(ProbeError::Pipe)?;
        Ok(Reader {
            fd,
            buf: Vec::new(),
            eof: false,
        })
    }

    /// Reads what is there without blocking.
    fn pump(&mut self) -> Result<(), ProbeError> {
        let mut chunk = [0u8; 16384];
        while !self.eof {
            match nix::unistd::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(ProbeError::Read(e)),
            }
        }
        Ok(())
    }
}

/// A process of the probe: its pidfd, by which it is signalled safely.
#[derive(Debug)]
struct Process {
    pid: Pid,
    pidfd: Option<OwnedFd>,
}

impl Process {
    fn kill(&self) {
        if let Some(fd) = &self.pidfd {
            pidfd_send_signal(fd, libc::SIGKILL);
        }
    }
}

/// A probe under way.
#[derive(Debug)]
pub struct Probe {
    binary: PathBuf,
    questions: Questions,
    help: Reader,
    qmp: Reader,
    /// The QMP process's stdin, open until the probe ends.
    _stdin: OwnedFd,
    processes: Vec<Process>,
    /// The ids of the questions, in the order asked: `(id, what)`.
    asked: Vec<(u64, Asked)>,
    deadline: Instant,
}

#[derive(Debug, Clone)]
enum Asked {
    Version,
    Machines,
    MachineProps,
    Device(String),
    Object(String),
}

impl Probe {
    /// Starts both processes and sends every question; the probe is given up after `timeout`.
    pub fn start(
        binary: &Path,
        argv0: &OsString,
        questions: &Questions,
        signals: &InheritedSignals,
        timeout: Duration,
    ) -> Result<Probe, ProbeError> {
        let null = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| ProbeError::Pipe(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ProbeError::Pipe);
        let name = binary.display().to_string();
        let mut processes = Vec::new();

        let (help_r, help_w) = pipe()?;
        let spawned = child::spawn(&child::Spec {
            program: binary,
            argv: vec![argv0.clone(), "-help".into()],
            keep: Vec::new(),
            place: Vec::new(),
            stdio: [Some(null.as_fd()), Some(help_w.as_fd()), Some(null.as_fd())],
            signals,
            seccomp: None,
            before_exec: None,
        })
        .map_err(|e| ProbeError::Spawn(name.clone(), e))?;
        processes.push(Process {
            pid: spawned.pid,
            pidfd: pidfd_open(spawned.pid),
        });
        drop(help_w);

        let (in_r, in_w) = pipe()?;
        let (qmp_r, qmp_w) = pipe()?;
        let argv = [
            "-machine",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ];
        let mut full = vec![argv0.clone()];
        full.extend(argv.iter().map(OsString::from));
        let spawned = child::spawn(&child::Spec {
            program: binary,
            argv: full,
            keep: Vec::new(),
            place: Vec::new(),
            stdio: [Some(in_r.as_fd()), Some(qmp_w.as_fd()), Some(null.as_fd())],
            signals,
            seccomp: None,
            before_exec: None,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                processes.iter().for_each(Process::kill);
                return Err(ProbeError::Spawn(name, e));
            }
        };
        processes.push(Process {
            pid: spawned.pid,
            pidfd: pidfd_open(spawned.pid),
        });
        drop((in_r, qmp_w));

        let (asked, script) = script(questions);
        // Small enough for the pipe's buffer: the write does not block, and QEMU reads it at
        // its own pace. stdin stays open until the probe ends: QEMU keeps running after its
        // EOF anyway, and is killed once it has answered.
        let written = nix::unistd::write(&in_w, script.as_bytes());
        if written.map_or(true, |n| n < script.len()) {
            processes.iter().for_each(Process::kill);
            return Err(ProbeError::Incomplete {
                binary: name,
                what: "did not take the probe's questions".into(),
            });
        }
        Ok(Probe {
            _stdin: in_w,
            binary: binary.to_owned(),
            questions: questions.clone(),
            help: Reader::new(help_r)?,
            qmp: Reader::new(qmp_r)?,
            processes,
            asked,
            deadline: Instant::now() + timeout,
        })
    }

    /// The fds to wait on for readability.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.help.fd.as_raw_fd(), self.qmp.fd.as_raw_fd()]
    }

    /// The pids of the probe's processes, which the caller reaps.
    pub fn pids(&self) -> Vec<Pid> {
        self.processes.iter().map(|p| p.pid).collect()
    }

    /// When the probe is given up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads whatever is ready; returns whether the probe has everything (or can get nothing
    /// more). A pipe that fails to read counts as ended: [`Probe::finish`] says what is missing.
    pub fn on_readable(&mut self) -> bool {
        for reader in [&mut self.help, &mut self.qmp] {
            if reader.pump().is_err() {
                reader.eof = true;
            }
        }
        self.is_done()
    }

    /// Whether `-help` has ended and the last question is answered (or the QMP process ended).
    pub fn is_done(&self) -> bool {
        let last = self.asked.last().map(|(id, _)| *id).unwrap_or(0);
        self.help.eof && (self.qmp.eof || replies(&self.qmp.buf).contains_key(&last))
    }

    /// Ends the processes and reads the answers.
    pub fn finish(self) -> Result<Capabilities, ProbeError> {
        self.processes.iter().for_each(Process::kill);
        let incomplete = |what: &str| ProbeError::Incomplete {
            binary: self.binary.display().to_string(),
            what: what.to_owned(),
        };
        if !self.is_done() {
            return Err(incomplete("did not answer in time"));
        }
        let options = help_options(&String::from_utf8_lossy(&self.help.buf));
        if options.is_empty() {
            return Err(incomplete("-help listed no options"));
        }
        let replies = replies(&self.qmp.buf);
        let mut caps = Capabilities {
            binary: self.binary.clone(),
            options,
            ..Capabilities::default()
        };
        let mut got_machines = false;
        for (id, asked) in &self.asked {
            let reply = replies.get(id);
            let ret = reply.and_then(|r| r.get("return"));
            match asked {
                Asked::Version => caps.version = ret.and_then(version_string),
                Asked::Machines => {
                    got_machines = ret.is_some();
                    caps.machines = machines(ret);
                }
                Asked::MachineProps => caps.machine_props = ret.map(property_names),
                Asked::Device(name) => {
                    let props = ret.map(property_names);
                    let entry = caps.devices.entry(name.clone()).or_insert(None);
                    if entry.is_none() {
                        *entry = props;
                    }
                }
                Asked::Object(name) => {
                    caps.objects.insert(name.clone(), ret.map(property_names));
                }
            }
        }
        if !got_machines {
            return Err(incomplete("did not answer query-machines"));
        }
        // Device names asked both as given and with `-pci`: keep one entry per name given.
        caps.devices
            .retain(|name, _| self.questions.devices.contains(name));
        Ok(caps)
    }
}

/// The questions as QMP lines, each with an id, after the capabilities negotiation.
fn script(questions: &Questions) -> (Vec<(u64, Asked)>, String) {
    let mut asked = Vec::new();
    let mut lines = vec![json!({"execute": "qmp_capabilities"})];
    let mut ask = |what: Asked, command: &str, args: Option<Value>| {
        let id = asked.len() as u64 + 1;
        let mut line = json!({"execute": command, "id": id});
        if let Some(a) = args {
            line.put("arguments", a);
        }
        lines.push(line);
        asked.push((id, what));
    };
    ask(Asked::Version, "query-version", None);
    ask(Asked::Machines, "query-machines", None);
    if let Some(m) = &questions.machine {
        let typename = format!("{m}-machine");
        ask(
            Asked::MachineProps,
            "qom-list-properties",
            Some(json!({"typename": typename})),
        );
    }
    for d in &questions.devices {
        for typename in [d.clone(), format!("{d}-pci")] {
            if typename.ends_with("-pci-pci") {
                continue;
            }
            ask(
                Asked::Device(d.clone()),
                "device-list-properties",
                Some(json!({"typename": typename})),
            );
        }
    }
    for o in &questions.objects {
        ask(
            Asked::Object(o.clone()),
            "qom-list-properties",
            Some(json!({"typename": o})),
        );
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    (asked, text)
}

/// The replies with an id, by id.
fn replies(buf: &[u8]) -> BTreeMap<u64, Value> {
    String::from_utf8_lossy(buf)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter_map(|v| Some((v.get("id")?.as_u64()?, v)))
        .collect()
}

/// Option names listed by `-help`: the first word of each line that starts with `-`, where
/// `-fda/-fdb`, `-h or -help` and `--preconfig` list several or spell one differently.
pub fn help_options(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with('-')) {
        let mut words = line.split_whitespace().peekable();
        while let Some(word) = words.next() {
            for name in word.split('/') {
                let name = name.trim_start_matches('-');
                if !name.is_empty() {
                    out.insert(name.to_owned());
                }
            }
            // `-h or -help`: the word after "or" is another name.
            if words.peek() == Some(&"or") {
                words.next();
                continue;
            }
            break;
        }
    }
    out
}

fn version_string(v: &Value) -> Option<String> {
    let q = v.get("qemu")?;
    Some(format!(
        "{}.{}.{}",
        q.get("major")?,
        q.get("minor")?,
        q.get("micro")?
    ))
}

fn machines(ret: Option<&Value>) -> Vec<MachineType> {
    ret.and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|m| {
                    Some(MachineType {
                        name: m.get("name")?.as_str()?.to_owned(),
                        alias: m.get("alias").and_then(Value::as_str).map(str::to_owned),
                        default: m.get("is-default").and_then(Value::as_bool) == Some(true),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn property_names(ret: &Value) -> BTreeSet<String> {
    ret.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|p| p.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A binary file's identity: a package upgrade replaces the file (new inode, times, size), and
/// only then is it asked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The identity of the file `path` names now, following symlinks.
    pub fn of(path: &Path) -> Result<FileKey, Errno> {
        let st = nix::sys::stat::stat(path)?;
        Ok(FileKey {
            path: path.to_owned(),
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        })
    }
}

/// What binaries answered, by file identity and questions, and the probe under way.
#[derive(Debug, Default)]
pub struct ProbeCache {
    known: Vec<(FileKey, Questions, Capabilities)>,
    /// The probe the event loop is driving, if any.
    pub active: Option<Probe>,
}

impl ProbeCache {
    /// The answers for this file and these questions, if asked before.
    pub fn get(&self, key: &FileKey, questions: &Questions) -> Option<&Capabilities> {
        self.known
            .iter()
            .find(|(k, q, _)| k == key && q == questions)
            .map(|(_, _, c)| c)
    }

    /// Keeps answers; those of a replaced file are forgotten.
    pub fn insert(&mut self, key: FileKey, questions: Questions, caps: Capabilities) {
        self.known
            .retain(|(k, _, _)| k.path != key.path || *k == key);
        self.known.push((key, questions, caps));
    }
}

/// Runs a probe to completion, waiting with `poll(2)`, and reaps its processes. For callers
/// without an event loop: the CLI and tests.
pub fn run(
    binary: &Path,
    argv0: &OsString,
    questions: &Questions,
) -> Result<Capabilities, ProbeError> {
    let signals = InheritedSignals::capture();
    let mut probe = Probe::start(binary, argv0, questions, &signals, PROBE_TIMEOUT)?;
    let result = loop {
        if probe.on_readable() {
            break Ok(());
        }
        let left = probe.deadline().saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Ok(());
        }
        let fds = probe.fds();
        // SAFETY: both fds are owned by `probe`, which outlives these borrows.
        let borrowed = fds.map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
        let mut polled: Vec<nix::poll::PollFd> = borrowed
            .iter()
            .map(|fd| nix::poll::PollFd::new(*fd, nix::poll::PollFlags::POLLIN))
            .collect();
        let ms = left.as_millis().min(u16::MAX as u128) as u16;
        match nix::poll::poll(&mut polled, ms) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => break Err(ProbeError::Read(e)),
        }
    };
    let pids = probe.pids();
    let caps = result.and_then(|()| probe.finish());
    for pid in pids {
        let _ = nix::sys::wait::waitpid(pid, None);
    }
    caps
}

/// `pidfd_open(2)`: an fd that names the process for as long as it is not reaped, and that
/// signals only it even after its pid is reused. `None` on kernels before 5.3.
pub(crate) fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`; a process already gone is not an error here.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: fd is an open pidfd; a null siginfo and zero flags are what the call documents
    // for a plain kill.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_spelling() {
        let text =
            "QEMU emulator version 10.0.2\nusage: qemu-system-x86_64 [options] [disk_image]\n\n\
                    Standard options:\n-h or -help     display this help and exit\n\
                    -machine [type=]name[,prop[=value][,...]]\n\
                    -fda/-fdb file  use 'file' as floppy disk 0/1 image\n\
                    --preconfig     pause QEMU before machine is initialized\n\
                    -no-hpet        HPET\n   -not-an-option indented\n";
        let got: Vec<String> = help_options(text).into_iter().collect();
        assert_eq!(
            got,
            ["fda", "fdb", "h", "help", "machine", "no-hpet", "preconfig"]
        );
    }

    #[test]
    fn questions_become_numbered_qmp_lines() {
        let q = Questions {
            machine: Some("pc-i440fx-7.2".into()),
            devices: ["virtio-net".to_owned(), "isa-serial".to_owned()].into(),
            objects: ["secret".to_owned()].into(),
        };
        let (asked, text) = script(&q);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["execute"], "qmp_capabilities");
        assert_eq!(lines[3]["arguments"]["typename"], "pc-i440fx-7.2-machine");
        let devices: Vec<&str> = lines
            .iter()
            .filter(|l| l["execute"] == "device-list-properties")
            .map(|l| l["arguments"]["typename"].as_str().unwrap())
            .collect();
        assert_eq!(
            devices,
            [
                "isa-serial",
                "isa-serial-pci",
                "virtio-net",
                "virtio-net-pci"
            ]
        );
        assert_eq!(asked.len(), lines.len() - 1);
        assert_eq!(lines.last().unwrap()["arguments"]["typename"], "secret");
    }

    #[test]
    fn capabilities_answer_by_name_and_alias() {
        let caps = Capabilities {
            options: ["machine".to_owned(), "no-hpet".to_owned()].into(),
            machines: vec![MachineType {
                name: "pc-i440fx-7.2".into(),
                alias: Some("pc".into()),
                default: true,
            }],
            machine_props: Some(["kernel-irqchip".to_owned(), "hpet".to_owned()].into()),
            ..Capabilities::default()
        };
        assert!(caps.has_option("no-hpet") && caps.has_option("M"));
        assert!(!caps.has_option("no-acpi"));
        assert!(caps.has_machine("pc") && caps.has_machine("pc-i440fx-7.2"));
        assert!(!caps.has_machine("pc-i440fx-10.0"));
        assert_eq!(caps.machine_has("kernel_irqchip"), Some(true));
        assert_eq!(caps.machine_has("acpi"), Some(false));
    }
}
