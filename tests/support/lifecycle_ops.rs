//! The operations of the lifecycle suite, each as libvirt's own tools do it, and what each
//! one shows: virsh's result, `virsh domstate --reason` after it, how the guest came out
//! ([`GuestView`]: from inside) and what the operation itself reports (its detail). Everything
//! is written so that the same domain under plain QEMU and under the shim shows the same
//! [`Outcome`]: paths and names are left out, counters are judged, not copied.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::libvirt::{try_virsh, virsh};
use crate::lifecycle_domain::{
    console_output, libvirt_guests, running_domains, GuestLog, GuestView, LcDomain,
};

/// What one operation did to one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `ok`, or virsh's error with the domain's name and directory left out.
    pub result: String,
    /// `virsh domstate --reason` afterwards.
    pub state: String,
    /// The guest, from inside.
    pub guest: GuestView,
    /// What the operation showed.
    pub detail: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} | {} | {}, memory {}, cpus {}, {} MiB | {}",
            self.result,
            self.state,
            self.guest.course,
            self.guest.memory,
            self.guest.cpus,
            self.guest.ram_mib,
            self.detail
        )
    }
}

/// What an operation returns: virsh's result, and what the operation showed.
pub type Done = (Result<(), String>, String);

/// One operation.
pub struct Op {
    /// Its name in the table: the virsh command(s).
    pub name: &'static str,
    /// How the guest comes out of it under plain QEMU: `continued`, `rebooted`, `went back`,
    /// `off`.
    pub course: &'static str,
    /// A reading taken before it (and before the upgrade that precedes it, in the pass that
    /// upgrades first), handed to `run`.
    pub before: fn(&LcDomain) -> Value,
    /// The operation: its result, and what it showed.
    pub run: fn(&LcDomain, &Value) -> Done,
}

/// Runs `op` on `dom`, after an upgrade if `upgrade_first`, and observes it.
pub fn perform(op: &Op, dom: &mut LcDomain, upgrade_first: bool) -> Outcome {
    let before = (op.before)(dom);
    let mark = dom.mark();
    if upgrade_first {
        dom.upgrade();
    }
    let (result, detail) = (op.run)(dom, &before);
    let state = dom.state();
    let guest = dom.guest_after(&mark);
    Outcome {
        result: match result {
            Ok(()) => "ok".into(),
            Err(e) => normalize(dom, &e),
        },
        state,
        guest,
        detail: normalize(dom, &detail),
    }
}

