//! The equivalences: which removed or renamed option or property becomes what, and when.
//!
//! Each rule applies only when the new binary lacks the form the argv has and has the other
//! form; what has no equivalent in the new binary is refused with the reason. Sources:
//! QEMU's `docs/about/removed-features.rst` and `deprecated.rst`, 5.0 to 10.2.

use crate::cmdline::{Item, Opt, OptArg};

use super::{as_written, device_type, rewrite_arg, Translation};

/// Options removed before QEMU 7.2, so absent from the launcher's option table, that a VM
/// started on QEMU 5.x or 6.x may carry: `(name, takes an argument)`.
const LEGACY: &[(&str, bool)] = &[
    ("realtime", true),
    ("tb-size", true),
    ("sdl", false),
    ("curses", false),
    ("enable-fips", false),
    ("writeconfig", true),
    ("soundhw", true),
    ("watchdog", true),
];

/// Called for an option the launcher's table does not know: a legacy option the new binary
/// lacks is translated or refused; anything else is passed on for QEMU to judge.
pub(super) fn unknown_option(t: &mut Translation<'_>, opt: &Opt) -> bool {
    let Some(&(_, takes_arg)) = LEGACY.iter().find(|(n, _)| *n == opt.name) else {
        return false;
    };
    if t.caps.has_option(&opt.name) {
        return false;
    }
    // A flag the parser grouped with a following disk image gives the image back.
    let (opt, stray) = match (takes_arg, &opt.arg) {
        (false, Some(arg)) => {
            let mut flag = opt.clone();
            flag.arg = None;
            (flag, Some(arg.clone()))
        }
        _ => (opt.clone(), None),
    };
    legacy_option(t, &opt);
    if let Some(arg) = stray {
        t.out.push(Item::Positional(arg));
    }
    true
}

fn legacy_option(t: &mut Translation<'_>, opt: &Opt) {
    let was = as_written(opt);
    let arg = opt.arg_str().unwrap_or_default().to_owned();
    match opt.name.as_str() {
        "realtime" if t.caps.has_option("overcommit") => {
            let mlock = OptArg::parse(&arg, None).and_then(|a| a.get("mlock"));
            let value = mlock.unwrap_or_else(|| "on".into());
            let now = format!("mem-lock={value}");
            t.push("overcommit", Some(&now));
            t.changed(
                was,
                format!("-overcommit {now}"),
                "QEMU 6.0 replaced -realtime mlock= with -overcommit mem-lock=",
            );
        }
        "tb-size" => t.accel_sets.push((
            "tb-size".into(),
            arg,
            was,
            "QEMU 6.0 replaced -tb-size with -accel tcg,tb-size=".into(),
        )),
        "sdl" | "curses" if t.caps.has_option("display") => {
            t.push("display", Some(&opt.name));
            t.changed(
                was,
                format!("-display {}", opt.name),
                format!("QEMU 7.1 replaced -{0} with -display {0}", opt.name),
            );
        }
        "writeconfig" => t.changed(
            was,
            String::new(),
            "QEMU 7.1 removed -writeconfig; the first QEMU wrote the file already",
        ),
        _ => t.refuse(
            opt,
            format!(
                "{} does not accept it, and it has no equivalent there",
                t.caps.describe()
            ),
        ),
    }
}

