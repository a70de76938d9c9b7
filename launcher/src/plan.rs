//! `qemu-liveupgrade plan`: what the launcher would do with a command line, without doing it.
//!
//! It shows the argv the first QEMU generation gets and every resource the launcher keeps
//! stable across generations, so an operator can check an installation before trusting a VM to
//! it, and tests can check the command-line model against real libvirt and script argvs.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cmdline::CmdLine;
use crate::generation::{generation_cmdline, Base, GenArgs, Layout};
use crate::listeners::graphics;
use crate::resolve::{self, Binary};
use crate::resources::{resources, Resources};
use crate::translate::{self, probe, Change, Questions};
use crate::verdict::{Reason, Verdict};

/// The launcher's plan for one command line.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The real QEMU, or why none was found.
    pub binary: Result<Binary, String>,
    /// The first generation's argv, argv[0] included.
    pub argv: Vec<OsString>,
    /// What stays stable across generations.
    pub resources: Resources,
    /// The fd layout every generation gets.
    pub layout: Layout,
    /// Guest RAM the launcher owns: backend id, bytes, huge pages, huge page size (0: the
    /// kernel's default).
    pub ram: Vec<(String, u64, bool, u64)>,
    /// Why guest RAM is not shared, when it is not.
    pub unshared: Option<String>,
    /// Socket servers the launcher serves itself: where clients connect, and what it carries.
    pub served: Vec<(String, String)>,
    /// Taps the launcher opens by name: interface name and queue count.
    pub taps: Vec<(String, usize)>,
    /// Labels of the ptys the launcher opens and relays.
    pub ptys: Vec<String>,
    /// Whether the launcher daemonizes itself.
    pub daemonize: bool,
    /// The pidfile the launcher writes with its own pid.
    pub pidfile: Option<OsString>,
    /// The displays whose ports the launcher holds: protocol and where viewers connect.
    pub displays: Vec<(String, String)>,
    /// Whether the VM could be upgraded, and every reason it could not.
    pub verdict: Verdict,
    /// What generation 2 would run on the binary of `plan --to`, once [`Plan::upgrade_to`]
    /// has asked it.
    pub next: Option<NextGeneration>,
    base: Base,
}

/// The generation an upgrade to a given binary would start.
#[derive(Debug, Clone)]
pub struct NextGeneration {
    /// The binary, and its version once asked.
    pub binary: PathBuf,
    /// `"10.0.2"`.
    pub version: Option<String>,
    /// The machine type every later generation is pinned to.
    pub machine: Option<String>,
    /// Its argv, argv\[0\] included, translated; empty when it cannot be given one.
    pub argv: Vec<OsString>,
    /// The translations, in command-line order.
    pub changes: Vec<Change>,
    /// Why the binary could not be asked, if it could not.
    pub error: Option<String>,
}

impl Plan {
    /// Plans `cmd` as if the shim had been invoked as `argv0`, assuming every fd the command
    /// line names will be passed open.
    pub fn new(argv0: &OsStr, cmd: &CmdLine) -> Plan {
        let base = Base::assuming_named_open(cmd);
        let mut verdict = base.verdict.clone();
        if let Some(why) = &base.unshared {
            verdict.note(Reason::new(
                "guest RAM",
                format!("not shared ({why}): it crosses in the migration stream, which takes seconds and a second copy of it"),
            ));
        }
        if let Some(from) = resources(cmd).incoming {
            verdict.note(Reason::new(
                format!("-incoming {from}"),
                "the first QEMU starts by loading the VM's state; upgrades are refused until it \
                 has loaded (run state no longer inmigrate)",
            ));
        }
        let mut argv = vec![argv0.to_owned()];
        let args = GenArgs {
            displays: graphics::Sockets::placeholders(&base.displays),
            ..GenArgs::default()
        };
        argv.extend(generation_cmdline(&base, &args).to_args());
        Plan {
            binary: resolve::resolve(argv0).map_err(|e| e.to_string()),
            argv,
            resources: resources(cmd),
            layout: base.layout.clone(),
            ram: base
                .regions
                .iter()
                .map(|r| (r.id.clone(), r.size, r.hugetlb, r.page_size))
                .collect(),
            unshared: base.unshared.clone(),
            taps: base
                .taps
                .iter()
                .map(|t| (t.ifname.clone(), t.queues))
                .collect(),
            ptys: base.ptys.iter().map(|p| p.label.clone()).collect(),
            served: base
                .proxied
                .iter()
                .map(|p| (p.listen.to_string(), format!("{:?}", p.mode).to_lowercase()))
                .collect(),
            daemonize: cmd.has("daemonize"),
            pidfile: cmd.opts("pidfile").last().and_then(|o| o.arg.clone()),
            displays: base
                .displays
                .iter()
                .map(|d| {
                    let at = match &d.listen {
                        graphics::Listen::Tcp { endpoint, .. } => endpoint.to_string(),
                        graphics::Listen::Path(p) => format!("unix:{}", p.display()),
                    };
                    (d.protocol.name().to_owned(), at)
                })
                .collect(),
            verdict,
            next: None,
            base,
        }
    }