/// `text` without what differs between two domains: their name and directory.
fn normalize(dom: &LcDomain, text: &str) -> String {
    text.replace(&dom.dir.path().display().to_string(), "DIR")
        .replace(dom.name(), "DOM")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

fn nothing(_: &LcDomain) -> Value {
    Value::Null
}

/// `virsh ARGS` on the domain: stdout, or the error.
fn v(args: &[&str]) -> Result<String, String> {
    try_virsh(args)
}

/// Every operation, in the order the suite runs them: those that change the guest for good
/// (vCPUs, balloon) early, so that every later row shows they lasted; those that end with a
/// new boot or no VM at the end.
pub const OPS: &[Op] = &[
    Op {
        name: "domblkinfo",
        course: "continued",
        before: nothing,
        run: |d, _| match v(&["domblkinfo", d.name(), "vda"]) {
            Ok(out) => (Ok(()), field(&out, "Capacity:")),
            Err(e) => (Err(e), String::new()),
        },
    },
    Op {
        name: "domblkstat",
        course: "continued",
        before: |d| blkstat(d).unwrap_or(Value::Null),
        run: |d, before| {
            // The guest writes a record every few ms: counters that only go on grow.
            std::thread::sleep(Duration::from_millis(500));
            match blkstat(d) {
                Ok(now) => (Ok(()), monotonic(before, &now)),
                Err(e) => (Err(e), String::new()),
            }
        },
    },
    Op {
        name: "domifstat",
        course: "continued",
        before: |d| ifstat(d).unwrap_or(Value::Null),
        run: |d, before| match ifstat(d) {
            Ok(now) => (Ok(()), monotonic(before, &now)),
            Err(e) => (Err(e), String::new()),
        },
    },
    Op {
        name: "qemu-agent-command guest-ping",
        course: "continued",
        before: nothing,
        run: |d, _| match v(&[
            "qemu-agent-command",
            d.name(),
            r#"{"execute":"guest-ping"}"#,
        ]) {
            Ok(out) => (Ok(()), out.trim().to_owned()),
            Err(e) => (Err(e), String::new()),
        },
    },
    Op {
        name: "console (pty)",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let out = console_output(d.name(), Duration::from_secs(3));
            let stats = out.lines().filter(|l| l.contains("STAT ")).count();
            let seen = if stats >= 3 {
                "status lines"
            } else {
                "no status lines"
            };
            (Ok(()), seen.to_owned())
        },
    },
    Op {
        name: "setvcpus 2 --live",
        course: "continued",
        before: nothing,
        run: |d, _| match v(&["setvcpus", d.name(), "2", "--live"]) {
            Ok(_) => (
                Ok(()),
                format!(
                    "live vCPUs {}",
                    v(&["vcpucount", d.name(), "--live", "--active"])
                        .unwrap_or_default()
                        .trim()
                ),
            ),
            Err(e) => (Err(e), String::new()),
        },
    },
    Op {
        name: "setmem 192M --live",
        course: "continued",
        before: nothing,
        run: |d, _| match v(&["setmem", d.name(), "196608", "--live"]) {
            Ok(_) => {
                let mut actual = String::new();
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until {
                    actual = field(&v(&["dommemstat", d.name()]).unwrap_or_default(), "actual");
                    if actual == "actual 196608" {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (Ok(()), format!("balloon {actual} KiB"))
            }
            Err(e) => (Err(e), String::new()),
        },
    },
    Op {
        name: "dump --memory-only",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let path = d.file("dump.elf");
            match v(&["dump", "--memory-only", d.name(), &path]) {
                Ok(_) => {
                    let detail = describe_dump(&path);
                    let _ = fs::remove_file(&path);
                    (Ok(()), detail)
                }
                Err(e) => (Err(e), String::new()),
            }
        },
    },
    Op {
        name: "save, restore",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let path = d.file("save.img");
            let saved = v(&["save", d.name(), &path]);
            let between = d.state();
            let restored = saved.and_then(|_| v(&["restore", &path]));
            let _ = fs::remove_file(&path);
            (restored.map(drop), format!("between: {between}"))
        },
    },
    Op {
        name: "managedsave, start",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let saved = v(&["managedsave", d.name()]);
            let between = d.state();
            let started = saved.and_then(|_| v(&["start", d.name()]));
            (started.map(drop), format!("between: {between}"))
        },
    },
    Op {
        name: "libvirt-guests stop, start (ON_SHUTDOWN=suspend)",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let others: Vec<String> = running_domains()
                .into_iter()
                .filter(|n| n != d.name())
                .collect();
            assert!(
                others.is_empty(),
                "libvirt-guests suspends every running domain, and these are not this test's: {others:?}; stop them first"
            );
            let state = d.dir.join("libvirt-guests");
            let stopped = libvirt_guests(&state, "stop");
            let between = d.state();
            let started = libvirt_guests(&state, "start");
            let said = |text: &str, what: &str| {
                text.lines()
                    .any(|l| l.contains(what) && l.contains(d.name()) && l.contains("done"))
            };
            let detail = format!(
                "between: {between}; suspended: {}; resumed: {}",
                said(&stopped, "Suspending"),
                said(&started, "Resuming guest")
            );
            (Ok(()), detail)
        },
    },
    Op {
        name: "snapshot-create-as --memspec, snapshot-revert",
        course: "went back",
        before: nothing,
        run: snapshot_and_revert,
    },
    Op {
        name: "blockcopy --pivot",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let dest = d.file("copy.qcow2");
            let done = v(&[
                "blockcopy",
                d.name(),
                "vda",
                &dest,
                "--wait",
                "--pivot",
                "--transient-job",
            ]);
            (done.map(drop), format!("disk now {}", disk_source(d)))
        },
    },
    Op {
        name: "snapshot --disk-only, blockcommit --active --pivot",
        course: "continued",
        before: nothing,
        run: |d, _| {
            let overlay = format!("vda,file={}", d.file("overlay.qcow2"));
            let done = v(&[
                "snapshot-create-as",
                d.name(),
                "overlay",
                "--disk-only",
                "--no-metadata",
                "--diskspec",
                &overlay,
            ])
            .and_then(|_| {
                let on_overlay = disk_source(d);
                v(&[
                    "blockcommit",
                    d.name(),
                    "vda",
                    "--active",
                    "--pivot",
                    "--wait",
                ])
                .map(|_| on_overlay)
            });
            let detail = match &done {
                Ok(on_overlay) => format!("{on_overlay} committed, disk now {}", disk_source(d)),
                Err(_) => String::new(),
            };
            (done.map(drop), detail)
        },
    },
    Op {
        name: "reboot",
        course: "rebooted",
        before: nothing,
        run: |d, _| {
            let boots = GuestLog::read(&d.console, 0).boots;
            let done = v(&["reboot", d.name()]);
            (done.map(drop), wait_boot(d, boots))
        },
    },
    Op {
        name: "reset",
        course: "rebooted",
        before: nothing,
        run: |d, _| {
            let boots = GuestLog::read(&d.console, 0).boots;
            let done = v(&["reset", d.name()]);
            (done.map(drop), wait_boot(d, boots))
        },
    },
    Op {
        name: "destroy --graceful",
        course: "off",
        before: nothing,
        run: |d, _| {
            let pid = d.dom.pid();
            let done = v(&["destroy", "--graceful", d.name()]);
            let gone = !crate::shim::is_running(pid);
            (done.map(drop), format!("emulator process gone: {gone}"))
        },
    },
];

