//! Whether a VM can be upgraded, and every reason it cannot, known before anything is tried.
//!
//! A [`Verdict`] collects [`Reason`]s from independent checks. Each check looks at the user's
//! command line alone and names what would stop an upgrade: the option as the user wrote it and
//! why, in words an operator can act on. `plan` shows the verdict for a command line, `check`
//! and the upgrade itself add what only the new binary or the running QEMU can tell, and an
//! upgrade whose verdict is "no" is refused before anything is
//! started.
//!
//! A new kind of blocker is one function `fn(&CmdLine) -> Vec<Reason>` added to [`CHECKS`].

use std::fmt;

use serde_json::{json, Value};

use crate::cmdline::{CmdLine, Opt};

/// One thing that stops an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// The option as the user gave it: `-vnc 127.0.0.1:0`, `-device vfio-pci`, `-snapshot`.
    pub option: String,
    /// Why it stops the upgrade, and what would make it work, where something would.
    pub why: String,
}

impl Reason {
    /// A reason about `option`.
    pub fn new(option: impl Into<String>, why: impl Into<String>) -> Reason {
        Reason {
            option: option.into(),
            why: why.into(),
        }
    }

    /// A reason about `opt`, named with its argument's first element (its type or driver),
    /// which is how an operator finds it on a long command line.
    pub fn about(opt: &Opt, why: impl Into<String>) -> Reason {
        Reason::new(describe(opt), why)
    }

    /// The reason as JSON, `{"option": ..., "why": ...}`.
    pub fn to_json(&self) -> Value {
        json!({ "option": self.option, "why": self.why })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.option, self.why)
    }
}

/// `-name` plus its argument's type or driver, or the first element of a `key=value` argument:
/// `-device vfio-pci`, `-object sev-guest`, `-vnc 127.0.0.1:0`, `-snapshot`.
pub fn describe(opt: &Opt) -> String {
    let name = format!("-{}", opt.name);
    let Some(arg) = opt.arg_str() else {
        return name;
    };
    let first = match opt.parse_arg() {
        Some(parsed) => opt
            .spec()
            .and_then(|s| s.implied_key())
            .and_then(|key| parsed.get(key))
            .or_else(|| parsed.get("driver"))
            .or_else(|| parsed.get("qom-type"))
            .or_else(|| parsed.get("type")),
        None => None,
    };
    let first = first.unwrap_or_else(|| {
        let head = arg.split(',').next().unwrap_or(arg);
        head.chars().take(60).collect()
    });
    format!("{name} {first}")
}

/// What is known about one VM's chances: every reason it cannot be upgraded, and notes that do
/// not stop an upgrade but change what it does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// What stops an upgrade; none means the VM can be upgraded.
    pub reasons: Vec<Reason>,
    /// What does not stop it but an operator should know (guest RAM streamed, say).
    pub notes: Vec<Reason>,
}

impl Verdict {
    /// Whether nothing stops an upgrade.
    pub fn upgradable(&self) -> bool {
        self.reasons.is_empty()
    }

    /// Adds a reason, once: two checks that find the same thing do not repeat it.
    pub fn add(&mut self, reason: Reason) {
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }

    /// Adds a note, once.
    pub fn note(&mut self, note: Reason) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// Adds every reason and note of `other`.
    pub fn merge(&mut self, other: Verdict) {
        other.reasons.into_iter().for_each(|r| self.add(r));
        other.notes.into_iter().for_each(|n| self.note(n));
    }

    /// `{"upgradable": bool, "reasons": [{"option", "why"}], "notes": [...]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "upgradable": self.upgradable(),
            "reasons": self.reasons.iter().map(Reason::to_json).collect::<Vec<_>>(),
            "notes": self.notes.iter().map(Reason::to_json).collect::<Vec<_>>(),
        })
    }

    /// One line for people: `upgradable: yes`, or `upgradable: no: OPTION: WHY; ...`.
    pub fn summary(&self) -> String {
        if self.upgradable() {
            return "upgradable: yes".into();
        }
        let reasons: Vec<String> = self.reasons.iter().map(Reason::to_string).collect();
        format!("upgradable: no: {}", reasons.join("; "))
    }

    /// The reasons on one line without the `upgradable` prefix, for an upgrade's failure report.
    pub fn reasons_line(&self) -> String {
        let reasons: Vec<String> = self.reasons.iter().map(Reason::to_string).collect();
        reasons.join("; ")
    }
}