/// Called for an option of the table the new binary lacks.
pub(super) fn missing_option(t: &mut Translation<'_>, opt: &Opt) {
    let was = as_written(opt);
    let arg = opt.arg_str().unwrap_or_default().to_owned();
    let lacks = |why: &str| format!("{} does not accept it, {why}", t.caps.describe());
    match opt.name.as_str() {
        name @ ("no-hpet" | "no-acpi") => {
            let key = &name[3..];
            if t.caps.machine_has(key) == Some(false) {
                let why = lacks(&format!("and its machine type has no {key} property"));
                t.refuse(opt, why);
                return;
            }
            t.machine_sets.push((
                key.to_owned(),
                "off".into(),
                was,
                format!("QEMU 9.0 removed -{name}; -machine {key}=off is the same setting"),
            ));
        }
        "async-teardown" | "chroot" | "runas" if t.caps.has_option("run-with") => {
            let (key, value) = match opt.name.as_str() {
                "async-teardown" => ("async-teardown", "on".to_owned()),
                "chroot" => ("chroot", arg),
                _ => ("user", arg),
            };
            t.run_with.push((key.into(), value, was));
        }
        "run-with" => {
            let Some(parsed) = opt.parse_arg() else {
                t.refuse(opt, lacks("and its argument could not be read"));
                return;
            };
            let mut now = Vec::new();
            for key in parsed.keys() {
                let value = parsed.get(&key).unwrap_or_default();
                let (name, value) = match (key.as_str(), value.as_str()) {
                    ("async-teardown", "on" | "true" | "yes") => ("async-teardown", None),
                    ("async-teardown", _) => continue,
                    ("chroot", _) => ("chroot", Some(value)),
                    ("user", _) => ("runas", Some(value)),
                    _ => ("", None),
                };
                if name.is_empty() || !t.caps.has_option(name) {
                    let why = lacks(&format!("and has no equivalent for {key}="));
                    t.refuse(opt, why);
                    return;
                }
                t.push(name, value.as_deref());
                now.push(match value {
                    Some(v) => format!("-{name} {v}"),
                    None => format!("-{name}"),
                });
            }
            t.changed(
                was,
                now.join(" "),
                "-run-with is QEMU 8.1's; the older spellings mean the same",
            );
        }
        "singlestep" => t.accel_sets.push((
            "one-insn-per-tb".into(),
            "on".into(),
            was,
            "QEMU 9.0 replaced -singlestep with -accel tcg,one-insn-per-tb=on".into(),
        )),
        _ => t.refuse(opt, lacks("and it has no equivalent there")),
    }
}

/// Properties of an option the new binary has: the machine type and its properties, device
/// drivers and object types and their properties.
pub(super) fn properties(t: &mut Translation<'_>, opt: &mut Opt) {
    match opt.name.as_str() {
        "machine" => machine(t, opt),
        "accel" => accel(t, opt),
        "device" => device(t, opt),
        "object" => object(t, opt),
        _ => {}
    }
}

fn machine(t: &mut Translation<'_>, opt: &mut Opt) {
    let Some(arg) = opt.parse_arg() else {
        return;
    };
    if let Some(kind) = arg
        .get("type")
        .filter(|k| k != "none" && !k.contains("help"))
    {
        if !t.caps.has_machine(&kind) {
            let why = format!(
                "{} has no machine type {kind}: a guest moves only to the same machine type",
                t.caps.describe()
            );
            t.refuse(opt, why);
            return;
        }
    }
    let caps = t.caps;
    let known = |key: &str| key == "type" || key == "accel" || caps.machine_has(key) != Some(false);
    let what = format!("the machine type of {}", caps.describe());
    unknown_keys(t, opt, arg, known, &what, |t, arg, key| {
        let value = arg.get(key).unwrap_or_default();
        let flag = format!("no-{key}");
        match key {
            "hpet" | "acpi" if value == "off" && t.caps.has_option(&flag) => {
                arg.remove(key);
                t.pending.push((flag.clone(), None));
                Some(format!("{key}=off is -{flag} there"))
            }
            "enforce-config-section" => {
                arg.remove(key);
                let global = format!("migration.send-configuration={value}");
                t.pending.push(("global".into(), Some(global)));
                Some("QEMU 5.2 replaced enforce-config-section with -global migration.send-configuration".into())
            }
            _ => None,
        }
    });
}