    /// Asks the first generation's binary which versioned type the argv's machine stands for
    /// and `to` what it accepts, and plans generation 2 on `to`: its argv, translated, and any
    /// reason it cannot start there added to the verdict.
    pub fn upgrade_to(&mut self, to: &Path) {
        let argv0 = self.argv.first().cloned().unwrap_or_default();
        let mut next = NextGeneration {
            binary: to.to_owned(),
            version: None,
            machine: None,
            argv: Vec::new(),
            changes: Vec::new(),
            error: None,
        };
        // The machine type: what the first QEMU resolves an alias or the default to.
        let asked = self
            .base
            .cmd
            .opts("machine")
            .filter_map(|o| o.parse_arg()?.get("type"))
            .last();
        next.machine = match &self.binary {
            Ok(first) => probe::run(&first.path, &argv0, &Questions::default())
                .ok()
                .and_then(|caps| translate::pinned_machine(asked.as_deref(), &caps)),
            Err(_) => None,
        }
        .or(asked);
        let args = GenArgs {
            machine: next.machine.clone(),
            incoming: true,
            target: None,
            displays: graphics::Sockets::placeholders(&self.base.displays),
            block: None,
        };
        let cmd = generation_cmdline(&self.base, &args);
        let questions = translate::questions(&cmd, next.machine.as_deref());
        match probe::run(to, &argv0, &questions) {
            Ok(caps) => {
                next.version = caps.version.clone();
                match translate::translate(&cmd, &caps) {
                    Ok(t) => {
                        next.argv = std::iter::once(argv0).chain(t.cmd.to_args()).collect();
                        next.changes = t.changes;
                    }
                    Err(v) => self.verdict.merge(v),
                }
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                self.verdict.add(Reason::new(
                    format!("--to {}", to.display()),
                    format!("cannot ask the new QEMU what it accepts: {why}"),
                ));
                next.error = Some(why);
            }
        }
        self.next = Some(next);
    }

    /// The plan as JSON, for scripts.
    pub fn to_json(&self) -> Value {
        json!({
            "binary": match &self.binary {
                Ok(b) => json!({ "path": b.path.to_string_lossy(), "source": format!("{:?}", b.source).to_lowercase() }),
                Err(e) => json!({ "error": e }),
            },
            "verdict": self.verdict.to_json(),
            "argv": self.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
            "daemonize": self.daemonize,
            "pidfile": self.pidfile.as_ref().map(|p| p.to_string_lossy().into_owned()),
            "private_monitor_fd": self.layout.private_monitor,
            "guest_ram": {
                "shared": self.unshared.is_none(),
                "unshared_reason": self.unshared,
                "memfds": self.ram.iter().zip(&self.layout.ram).map(|((id, size, huge, page), fd)| json!({
                    "id": id, "size": size, "hugetlb": huge, "huge_page_size": huge.then_some(page), "fd": fd,
                })).collect::<Vec<_>>(),
            },
            "taps_opened_by_launcher": self.taps_json(),
            "ptys_held_by_launcher": self.ptys.iter().zip(&self.layout.ptys).map(|(label, fd)| json!({
                "label": label, "generation_fd": fd,
            })).collect::<Vec<_>>(),
            "served_by_launcher": self.served.iter().zip(&self.layout.monitors).map(|((at, mode), fd)| json!({
                "listen": at, "mode": mode, "generation_fd": fd,
            })).collect::<Vec<_>>(),
            "displays_held_by_launcher": self.displays.iter().map(|(protocol, at)| json!({
                "protocol": protocol, "listen": at,
            })).collect::<Vec<_>>(),
            "resources": self.resources.to_json(),
            "next_generation": self.next.as_ref().map(|n| json!({
                "binary": n.binary.to_string_lossy(),
                "version": n.version,
                "machine": n.machine,
                "argv": n.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
                "translations": n.changes.iter().map(Change::to_json).collect::<Vec<_>>(),
                "error": n.error,
            })),
            "incoming": self.incoming_json(),
        })
    }

