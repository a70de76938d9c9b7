//! How the journal reads the arguments of the commands it follows: QEMU's option syntax,
//! HMP's string arguments, and what HMP printed.

use serde_json::Value;

use super::{Effect, Target, PERIPHERAL};

pub(super) fn removal(name: Option<String>, make: fn(String) -> Target) -> Effect {
    name.map_or(Effect::Other, |n| Effect::Remove(make(n)))
}

/// `drive_add [-n] ADDR OPTS`: a drive named by `id=`, or with `-n` a node by `node-name=`.
pub(super) fn drive_add(args: &[String]) -> Effect {
    let node = args.first().is_some_and(|a| a == "-n");
    let opts = args
        .get(if node { 2 } else { 1 })
        .map_or("", String::as_str);
    let target = if node {
        option(opts, "node-name").map(Target::Node)
    } else {
        option(opts, "id").map(Target::Drive)
    };
    target.map_or(Effect::Other, Effect::Add)
}

/// The key of a display setting: the command, the protocol and the display (VNC's `display`,
/// the default one when not named).
pub(super) fn display_setting(command: &str, protocol: &str, display: Option<&str>) -> String {
    format!("{command} {protocol} {}", display.unwrap_or("default"))
}

/// A device's id as DEVICE_DELETED names it: `device_del` also takes the QOM path.
pub(super) fn device_id(id: &str) -> String {
    id.strip_prefix(PERIPHERAL).unwrap_or(id).to_owned()
}

/// The value of `key` in QEMU option syntax (`driver,id=x,a=b`, a doubled comma standing for a
/// comma), or in the JSON form `object_add` also takes.
pub(super) fn option(opts: &str, key: &str) -> Option<String> {
    let opts = opts.trim();
    if opts.starts_with('{') {
        let v: Value = serde_json::from_str(opts).ok()?;
        return v.get(key)?.as_str().map(str::to_owned);
    }
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = opts.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                part.push(',');
            }
            ',' => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    let prefix = format!("{key}=");
    parts
        .into_iter()
        .find_map(|p| p.strip_prefix(&prefix).map(str::to_owned))
}

/// HMP's arguments split as its string arguments are read (`get_str` in `monitor/hmp.c`):
/// blank-separated, or double-quoted with backslash escapes.
pub(super) fn hmp_args(rest: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return args;
        };
        let mut arg = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => arg.push('\n'),
                        Some('r') => arg.push('\r'),
                        Some(c) => arg.push(c),
                        None => break,
                    },
                    c => arg.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                arg.push(c);
            }
        }
        args.push(arg);
    }
}

/// Whether what an HMP command printed means it succeeded. The commands the journal follows
/// print nothing when they succeed, but `drive_add`, which prints `OK`. Their failures print
/// `Error: ...`, or other text (`drive_del`'s "Device 'x' not found", a usage hint after an
/// error QEMU wrote to its stderr), so any other text is taken as failure. Warnings (`warning:
/// ...`, deprecated options) come with successes.
pub(super) fn printed_ok(word: &str, text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("warning:"))
        .all(|l| word == "drive_add" && l == "OK")
}

pub(super) fn any_string(v: &Value, f: &mut impl FnMut(&str) -> bool) -> bool {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().any(|v| any_string(v, f)),
        Value::Object(o) => o.values().any(|v| any_string(v, f)),
        _ => false,
    }
}