fn accel(t: &mut Translation<'_>, opt: &mut Opt) {
    let Some(arg) = opt.parse_arg() else {
        return;
    };
    let Some(kind) = arg.get("accel") else {
        return;
    };
    let Some(Some(props)) = t.caps.objects.get(&format!("{kind}-accel")) else {
        return;
    };
    let what = format!("{kind} of {}", t.caps.describe());
    let known = |key: &str| key == "accel" || props.contains(key);
    unknown_keys(t, opt, arg, known, &what, |t, arg, key| {
        if key != "one-insn-per-tb" || !t.caps.has_option("singlestep") {
            return None;
        }
        if arg.remove(key).as_deref() == Some("on") {
            t.pending.push(("singlestep".into(), None));
        }
        Some("one-insn-per-tb=on is -singlestep before QEMU 8.1".into())
    });
}

/// Keys `-device` handles itself rather than as properties of the device.
const DEVICE_KEYS: &[&str] = &["driver", "id", "bus"];
/// Keys `-object` handles itself.
const OBJECT_KEYS: &[&str] = &["qom-type", "id"];

fn device(t: &mut Translation<'_>, opt: &mut Opt) {
    let Some(arg) = opt.parse_arg() else {
        return;
    };
    let Some(driver) = arg.get("driver") else {
        return;
    };
    let props = match t.caps.devices.get(device_type(&driver)) {
        Some(Some(props)) => props,
        Some(None) => {
            let why = format!("{} has no device {driver}", t.caps.describe());
            t.refuse(opt, why);
            return;
        }
        None => return,
    };
    let what = format!("device {driver} of {}", t.caps.describe());
    let known = |key: &str| DEVICE_KEYS.contains(&key) || props.contains(key);
    unknown_keys(t, opt, arg, known, &what, |_, arg, key| {
        // virtio-blk's SCSI passthrough (removed in 9.1) was off unless asked for.
        let off = arg.get_bool(key) == Some(false);
        if key != "scsi" || !driver.starts_with("virtio-blk") || !off {
            return None;
        }
        arg.remove(key);
        Some("QEMU 9.1 removed virtio-blk's scsi property; off is what remains".into())
    });
}

fn object(t: &mut Translation<'_>, opt: &mut Opt) {
    let Some(arg) = opt.parse_arg() else {
        return;
    };
    let Some(kind) = arg.get("qom-type") else {
        return;
    };
    let props = match t.caps.objects.get(&kind) {
        Some(Some(props)) => props,
        Some(None) => {
            let why = format!("{} has no object type {kind}", t.caps.describe());
            t.refuse(opt, why);
            return;
        }
        None => return,
    };
    let what = format!("{kind} of {}", t.caps.describe());
    let known = |key: &str| OBJECT_KEYS.contains(&key) || props.contains(key);
    unknown_keys(t, opt, arg, known, &what, |_, arg, key| {
        // Properties that never had an effect, removed without replacement: `loaded` of
        // secrets and TLS credentials (9.2), `opened` of rng backends (7.1).
        if key != "loaded" && key != "opened" {
            return None;
        }
        arg.remove(key);
        Some(format!(
            "{key}= had no effect and is gone from the new QEMU"
        ))
    });
}

/// Walks the keys of `arg` that `known` rejects: `fix` turns one into its equivalent (editing
/// `arg` or adding options, and saying why) or returns `None`, which refuses the option, naming
/// `what` has no such property. The option is rewritten when anything was fixed.
fn unknown_keys(
    t: &mut Translation<'_>,
    opt: &mut Opt,
    mut arg: OptArg,
    known: impl Fn(&str) -> bool,
    what: &str,
    mut fix: impl FnMut(&mut Translation<'_>, &mut OptArg, &str) -> Option<String>,
) {
    let mut changed: Vec<String> = Vec::new();
    for key in arg.keys() {
        if known(&key) {
            continue;
        }
        match fix(t, &mut arg, &key) {
            Some(why) => changed.push(why),
            None => {
                t.refuse(opt, format!("{what} has no property {key}"));
                return;
            }
        }
    }
    if !changed.is_empty() {
        rewrite_arg(t, opt, &arg, changed.join("; "));
    }
}