    /// What starting by loading a VM's state (`-incoming`) changes: the first generation gets
    /// the stream as QEMU would, and nothing can be upgraded until it is loaded.
    fn incoming_json(&self) -> Value {
        match &self.resources.incoming {
            None => Value::Null,
            Some(from) => json!({
                "from": from,
                "first_generation_only_fds": self.layout.first_only,
            }),
        }
    }

    /// Each tap the launcher opens, with the fd numbers its queues get in every generation.
    fn taps_json(&self) -> Value {
        let mut numbers = self.layout.taps.iter();
        let taps: Vec<Value> = self
            .taps
            .iter()
            .map(|(ifname, queues)| {
                let fds: Vec<_> = numbers.by_ref().take(*queues).collect();
                json!({ "ifname": ifname, "fds": fds })
            })
            .collect();
        Value::Array(taps)
    }

    /// The plan as text, for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        writeln!(out, "{}", self.verdict.summary()).ok();
        for note in &self.verdict.notes {
            writeln!(out, "note: {note}").ok();
        }
        match &self.binary {
            Ok(b) => writeln!(out, "binary: {} (from {:?})", b.path.display(), b.source),
            Err(e) => writeln!(out, "binary: none: {e}"),
        }
        .ok();
        let pidfile = self
            .pidfile
            .as_deref()
            .map(|p| p.to_string_lossy())
            .unwrap_or_default();
        writeln!(
            out,
            "launcher: pid stays the VM's{}{}",
            if self.daemonize {
                "; daemonizes itself"
            } else {
                ""
            },
            if pidfile.is_empty() {
                String::new()
            } else {
                format!("; pidfile {pidfile}")
            }
        )
        .ok();
        writeln!(out, "generation 1 argv:").ok();
        writeln!(
            out,
            "  {}",
            self.argv
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        )
        .ok();
        writeln!(out, "private monitor: fd {}", self.layout.private_monitor).ok();
        if let Some(from) = &self.resources.incoming {
            writeln!(
                out,
                "incoming: {from}: generation 1 also inherits every other fd the launcher was \
                 given, as QEMU would; not upgradable until the state is loaded"
            )
            .ok();
        }
        match &self.unshared {
            None => {
                for ((id, size, huge, page), fd) in self.ram.iter().zip(&self.layout.ram) {
                    let pages = match (huge, page) {
                        (false, _) => String::new(),
                        (true, 0) => ", huge pages of the default size".into(),
                        (true, p) => format!(", huge pages of {} KiB", p >> 10),
                    };
                    writeln!(
                        out,
                        "guest RAM: {id}: memfd at fd {fd}, {size} bytes{pages}, shared"
                    )
                    .ok();
                }
            }
            Some(why) => {
                writeln!(
                    out,
                    "guest RAM: not shared ({why}); it crosses in the migration stream"
                )
                .ok();
            }
        }
        for ((at, mode), fd) in self.served.iter().zip(&self.layout.monitors) {
            writeln!(
                out,
                "served by the launcher: {at} ({mode}), each generation listens on fd {fd}"
            )
            .ok();
        }
        for (protocol, at) in &self.displays {
            writeln!(
                out,
                "display held by the launcher: {protocol} on {at}, each connection handed to QEMU"
            )
            .ok();
        }
        for tap in self.taps_json().as_array().into_iter().flatten() {
            writeln!(
                out,
                "tap opened by the launcher: {} at fds {}",
                tap["ifname"], tap["fds"]
            )
            .ok();
        }
        for (label, fd) in self.ptys.iter().zip(&self.layout.ptys) {
            writeln!(
                out,
                "pty held by the launcher: {label}, each generation gets a socket at fd {fd}"
            )
            .ok();
        }
        let r = self.resources.to_json();
        for (title, key) in [
            ("fds kept at the same number", "fds"),
            ("sockets", "sockets"),
            ("memory", "memory"),
            ("monitors", "monitors"),
        ] {
            let items = r
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            writeln!(
                out,
                "{title}: {}",
                if items.is_empty() { "none" } else { "" }
            )
            .ok();
            for item in items {
                writeln!(out, "  {}", one_line(&item)).ok();
            }
        }
        if let Some(next) = &self.next {
            next.write_text(&mut out);
        }
        let machine = r.get("machine").cloned().unwrap_or(Value::Null);
        writeln!(
            out,
            "machine: {}",
            if machine.is_null() {
                "default".into()
            } else {
                one_line(&machine)
            }
        )
        .ok();
        out
    }
}