/// `snapshot-create-as` with an external memory snapshot, then `snapshot-revert` to it, and
/// since libvirt 9.0 refuses to revert to external snapshots ("not supported yet"), what an
/// operator does instead: the memory file is a save image, restored with `virsh restore`
/// (its domain XML has the disk as it was before the snapshot's overlay).
fn snapshot_and_revert(d: &LcDomain, _: &Value) -> Done {
    let mem = format!("file={},snapshot=external", d.file("snap.mem"));
    let disk = format!("vda,snapshot=external,file={}", d.file("snap.qcow2"));
    let created = v(&[
        "snapshot-create-as",
        d.name(),
        "snap",
        "--memspec",
        &mem,
        "--diskspec",
        &disk,
    ]);
    if let Err(e) = created {
        return (Err(e), String::new());
    }
    let after_create = d.state();
    // Let the guest go on a little, so that going back shows.
    let mark = d.mark();
    let _ = d.guest_after(&mark);
    let revert = match v(&["snapshot-revert", d.name(), "snap"]) {
        Ok(_) => "snapshot-revert: ok".to_owned(),
        Err(e) => format!("snapshot-revert: {e}"),
    };
    let restored = v(&["destroy", d.name()])
        .and_then(|_| v(&["restore", &d.file("snap.mem")]))
        .map(drop);
    let _ = virsh(&["snapshot-delete", d.name(), "snap", "--metadata"]);
    let detail = format!(
        "after create: {after_create}; {revert}; restored from the memory file, disk {}",
        disk_source(d)
    );
    (restored, detail)
}

/// The file name of the domain's `vda` now.
fn disk_source(d: &LcDomain) -> String {
    let list = v(&["domblklist", d.name()]).unwrap_or_default();
    list.lines()
        .find_map(|l| l.trim().strip_prefix("vda"))
        .map(|p| {
            std::path::Path::new(p.trim())
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Waits for a boot after the `boots`th; `new boot` or `no new boot`.
fn wait_boot(d: &LcDomain, boots: usize) -> String {
    let until = Instant::now() + Duration::from_secs(90);
    while Instant::now() < until {
        if GuestLog::read(&d.console, 0).boots > boots {
            return "new boot".into();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    "no new boot".into()
}

/// The value after `key` on the line that starts with it (`Capacity:  16777216`).
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| format!("{key} {}", v.trim()))
        .unwrap_or_else(|| format!("no {key}"))
}

/// `virsh domblkstat DOM vda` as `{name: value}`.
fn blkstat(d: &LcDomain) -> Result<Value, String> {
    counters(&v(&["domblkstat", d.name(), "vda"])?, 1)
}

/// `virsh domifstat DOM IFACE` for its one interface, as `{name: value}`.
fn ifstat(d: &LcDomain) -> Result<Value, String> {
    let list = v(&["domiflist", d.name()])?;
    let iface = list
        .lines()
        .skip(2)
        .find_map(|l| l.split_whitespace().next())
        .ok_or("no interface")?
        .to_owned();
    counters(&v(&["domifstat", d.name(), &iface])?, 1)
}

/// `DEV NAME VALUE` lines as `{NAME: VALUE}`.
fn counters(text: &str, name_at: usize) -> Result<Value, String> {
    let mut map = serde_json::Map::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(name), Some(value)) = (words.get(name_at), words.get(name_at + 1)) {
            if let Ok(n) = value.parse::<u64>() {
                map.insert((*name).to_owned(), n.into());
            }
        }
    }
    Ok(Value::Object(map))
}

/// Whether every counter of `now` is at least what it was `before`: `counters kept (N)` or
/// the ones that went back.
fn monotonic(before: &Value, now: &Value) -> String {
    let Some(now) = now.as_object() else {
        return "no counters".into();
    };
    let back: Vec<String> = now
        .iter()
        .filter_map(|(name, value)| {
            let was = before.get(name)?.as_u64()?;
            let is = value.as_u64()?;
            (is < was).then(|| format!("{name} {was} -> {is}"))
        })
        .collect();
    if back.is_empty() {
        format!("{} counters, none went back", now.len())
    } else {
        format!("counters went back: {}", back.join(", "))
    }
}

/// A memory-only dump: an ELF core about the size of guest RAM, holding the guest's memory
/// check pattern (a header line only the pattern has).
fn describe_dump(path: &str) -> String {
    let Ok(bytes) = fs::read(path) else {
        return "no dump file".into();
    };
    let elf = bytes.starts_with(b"\x7fELF");
    let mib = bytes.len() >> 20;
    format!(
        "ELF {elf}, about {} MiB, guest memory pattern {}",
        (mib + 8) / 16 * 16,
        if has_pattern_header(&bytes) {
            "found"
        } else {
            "missing"
        }
    )
}

/// Whether `bytes` hold the third copy's header of the guest's memory pattern: 3 * 523
/// digits, zero-padded, then a newline.
fn has_pattern_header(bytes: &[u8]) -> bool {
    const ZEROS: usize = 3 * 523 - 1;
    let mut i = ZEROS;
    while i + 1 < bytes.len() {
        if bytes[i] == b'3'
            && bytes[i + 1] == b'\n'
            && bytes[i - ZEROS..i].iter().all(|b| *b == b'0')
        {
            return true;
        }
        i += 1;
    }
    false
}