/// A check of the user's command line alone: what in it would stop an upgrade.
pub type Check = fn(&CmdLine) -> Vec<Reason>;

/// Every check of a command line alone, in the order their reasons are listed.
pub const CHECKS: &[Check] = &[
    fdset_disks,
    snapshot_disks,
    host_devices,
    confidential_guests,
    crate::listeners::blockers,
];

/// Checks whose findings do not stop an upgrade but change what users see of it.
pub const NOTES: &[Check] = &[crate::listeners::caveats];

/// The verdict on a command line alone: what `plan` shows without `--to`, and what every upgrade
/// of the VM checks first.
pub fn of_cmdline(cmd: &CmdLine) -> Verdict {
    let mut verdict = Verdict::default();
    for check in CHECKS {
        check(cmd).into_iter().for_each(|r| verdict.add(r));
    }
    for check in NOTES {
        check(cmd).into_iter().for_each(|n| verdict.note(n));
    }
    verdict
}

/// A disk opened through an fdset (`/dev/fdset/N`) with image locking: QEMU keeps the lock on
/// the fdset's read-only descriptor after inactivating the image for migration, so neither the
/// new QEMU nor, after a failure, the old one can take the write lock again (seen with 7.2 and
/// 10.0, by plain migration too). Trying would strand the guest paused.
fn fdset_disks(cmd: &CmdLine) -> Vec<Reason> {
    cmd.opts("drive")
        .chain(cmd.opts("blockdev"))
        .filter(|opt| {
            let Some(arg) = opt.arg_str() else {
                return false;
            };
            let locking_off = opt
                .parse_arg()
                .is_some_and(|a| a.get("locking").as_deref() == Some("off"))
                || ["locking=off", "\"locking\":\"off\"", "\"locking\": \"off\""]
                    .iter()
                    .any(|l| arg.contains(l));
            arg.contains("/dev/fdset/") && !locking_off
        })
        .map(|opt| {
            Reason::new(
                format!("-{} {}", opt.name, opt.arg_str().unwrap_or_default()),
                "the disk is opened through an fdset, whose image lock QEMU does not hand over; \
                 open it by path, or with locking=off",
            )
        })
        .collect()
}

/// `-snapshot` or `snapshot=on`: the guest's writes go to a temporary overlay that QEMU creates
/// and unlinks at start. A new QEMU would make a fresh, empty one, and the guest would find its
/// disk back as it was at boot.
fn snapshot_disks(cmd: &CmdLine) -> Vec<Reason> {
    let why = "disk writes go to a temporary file only the running QEMU knows; \
               a new QEMU would start from the unchanged image";
    let mut reasons: Vec<Reason> = cmd
        .opts("snapshot")
        .map(|opt| Reason::about(opt, why))
        .collect();
    reasons.extend(
        cmd.opts("drive")
            .filter(|o| o.parse_arg().and_then(|a| a.get_bool("snapshot")) == Some(true))
            .map(|opt| Reason::new(format!("-drive {}", opt.arg_str().unwrap_or("")), why)),
    );
    reasons
}

/// Device drivers that hand a host device to the guest. The device's VFIO group (or the USB or
/// PCI device) is held by the running QEMU and cannot be opened by a second one, and its state
/// lives in the hardware, not in QEMU.
const HOST_DEVICES: &[&str] = &[
    "vfio-pci",
    "vfio-pci-nohotplug",
    "vfio-platform",
    "vfio-ccw",
    "vfio-ap",
    "vfio-user-pci",
];

fn host_devices(cmd: &CmdLine) -> Vec<Reason> {
    cmd.opts("device")
        .filter(|opt| {
            let driver = opt.parse_arg().and_then(|a| a.get("driver"));
            driver.is_some_and(|d| HOST_DEVICES.contains(&d.as_str()))
        })
        .map(|opt| {
            Reason::about(
                opt,
                "a host device assigned to the guest can be held by one QEMU at a time, \
                 and its state lives in the hardware",
            )
        })
        .collect()
}