impl NextGeneration {
    /// The argv one option a line, each translated one marked with what it was.
    fn write_text(&self, out: &mut String) {
        let version = self.version.as_deref().unwrap_or("?");
        writeln!(
            out,
            "generation 2 on QEMU {version} at {} (machine {}):",
            self.binary.display(),
            self.machine.as_deref().unwrap_or("default")
        )
        .ok();
        if self.argv.is_empty() {
            writeln!(out, "  cannot be started there (see the verdict)").ok();
            return;
        }
        let cmd = CmdLine::parse(self.argv.get(1..).unwrap_or_default()).unwrap_or_default();
        let argv0 = self.argv.first().cloned().unwrap_or_default();
        writeln!(out, "  {}", shell_quote(&argv0)).ok();
        for item in &cmd.items {
            let (words, plain) = match item {
                crate::cmdline::Item::Opt(o) => {
                    let mut w = vec![shell_quote(&o.spelling)];
                    w.extend(o.arg.iter().map(|a| shell_quote(a)));
                    let mut p = vec![o.spelling.to_string_lossy().into_owned()];
                    p.extend(o.arg.iter().map(|a| a.to_string_lossy().into_owned()));
                    (w.join(" "), p.join(" "))
                }
                crate::cmdline::Item::Positional(p) => {
                    (shell_quote(p), p.to_string_lossy().into_owned())
                }
            };
            let was: Vec<&str> = self
                .changes
                .iter()
                .filter(|c| !c.now.is_empty() && c.now.contains(&plain))
                .map(|c| c.was.as_str())
                .collect();
            if was.is_empty() {
                writeln!(out, "  {words}").ok();
            } else {
                writeln!(out, "  {words}    # translated from {}", was.join(", ")).ok();
            }
        }
        for change in &self.changes {
            let now = if change.now.is_empty() {
                "(dropped)"
            } else {
                &change.now
            };
            writeln!(out, "translated: {} -> {now}: {}", change.was, change.why).ok();
        }
    }
}

/// `key=value key=value` from a flat JSON object, skipping nulls.
fn one_line(v: &Value) -> String {
    match v.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => v.to_string(),
    }
}