/// Confidential guests: QEMU blocks migration of SEV, SEV-SNP and TDX guests, and their memory
/// is encrypted with keys only the running QEMU's firmware session holds.
fn confidential_guests(cmd: &CmdLine) -> Vec<Reason> {
    const TYPES: &[&str] = &["sev-guest", "sev-snp-guest", "tdx-guest"];
    cmd.opts("object")
        .filter(|opt| {
            let kind = opt.parse_arg().and_then(|a| a.get("qom-type"));
            kind.is_some_and(|k| TYPES.contains(&k.as_str()))
        })
        .map(|opt| {
            Reason::about(
                opt,
                "QEMU cannot migrate a confidential guest, so it cannot move to a new QEMU",
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::parse;

    #[test]
    fn a_plain_vm_is_upgradable() {
        let v = of_cmdline(&parse(&["-m", "256", "-nographic", "-drive", "file=a.img"]));
        assert!(v.upgradable());
        assert_eq!(v.summary(), "upgradable: yes");
        assert_eq!(
            v.to_json(),
            json!({"upgradable": true, "reasons": [], "notes": []})
        );
    }

    #[test]
    fn every_blocker_is_named_once() {
        let v = of_cmdline(&parse(&[
            "-snapshot",
            "-drive",
            "file=/dev/fdset/1,if=none,id=d0",
            "-drive",
            "file=/dev/fdset/2,if=none,id=d1,file.locking=off,locking=off",
            "-drive",
            "file=b.img,snapshot=on",
            "-device",
            r#"{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0"}"#,
            "-object",
            "sev-guest,id=sev0,cbitpos=47",
        ]));
        assert!(!v.upgradable());
        let options: Vec<&str> = v.reasons.iter().map(|r| r.option.as_str()).collect();
        assert_eq!(
            options,
            [
                "-drive file=/dev/fdset/1,if=none,id=d0",
                "-snapshot",
                "-drive file=b.img,snapshot=on",
                "-device vfio-pci",
                "-object sev-guest",
            ]
        );
        let json = v.to_json();
        assert_eq!(json["upgradable"], false);
        assert_eq!(json["reasons"][3]["option"], "-device vfio-pci");
        assert!(v
            .summary()
            .starts_with("upgradable: no: -drive file=/dev/fdset/1"));
    }

    #[test]
    fn listeners_the_launcher_cannot_hold_and_vhost_user_are_named() {
        let v = of_cmdline(&parse(&[
            "-vnc",
            "127.0.0.1:0,audiodev=audio1",
            "-spice",
            "port=5901,addr=127.0.0.1,disable-ticketing=on",
            "-chardev",
            "socket,id=c0,host=127.0.0.1,port=4555,server=on,wait=off",
            "-chardev",
            "socket,id=c1,path=/run/c1.sock,server=on,wait=off",
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22",
            "-netdev",
            "socket,id=n1,listen=:1234",
            "-chardev",
            "socket,id=vu,path=/run/vu.sock",
            "-netdev",
            r#"{"type":"vhost-user","chardev":"vu","id":"n2"}"#,
        ]));
        let options: Vec<&str> = v.reasons.iter().map(|r| r.option.as_str()).collect();
        assert_eq!(options, ["-netdev vhost-user", "-netdev id=n1 (tcp::1234)"]);
        let notes: Vec<&str> = v.notes.iter().map(|r| r.option.as_str()).collect();
        assert_eq!(notes, ["-vnc", "-spice", "hostfwd=tcp::2222-:22"]);
    }

    #[test]
    fn merge_keeps_one_of_each() {
        let mut a = Verdict::default();
        a.add(Reason::new("-x", "why"));
        let mut b = Verdict::default();
        b.add(Reason::new("-x", "why"));
        b.add(Reason::new("-y", "other"));
        b.note(Reason::new("-m", "streamed"));
        a.merge(b);
        assert_eq!(a.reasons.len(), 2);
        assert_eq!(a.notes.len(), 1);
        assert_eq!(a.reasons_line(), "-x: why; -y: other");
    }

    #[test]
    fn describe_names_the_type() {
        let cmd = parse(&[
            "-vnc",
            "127.0.0.1:0,audiodev=audio1",
            "-netdev",
            r#"{"type":"vhost-user","chardev":"c","id":"n"}"#,
            "-no-hpet",
            "-chardev",
            "socket,id=c,host=127.0.0.1,port=4444,server=on",
        ]);
        let names: Vec<String> = cmd
            .items
            .iter()
            .filter_map(|i| match i {
                crate::cmdline::Item::Opt(o) => Some(describe(o)),
                _ => None,
            })
            .collect();
        assert_eq!(
            names,
            [
                "-vnc 127.0.0.1:0",
                "-netdev vhost-user",
                "-no-hpet",
                "-chardev socket"
            ]
        );
    }
}