/// Quotes an argument for a POSIX shell when it needs it.
pub fn shell_quote(arg: &OsStr) -> String {
    let s = String::from_utf8_lossy(arg.as_bytes());
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./,:=@%+".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn first_generation_loses_daemonize_and_pidfile_and_gains_a_private_monitor() {
        let cmd = CmdLine::parse(&args(&[
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            "none,accel=tcg",
            "-qmp",
            "unix:/run/x/qmp.monitor,server=on,wait=off",
            "-pidfile",
            "/run/x/qmp.pid",
            "-daemonize",
        ]))
        .unwrap();
        let plan = Plan::new(OsStr::new("qemu-system-x86_64"), &cmd);
        assert!(plan.daemonize);
        assert_eq!(plan.pidfile.as_deref(), Some(OsStr::new("/run/x/qmp.pid")));
        let fd = plan.layout.private_monitor;
        let served = plan.layout.monitors[0];
        assert_eq!(
            plan.argv,
            args(&[
                "qemu-system-x86_64",
                "-S",
                "-no-user-config",
                "-nodefaults",
                "-nographic",
                "-machine",
                "none,accel=tcg",
                "-mon",
                "chardev=qemu-liveupgrade-chr5,mode=control",
                "-chardev",
                &format!("socket,id=qemu-liveupgrade-chr5,fd={served},server=on,wait=off"),
                "-chardev",
                &format!("socket,id=qemu-liveupgrade-qmp,fd={fd}"),
                "-mon",
                "chardev=qemu-liveupgrade-qmp,mode=control",
            ])
        );
        assert_eq!(
            plan.served,
            vec![("unix:/run/x/qmp.monitor".to_owned(), "qmp".to_owned())]
        );
        let text = plan.to_text();
        assert!(text.contains("unix:/run/x/qmp.monitor"), "{text}");
        assert!(text.starts_with("upgradable: yes\n"), "{text}");
        assert_eq!(plan.to_json()["verdict"]["upgradable"], true);
        assert_eq!(
            plan.verdict.notes[0].option, "guest RAM",
            "machine none has no RAM"
        );
    }

    #[test]
    fn a_vm_that_cannot_be_upgraded_says_why() {
        let cmd = CmdLine::parse(&args(&[
            "-m",
            "1G",
            "-device",
            "vfio-pci,host=0000:01:00.0,id=hostdev0",
        ]))
        .unwrap();
        let plan = Plan::new(OsStr::new("qemu-system-x86_64"), &cmd);
        let json = plan.to_json();
        assert_eq!(json["verdict"]["upgradable"], false);
        assert_eq!(json["verdict"]["reasons"][0]["option"], "-device vfio-pci");
        let text = plan.to_text();
        assert!(
            text.starts_with("upgradable: no: -device vfio-pci: a host device"),
            "{text}"
        );
    }

    #[test]
    fn private_monitor_avoids_every_fd_the_argv_names() {
        let cmd = CmdLine::parse(&args(&[
            "-chardev",
            "socket,id=charmonitor,fd=3,server=on,wait=off",
            "-netdev",
            r#"{"type":"tap","fds":"4:5","vhostfds":"6:7","id":"hostnet0"}"#,
            "-add-fd",
            "set=0,fd=8,opaque=serial0-log",
        ]))
        .unwrap();
        let plan = Plan::new(OsStr::new("qemu-system-x86_64"), &cmd);
        assert_eq!(plan.layout.private_monitor, 9);
        assert_eq!(plan.layout.ram, vec![10], "default RAM on its memfd");
        assert_eq!(plan.layout.monitors, vec![11]);
        // The monitor's listening fd 3 is served by the launcher, not passed on.
        assert_eq!(plan.layout.keep, vec![4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_serial_pty_is_held_by_the_launcher() {
        let cmd = CmdLine::parse(&args(&["-nodefaults", "-serial", "pty"])).unwrap();
        let plan = Plan::new(OsStr::new("qemu-system-x86_64"), &cmd);
        let fd = plan.layout.ptys[0];
        assert_eq!(plan.ptys, ["serial0"]);
        assert_eq!(
            &plan.argv[1..4],
            args(&["-nodefaults", "-serial", "chardev:serial0"])
        );
        let chardev = OsString::from(format!("socket,id=serial0,fd={fd}"));
        assert!(plan.argv.contains(&chardev), "{:?}", plan.argv);
        assert_eq!(
            plan.to_json()["ptys_held_by_launcher"][0]["label"],
            "serial0"
        );
        assert!(plan.to_text().contains("pty held by the launcher: serial0"));
    }

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(
            shell_quote(OsStr::new("file=/a/b.img,if=virtio")),
            "file=/a/b.img,if=virtio"
        );
        assert_eq!(
            shell_quote(OsStr::new("console=ttyS0 quiet")),
            "'console=ttyS0 quiet'"
        );
        assert_eq!(shell_quote(OsStr::new(r#"{"a":1}"#)), r#"'{"a":1}'"#);
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
    }
}
