//! The hot-plug journal: what monitor clients changed in the running QEMU, to be done again in
//! a new generation before the guest moves into it.
//!
//! A new generation starts from the VM's command line. Devices, backends and fds that clients
//! added since (libvirt's `attach-device` is `getfd`, `netdev_add`, `device_add`...) exist only
//! in the running QEMU, and a migration into a QEMU that lacks them fails. The proxy records
//! each such command once QEMU has answered it with success, in the order QEMU answered, and
//! forgets an addition once it has been undone, so that the journal holds no more than the
//! difference between the command line and the running VM.
//!
//! Commands come as QMP, or as HMP (on an HMP monitor, or in QMP's `human-monitor-command`).
//! An HMP command whose QMP equivalent takes the same simple arguments (`device_del ID`,
//! `getfd NAME`, `set_link NAME on`...) is recorded as that QMP command. The others
//! (`device_add`, `netdev_add`, `object_add`, `chardev-add`, `drive_add`, `drive_del`) take
//! option strings that only HMP's own parser reads the same way, and are recorded as
//! `human-monitor-command` with the line as it was typed.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde_json::{json, Value};

/// Prefix of the QOM path of a device added with an `id` (`qdev_set_id` in QEMU).
const PERIPHERAL: &str = "/machine/peripheral/";
/// How many DEVICE_DELETED events are remembered to recognise the copies other monitors get.
const DELETED_MEMORY: usize = 64;

/// One command to replay.
#[derive(Debug)]
pub struct Entry {
    /// The QMP command: `device_add`, `getfd`..., or `human-monitor-command` for an HMP
    /// command kept as text.
    pub command: String,
    /// Its arguments, as the client gave them; an `add-fd` also names the `fdset-id` QEMU
    /// chose, so that the new generation gives the set the same number.
    pub arguments: Value,
    /// The fds to pass with it by SCM_RIGHTS: one for `getfd` and `add-fd`, none for the
    /// rest. Empty for those too when the fd could not be kept, so that replaying fails.
    pub fds: Vec<OwnedFd>,
    /// The proxied monitor the command came through, in [`crate::proxy::Proxy::add`] order.
    /// QEMU keeps `getfd` names per monitor: a later command finds the name only on the
    /// monitor it was given on.
    pub monitor: usize,
    holds: Holds,
    /// For `getfd` and `add-fd`: the addition that took the fd (a netdev its tap fd, a block
    /// node its fd set's file), which the fd now lives and dies with.
    used_by: Option<Target>,
}

impl Entry {
    /// Whether `ret`, what QEMU returned when this entry was replayed, means it succeeded. An
    /// HMP command replayed through `human-monitor-command` reports failure only as text.
    pub fn succeeded(&self, ret: &Value) -> bool {
        if self.command != "human-monitor-command" {
            return true;
        }
        let word = self.arguments["command-line"]
            .as_str()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("");
        ret.as_str().is_some_and(|text| printed_ok(word, text))
    }
}

/// What a journal entry stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holds {
    /// Something that exists because of this command.
    Added(Target),
    /// A `device_del` whose device is not gone yet, or one of a device from the command line.
    Unplug(String),
    /// A `getfd` name, on the entry's monitor.
    FdName(String),
    /// An `add-fd`: the fd numbered `fd` in set `set`. `removed`: a `remove-fd` took it out
    /// while a journaled addition used it, so it goes with that addition.
    FdSet {
        set: i64,
        fd: Option<i64>,
        removed: bool,
    },
    /// The latest `set_link` of a NIC or netdev.
    Link(String),
    /// A removal of something the command line made, which the new generation has too.
    Kept,
}

/// Something an addition makes, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Device(String),
    Netdev(String),
    Node(String),
    Drive(String),
    Chardev(String),
    Object(String),
    /// A `device_add` without `id`: nothing names it again.
    Anonymous,
}

/// What `remove-fd` found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Removal {
    NotFound,
    Dropped,
    /// Fds a journaled addition uses, by the last of them.
    InUse(Target),
}

/// What a successful command does to the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Add(Target),
    Remove(Target),
    Unplug(String),
    GetFd(String),
    CloseFd(String),
    AddFd,
    RemoveFd {
        set: i64,
        fd: Option<i64>,
    },
    Link(String),
    /// Nothing, beyond using `getfd` names.
    Other,
}

/// A client's command as the journal sees it, read when the proxy forwards it and kept until
/// QEMU answers.
#[derive(Debug)]
pub(crate) struct Command {
    command: String,
    arguments: Value,
    effect: Effect,
    /// The HMP line, for HMP commands.
    line: Option<String>,
    /// QEMU answers with HMP text: an HMP monitor's output, or `human-monitor-command`'s.
    printed: bool,
    takes_fd: bool,
}

/// How QEMU answered a command.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A QMP `return`, with its value.
    Return(Value),
    /// A QMP `error`.
    Error,
    /// What an HMP command printed before the next prompt.
    Printed(String),
}

impl Command {
    /// A QMP command, `execute` or `exec-oob`, with its `arguments`.
    pub(crate) fn qmp(name: &str, arguments: Value) -> Command {
        if name == "human-monitor-command" {
            if let Some(mut cmd) = arguments["command-line"].as_str().and_then(Command::text) {
                // It runs on a monitor of its own, without the connection's fds.
                cmd.takes_fd = false;
                return cmd;
            }
        }
        let s = |key: &str| arguments[key].as_str().map(str::to_owned);
        let named =
            |make: fn(String) -> Target, key| s(key).map_or(Effect::Other, |n| make(n).into());
        let effect = match name {
            "device_add" => Effect::Add(s("id").map_or(Target::Anonymous, Target::Device)),
            "device_del" => s("id").map_or(Effect::Other, |id| Effect::Unplug(device_id(&id))),
            "blockdev-add" => named(Target::Node, "node-name"),
            "netdev_add" => named(Target::Netdev, "id"),
            "chardev-add" => named(Target::Chardev, "id"),
            "object-add" => named(Target::Object, "id"),
            "blockdev-del" => removal(s("node-name"), Target::Node),
            "netdev_del" => removal(s("id"), Target::Netdev),
            "chardev-remove" => removal(s("id"), Target::Chardev),
            "object-del" => removal(s("id"), Target::Object),
            "getfd" => s("fdname").map_or(Effect::Other, Effect::GetFd),
            "closefd" => s("fdname").map_or(Effect::Other, Effect::CloseFd),
            "add-fd" => Effect::AddFd,
            "remove-fd" => match arguments["fdset-id"].as_i64() {
                Some(set) => Effect::RemoveFd {
                    set,
                    fd: arguments["fd"].as_i64(),
                },
                None => Effect::Other,
            },
            "set_link" => s("name").map_or(Effect::Other, Effect::Link),
            _ => Effect::Other,
        };
        Command {
            command: name.to_owned(),
            takes_fd: matches!(effect, Effect::GetFd(_) | Effect::AddFd),
            arguments,
            effect,
            line: None,
            printed: false,
        }
    }

    /// A line typed on an HMP monitor, without its line end. `None` for an empty line.
    pub(crate) fn hmp(line: &str) -> Option<Command> {
        Command::text(line)
    }

    fn text(line: &str) -> Option<Command> {
        // HMP skips blanks before the command name (`monitor_parse_command`).
        let line = line.trim();
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if word.is_empty() {
            return None;
        }
        let rest = rest.trim_start();
        let args = hmp_args(rest);
        let first = args.first().cloned();
        let qmp =
            |name: &str, arguments: Value, effect: Effect| (name.to_owned(), arguments, effect);
        let raw = |effect: Effect| {
            let arguments = json!({ "command-line": line });
            ("human-monitor-command".to_owned(), arguments, effect)
        };
        let (command, arguments, effect) = match (word, first) {
            ("device_add", _) => raw(Effect::Add(
                option(rest, "id").map_or(Target::Anonymous, Target::Device),
            )),
            ("netdev_add", _) => {
                raw(option(rest, "id").map_or(Effect::Other, |id| Target::Netdev(id).into()))
            }
            ("object_add", _) => {
                raw(option(rest, "id").map_or(Effect::Other, |id| Target::Object(id).into()))
            }
            ("chardev-add", _) => {
                raw(option(rest, "id").map_or(Effect::Other, |id| Target::Chardev(id).into()))
            }
            ("drive_add", _) => raw(drive_add(&args)),
            ("drive_del", Some(id)) => raw(Effect::Remove(Target::Drive(id))),
            ("device_del", Some(id)) => {
                let effect = Effect::Unplug(device_id(&id));
                qmp("device_del", json!({ "id": id }), effect)
            }
            ("netdev_del", Some(id)) => {
                let effect = Effect::Remove(Target::Netdev(id.clone()));
                qmp("netdev_del", json!({ "id": id }), effect)
            }
            ("chardev-remove", Some(id)) => {
                let effect = Effect::Remove(Target::Chardev(id.clone()));
                qmp("chardev-remove", json!({ "id": id }), effect)
            }
            ("object_del", Some(id)) => {
                let effect = Effect::Remove(Target::Object(id.clone()));
                qmp("object-del", json!({ "id": id }), effect)
            }
            ("getfd", Some(name)) => qmp(
                "getfd",
                json!({ "fdname": name }),
                Effect::GetFd(name.clone()),
            ),
            ("closefd", Some(name)) => qmp(
                "closefd",
                json!({ "fdname": name }),
                Effect::CloseFd(name.clone()),
            ),
            ("set_link", Some(name)) => match args.get(1).map(String::as_str) {
                Some(state @ ("on" | "off")) => {
                    let arguments = json!({ "name": name, "up": state == "on" });
                    qmp("set_link", arguments, Effect::Link(name.clone()))
                }
                _ => (String::new(), Value::Null, Effect::Other),
            },
            _ => (String::new(), Value::Null, Effect::Other),
        };
        Some(Command {
            command,
            arguments,
            takes_fd: matches!(effect, Effect::GetFd(_)),
            effect,
            line: Some(line.to_owned()),
            printed: true,
        })
    }

    /// Whether QEMU hands it the fds the connection received last: `getfd` and `add-fd`
    /// take them with `qemu_chr_fe_get_msgfd`, which also forgets them.
    pub(crate) fn takes_fd(&self) -> bool {
        self.takes_fd
    }

    /// Whether it names the `getfd` name `name`: as a value (`"fdname": "X"`), in a URI
    /// (`fd:X`), in a list (`fds=X:Y`), or as an HMP option (`fd=X`).
    fn mentions(&self, name: &str) -> bool {
        match &self.line {
            Some(line) => line
                .split([' ', ',', '=', ':', '\t'])
                .any(|token| token == name),
            None => any_string(&self.arguments, &mut |s| s.split(':').any(|p| p == name)),
        }
    }

    /// Whether it opens fd set `set` by its path, `/dev/fdset/N`.
    fn mentions_fdset(&self, set: i64) -> bool {
        let path = format!("/dev/fdset/{set}");
        let found = |s: &str| {
            s.match_indices(&path)
                .any(|(at, _)| !s[at + path.len()..].starts_with(|c: char| c.is_ascii_digit()))
        };
        match &self.line {
            Some(line) => found(line),
            None => any_string(&self.arguments, &mut |s| found(s)),
        }
    }
}

impl From<Target> for Effect {
    fn from(t: Target) -> Effect {
        Effect::Add(t)
    }
}

fn removal(name: Option<String>, make: fn(String) -> Target) -> Effect {
    name.map_or(Effect::Other, |n| Effect::Remove(make(n)))
}

/// `drive_add [-n] ADDR OPTS`: a drive named by `id=`, or with `-n` a node by `node-name=`.
fn drive_add(args: &[String]) -> Effect {
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

/// A device's id as DEVICE_DELETED names it: `device_del` also takes the QOM path.
fn device_id(id: &str) -> String {
    id.strip_prefix(PERIPHERAL).unwrap_or(id).to_owned()
}

/// The value of `key` in QEMU option syntax (`driver,id=x,a=b`, a doubled comma standing for a
/// comma), or in the JSON form `object_add` also takes.
fn option(opts: &str, key: &str) -> Option<String> {
    let opts = opts.trim();
    if opts.starts_with('{') {
        let v: Value = serde_json::from_str(opts).ok()?;
        return v.get(key)?.as_str().map(str::to_owned);
    }
    let mut parts = vec![String::new()];
    let mut chars = opts.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    let prefix = format!("{key}=");
    parts
        .into_iter()
        .find_map(|p| p.strip_prefix(&prefix).map(str::to_owned))
}

/// HMP's arguments split as its string arguments are read (`get_str` in `monitor/hmp.c`):
/// blank-separated, or double-quoted with backslash escapes.
fn hmp_args(rest: &str) -> Vec<String> {
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
fn printed_ok(word: &str, text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("warning:"))
        .all(|l| word == "drive_add" && l == "OK")
}

fn any_string(v: &Value, f: &mut impl FnMut(&str) -> bool) -> bool {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().any(|v| any_string(v, f)),
        Value::Object(o) => o.values().any(|v| any_string(v, f)),
        _ => false,
    }
}

/// The hot-plug journal of one VM, across its generations.
#[derive(Debug, Default)]
pub struct Journal {
    entries: Vec<Entry>,
    changes: u64,
    /// DEVICE_DELETED events applied, by timestamp and device: every QMP monitor gets a copy
    /// of each event, and a copy read late must not delete a device added again since.
    deleted: VecDeque<(Value, String)>,
}

impl Journal {
    /// Replay these into a new generation, in order, before `migrate-incoming`: each with
    /// its [`Entry::fds`] passed by SCM_RIGHTS, and checked with [`Entry::succeeded`]. A
    /// replay that fails must abort the upgrade.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was hot-plugged (or all of it was undone).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A count of changes so far: a replay is complete only if this did not move between its
    /// start and the switch to the new generation.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Takes note of a QMP event. DEVICE_DELETED completes a device's removal: its
    /// `device_add`, `device_del` and `set_link` entries, and the `getfd` fds it took, go.
    /// The same event read from several monitors counts once.
    pub fn event(&mut self, event: &Value) {
        if event["event"] != "DEVICE_DELETED" {
            return;
        }
        let data = &event["data"];
        let id = match data["device"].as_str().filter(|d| !d.is_empty()) {
            Some(id) => id.to_owned(),
            None => match data["path"].as_str() {
                Some(path) => device_id(path),
                None => return,
            },
        };
        if let Some(ts) = event.get("timestamp") {
            let key = (ts.clone(), id.clone());
            if self.deleted.contains(&key) {
                return;
            }
            if self.deleted.len() == DELETED_MEMORY {
                self.deleted.pop_front();
            }
            self.deleted.push_back(key);
        }
        // A device from the command line keeps its device_del: the new generation starts
        // with the device, and the journal has nothing else to say it is gone.
        if let Some(i) = self.added(&Target::Device(id)) {
            self.undo(i);
            self.changes += 1;
        }
    }

    /// Records a command QEMU answered with `outcome`; `fd` is a copy of the fd QEMU took
    /// for it, if it takes one. Only a success changes the journal.
    pub(crate) fn record(
        &mut self,
        monitor: usize,
        cmd: Command,
        outcome: Outcome,
        fd: Option<OwnedFd>,
    ) {
        let word = cmd
            .line
            .as_deref()
            .and_then(|l| l.split_whitespace().next());
        let word = word.unwrap_or("");
        let ret = match outcome {
            Outcome::Return(v) if !cmd.printed => v,
            Outcome::Return(Value::String(text)) | Outcome::Printed(text)
                if printed_ok(word, &text) =>
            {
                Value::Null
            }
            _ => return,
        };
        let mut changed = self.note_uses(monitor, &cmd);
        let Command {
            command,
            mut arguments,
            effect,
            ..
        } = cmd;
        let add = |holds, fd: Option<OwnedFd>, arguments| Entry {
            command: command.clone(),
            arguments,
            fds: fd.into_iter().collect(),
            monitor,
            holds,
            used_by: None,
        };
        let entry = match effect {
            Effect::Other => None,
            Effect::Add(t) => Some(add(Holds::Added(t), None, arguments)),
            Effect::Remove(t) => {
                let found = self.added(&t).or_else(|| match &t {
                    // drive_del also deletes a node by its node-name.
                    Target::Drive(id) => self.added(&Target::Node(id.clone())),
                    _ => None,
                });
                match found {
                    Some(i) => {
                        self.undo(i);
                        changed = true;
                        None
                    }
                    None => {
                        if let Target::Netdev(id) = t {
                            self.entries.retain(|e| e.holds != Holds::Link(id.clone()));
                        }
                        Some(add(Holds::Kept, None, arguments))
                    }
                }
            }
            // Asked twice, the device goes once.
            Effect::Unplug(id) => {
                let holds = Holds::Unplug(id);
                let asked = self.entries.iter().any(|e| e.holds == holds);
                (!asked).then(|| add(holds, None, arguments))
            }
            Effect::GetFd(name) => {
                // A name given again replaces the fd QEMU had under it, and closes that.
                self.forget_name(monitor, &name);
                Some(add(Holds::FdName(name), fd, arguments))
            }
            Effect::CloseFd(name) => {
                changed |= self.forget_name(monitor, &name);
                None
            }
            Effect::AddFd => match (ret["fdset-id"].as_i64(), &mut arguments) {
                (Some(set), Value::Object(args)) => {
                    args.insert("fdset-id".into(), set.into());
                    let holds = Holds::FdSet {
                        set,
                        fd: ret["fd"].as_i64(),
                        removed: false,
                    };
                    Some(add(holds, fd, arguments))
                }
                _ => None,
            },
            Effect::RemoveFd { set, fd } => match self.remove_fd(set, fd) {
                Removal::Dropped => {
                    changed = true;
                    None
                }
                // Replayed after the addition using the fd, so that the new generation also
                // closes it once that goes; dropped with the addition.
                Removal::InUse(t) => {
                    let mut e = add(Holds::Kept, None, arguments);
                    e.used_by = Some(t);
                    Some(e)
                }
                // A set from the command line (`-add-fd`), which the new generation has too.
                Removal::NotFound => Some(add(Holds::Kept, None, arguments)),
            },
            Effect::Link(name) => {
                let holds = Holds::Link(name);
                self.entries.retain(|e| e.holds != holds);
                Some(add(holds, None, arguments))
            }
        };
        if let Some(e) = entry {
            self.entries.push(e);
            changed = true;
        }
        if changed {
            self.changes += 1;
        }
    }

    /// The latest entry that made `target`.
    fn added(&self, target: &Target) -> Option<usize> {
        let holds = Holds::Added(target.clone());
        self.entries.iter().rposition(|e| e.holds == holds)
    }

    /// Drops the addition at `i`, now undone, and what only mattered while it existed.
    fn undo(&mut self, i: usize) {
        let Holds::Added(target) = self.entries.remove(i).holds else {
            return;
        };
        let used = Some(target.clone());
        self.entries.retain_mut(|e| {
            if e.used_by == used {
                return match e.holds {
                    // Still in its set in QEMU, unless the client removed it meanwhile.
                    Holds::FdSet { removed, .. } => {
                        e.used_by = None;
                        !removed
                    }
                    // Consumed by the addition, closed with it.
                    _ => false,
                };
            }
            match (&e.holds, &target) {
                (Holds::Link(l), Target::Device(id) | Target::Netdev(id)) => l != id,
                (Holds::Unplug(d), Target::Device(id)) => d != id,
                _ => true,
            }
        });
    }

    /// Forgets the fd a `getfd` gave `name` on `monitor`, if QEMU still has it under that
    /// name. Returns whether there was one.
    fn forget_name(&mut self, monitor: usize, name: &str) -> bool {
        let live = |e: &Entry| {
            e.monitor == monitor
                && e.used_by.is_none()
                && matches!(&e.holds, Holds::FdName(n) if n == name)
        };
        match self.entries.iter().rposition(live) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// Takes the fds `remove-fd` removes out of the journal: at once if unused. QEMU closes
    /// an fd in use only once its user is gone, so those stay, marked, until their addition
    /// goes.
    fn remove_fd(&mut self, set: i64, fd: Option<i64>) -> Removal {
        let mut removal = Removal::NotFound;
        self.entries.retain_mut(|e| match &mut e.holds {
            Holds::FdSet {
                set: s,
                fd: f,
                removed,
            } if *s == set && (fd.is_none() || *f == fd) => {
                *removed = true;
                match &e.used_by {
                    Some(t) => removal = Removal::InUse(t.clone()),
                    None if removal == Removal::NotFound => removal = Removal::Dropped,
                    None => {}
                }
                e.used_by.is_some()
            }
            _ => true,
        });
        removal
    }

    /// Follows where `getfd` names and fd sets went. QEMU hands a named fd over to the first
    /// command that names it, and forgets the name (`monitor_get_fd`): to an addition the
    /// journal keeps, the fd is kept with it; to anything else (a `migrate` to `fd:X`, a
    /// dump), it is gone from the monitor and dropped here too, which also lets the fd's
    /// other end see EOF. A journaled addition that opens `/dev/fdset/N` keeps the set's
    /// fds while it exists. Returns whether anything changed.
    fn note_uses(&mut self, monitor: usize, cmd: &Command) -> bool {
        if matches!(cmd.effect, Effect::GetFd(_) | Effect::CloseFd(_)) {
            return false;
        }
        let adds = match &cmd.effect {
            Effect::Add(t) => Some(t.clone()),
            _ => None,
        };
        let mut changed = false;
        self.entries.retain_mut(|e| {
            if e.used_by.is_some() {
                return true;
            }
            match &e.holds {
                Holds::FdName(name) if e.monitor == monitor && cmd.mentions(name) => {
                    changed = true;
                    e.used_by.clone_from(&adds);
                    adds.is_some()
                }
                Holds::FdSet { set, .. } if adds.is_some() && cmd.mentions_fdset(*set) => {
                    changed = true;
                    e.used_by.clone_from(&adds);
                    true
                }
                _ => true,
            }
        });
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::*;

    fn qmp(j: &mut Journal, name: &str, args: Value, ret: Value) {
        j.record(0, Command::qmp(name, args), Outcome::Return(ret), None);
    }

    fn ok(j: &mut Journal, name: &str, args: Value) {
        qmp(j, name, args, json!({}));
    }

    fn hmp(j: &mut Journal, line: &str, printed: &str, fd: Option<OwnedFd>) {
        let cmd = Command::hmp(line).unwrap();
        j.record(1, cmd, Outcome::Printed(printed.into()), fd);
    }

    fn commands(j: &Journal) -> Vec<(String, Value)> {
        let e = j.entries().iter();
        e.map(|e| (e.command.clone(), e.arguments.clone()))
            .collect()
    }

    fn names(j: &Journal) -> Vec<&str> {
        j.entries().iter().map(|e| e.command.as_str()).collect()
    }

    fn deleted(id: &str, seconds: u64) -> Value {
        json!({"event": "DEVICE_DELETED", "data": {"device": id, "path": format!("{PERIPHERAL}{id}")},
               "timestamp": {"seconds": seconds, "microseconds": 0}})
    }

    /// A pipe: the read end, and the write end for the journal. Reading gives EOF once every
    /// copy of the write end is closed.
    fn pipe() -> (std::fs::File, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (std::fs::File::from(r), w)
    }

    fn closed(r: &mut std::fs::File) -> bool {
        nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        matches!(r.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn additions_undone_leave_nothing_and_removals_of_the_command_line_stay() {
        let mut j = Journal::default();
        ok(&mut j, "netdev_add", json!({"type": "user", "id": "n1"}));
        ok(
            &mut j,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "b1"}),
        );
        ok(
            &mut j,
            "chardev-add",
            json!({"id": "c1", "backend": {"type": "null", "data": {}}}),
        );
        ok(
            &mut j,
            "object-add",
            json!({"qom-type": "iothread", "id": "o1"}),
        );
        assert_eq!(
            names(&j),
            ["netdev_add", "blockdev-add", "chardev-add", "object-add"]
        );
        ok(&mut j, "blockdev-del", json!({"node-name": "b1"}));
        ok(&mut j, "netdev_del", json!({"id": "n1"}));
        ok(&mut j, "chardev-remove", json!({"id": "c1"}));
        ok(&mut j, "object-del", json!({"id": "o1"}));
        assert!(j.is_empty());
        // Made by the command line: the new generation has it, and must lose it too.
        ok(&mut j, "netdev_del", json!({"id": "hostnet0"}));
        assert_eq!(
            commands(&j),
            [("netdev_del".into(), json!({"id": "hostnet0"}))]
        );
    }

    #[test]
    fn a_device_goes_with_its_device_deleted_event_once() {
        let mut j = Journal::default();
        ok(
            &mut j,
            "device_add",
            json!({"driver": "virtio-net-pci", "id": "d1"}),
        );
        ok(&mut j, "set_link", json!({"name": "d1", "up": false}));
        ok(
            &mut j,
            "device_del",
            json!({"id": "/machine/peripheral/d1"}),
        );
        ok(&mut j, "device_del", json!({"id": "d1"}));
        assert_eq!(names(&j), ["device_add", "set_link", "device_del"]);
        let changes = j.changes();
        j.event(&json!({"event": "DEVICE_TRAY_MOVED", "data": {"id": "d1"}}));
        assert_eq!(j.changes(), changes);
        j.event(&deleted("d1", 10));
        assert!(j.is_empty());
        // Added again; another monitor's copy of the old event must not remove it.
        ok(
            &mut j,
            "device_add",
            json!({"driver": "virtio-net-pci", "id": "d1"}),
        );
        j.event(&deleted("d1", 10));
        assert_eq!(names(&j), ["device_add"]);
        // Only the path, as for a device the event has no id for.
        let by_path =
            json!({"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/d1"}});
        j.event(&by_path);
        assert!(j.is_empty());
    }

    #[test]
    fn a_device_from_the_command_line_keeps_its_device_del() {
        let mut j = Journal::default();
        ok(&mut j, "device_del", json!({"id": "net0"}));
        j.event(&deleted("net0", 1));
        assert_eq!(commands(&j), [("device_del".into(), json!({"id": "net0"}))]);
    }

    #[test]
    fn failures_are_not_recorded() {
        let mut j = Journal::default();
        let cmd = Command::qmp("device_add", json!({"driver": "x", "id": "d"}));
        j.record(0, cmd, Outcome::Error, None);
        hmp(
            &mut j,
            "netdev_add user,id=n1",
            "Try \"help netdev_add\" for more information\r\n",
            None,
        );
        hmp(&mut j, "drive_del d1", "Device 'd1' not found\r\n", None);
        hmp(
            &mut j,
            "device_add foo,id=x",
            "Error: 'foo' is not a valid device model name\r\n",
            None,
        );
        let hmc = |line: &str| json!({ "command-line": line });
        qmp(
            &mut j,
            "human-monitor-command",
            hmc("object_add iothread,id=i"),
            json!("Error: no\r\n"),
        );
        assert!(j.is_empty());
        assert_eq!(j.changes(), 0);
        qmp(
            &mut j,
            "human-monitor-command",
            hmc("object_add iothread,id=i"),
            json!(""),
        );
        hmp(
            &mut j,
            "netdev_add user,id=n1",
            "warning: deprecated\r\n",
            None,
        );
        assert_eq!(
            names(&j),
            ["human-monitor-command", "human-monitor-command"]
        );
    }

    #[test]
    fn hmp_commands_become_qmp_where_the_arguments_are_simple() {
        let mut j = Journal::default();
        let (_r, w) = pipe();
        hmp(&mut j, "  getfd tap0", "", Some(w));
        hmp(&mut j, "netdev_add tap,id=n1,fd=tap0", "", None);
        hmp(
            &mut j,
            "device_add virtio-net-pci,netdev=n1,id=nic1",
            "",
            None,
        );
        hmp(&mut j, "set_link nic1 off", "", None);
        hmp(
            &mut j,
            "object_add {\"qom-type\":\"iothread\",\"id\":\"io1\"}",
            "",
            None,
        );
        hmp(&mut j, "chardev-add null,id=c1", "", None);
        hmp(
            &mut j,
            "drive_add 0 if=none,id=dr1,file=/dev/null,format=raw",
            "OK\r\n",
            None,
        );
        hmp(
            &mut j,
            "drive_add -n 0 node-name=nn1,driver=null-co",
            "",
            None,
        );
        hmp(&mut j, "getfd spare", "", None);
        let hmc = |line: &str| {
            (
                "human-monitor-command".to_owned(),
                json!({ "command-line": line }),
            )
        };
        assert_eq!(
            commands(&j),
            [
                ("getfd".into(), json!({"fdname": "tap0"})),
                hmc("netdev_add tap,id=n1,fd=tap0"),
                hmc("device_add virtio-net-pci,netdev=n1,id=nic1"),
                ("set_link".into(), json!({"name": "nic1", "up": false})),
                hmc("object_add {\"qom-type\":\"iothread\",\"id\":\"io1\"}"),
                hmc("chardev-add null,id=c1"),
                hmc("drive_add 0 if=none,id=dr1,file=/dev/null,format=raw"),
                hmc("drive_add -n 0 node-name=nn1,driver=null-co"),
                ("getfd".into(), json!({"fdname": "spare"})),
            ]
        );
        assert_eq!(j.entries()[0].fds.len(), 1);
        assert_eq!(j.entries()[0].monitor, 1);
        hmp(&mut j, "closefd spare", "", None);
        hmp(&mut j, "drive_del dr1", "", None);
        hmp(&mut j, "drive_del nn1", "", None);
        hmp(&mut j, "chardev-remove c1", "", None);
        hmp(&mut j, "object_del io1", "", None);
        hmp(&mut j, "device_del \"nic1\"", "", None);
        assert_eq!(names(&j)[3..], ["set_link", "device_del"]);
        j.event(&deleted("nic1", 5));
        hmp(&mut j, "netdev_del n1", "", None);
        assert!(j.is_empty(), "{:?}", commands(&j));
    }

    #[test]
    fn set_link_keeps_the_latest_per_device() {
        let mut j = Journal::default();
        ok(&mut j, "set_link", json!({"name": "net0", "up": false}));
        ok(&mut j, "set_link", json!({"name": "net1", "up": false}));
        ok(&mut j, "set_link", json!({"name": "net0", "up": true}));
        assert_eq!(
            commands(&j),
            [
                ("set_link".into(), json!({"name": "net1", "up": false})),
                ("set_link".into(), json!({"name": "net0", "up": true})),
            ]
        );
    }

    #[test]
    fn a_getfd_fd_is_kept_while_its_netdev_exists() {
        let mut j = Journal::default();
        let (mut r, w) = pipe();
        let ino = nix::sys::stat::fstat(w.as_raw_fd()).unwrap().st_ino;
        let cmd = Command::qmp("getfd", json!({"fdname": "fd-net1"}));
        assert!(cmd.takes_fd());
        j.record(0, cmd, Outcome::Return(json!({})), Some(w));
        let args = json!({"type": "tap", "id": "net1", "fd": "fd-net1"});
        ok(&mut j, "netdev_add", args);
        // The same name on another monitor is another fd.
        j.record(
            1,
            Command::qmp("closefd", json!({"fdname": "fd-net1"})),
            Outcome::Return(json!({})),
            None,
        );
        assert_eq!(names(&j), ["getfd", "netdev_add"]);
        let kept = &j.entries()[0].fds[0];
        assert_eq!(nix::sys::stat::fstat(kept.as_raw_fd()).unwrap().st_ino, ino);
        assert!(!closed(&mut r));
        ok(&mut j, "netdev_del", json!({"id": "net1"}));
        assert!(j.is_empty());
        assert!(closed(&mut r));
    }

    #[test]
    fn a_getfd_fd_used_by_something_unjournaled_or_closed_is_dropped() {
        let mut j = Journal::default();
        let (mut r, w) = pipe();
        j.record(
            0,
            Command::qmp("getfd", json!({"fdname": "migrate"})),
            Outcome::Return(json!({})),
            Some(w),
        );
        ok(&mut j, "query-status", json!({}));
        assert_eq!(names(&j), ["getfd"]);
        ok(&mut j, "migrate", json!({"uri": "fd:migrate"}));
        assert!(j.is_empty());
        // libvirt's `virsh save` reads the other end until EOF.
        assert!(closed(&mut r));
        let (mut r, w) = pipe();
        j.record(
            0,
            Command::qmp("getfd", json!({"fdname": "x"})),
            Outcome::Return(json!({})),
            Some(w),
        );
        let (_r2, w2) = pipe();
        j.record(
            0,
            Command::qmp("getfd", json!({"fdname": "x"})),
            Outcome::Return(json!({})),
            Some(w2),
        );
        assert_eq!(names(&j), ["getfd"]);
        assert!(closed(&mut r), "a name given again replaces its fd");
        ok(&mut j, "closefd", json!({"fdname": "x"}));
        assert!(j.is_empty());
    }

    #[test]
    fn add_fd_names_its_set_and_remove_fd_takes_it_out() {
        let mut j = Journal::default();
        let (_r, w) = pipe();
        let cmd = Command::qmp("add-fd", json!({"opaque": "log"}));
        assert!(cmd.takes_fd());
        j.record(
            0,
            cmd,
            Outcome::Return(json!({"fdset-id": 3, "fd": 25})),
            Some(w),
        );
        assert_eq!(
            commands(&j),
            [("add-fd".into(), json!({"opaque": "log", "fdset-id": 3}))]
        );
        assert_eq!(j.entries()[0].fds.len(), 1);
        ok(&mut j, "remove-fd", json!({"fdset-id": 3, "fd": 26}));
        assert_eq!(
            names(&j),
            ["add-fd", "remove-fd"],
            "not this fd: the command line's"
        );
        ok(&mut j, "remove-fd", json!({"fdset-id": 3, "fd": 25}));
        assert_eq!(names(&j), ["remove-fd"]);
    }

    #[test]
    fn an_fd_set_in_use_stays_until_its_user_goes() {
        let mut j = Journal::default();
        let (mut r, w) = pipe();
        j.record(
            0,
            Command::qmp("add-fd", json!({"fdset-id": 1})),
            Outcome::Return(json!({"fdset-id": 1, "fd": 30})),
            Some(w),
        );
        let file = json!({"driver": "file", "filename": "/dev/fdset/1", "node-name": "f1"});
        ok(&mut j, "blockdev-add", file);
        ok(
            &mut j,
            "blockdev-add",
            json!({"driver": "raw", "file": "f1", "node-name": "fmt1"}),
        );
        ok(&mut j, "remove-fd", json!({"fdset-id": 1}));
        assert_eq!(
            names(&j),
            ["add-fd", "blockdev-add", "blockdev-add", "remove-fd"]
        );
        ok(&mut j, "blockdev-del", json!({"node-name": "fmt1"}));
        assert!(!closed(&mut r));
        ok(&mut j, "blockdev-del", json!({"node-name": "f1"}));
        assert!(j.is_empty(), "{:?}", commands(&j));
        assert!(closed(&mut r));
        // Not removed by the client: the fd stays in its set after its user goes.
        let (_r, w) = pipe();
        j.record(
            0,
            Command::qmp("add-fd", json!({})),
            Outcome::Return(json!({"fdset-id": 0, "fd": 31})),
            Some(w),
        );
        ok(
            &mut j,
            "blockdev-add",
            json!({"driver": "file", "filename": "/dev/fdset/0", "node-name": "f0"}),
        );
        ok(&mut j, "blockdev-del", json!({"node-name": "f0"}));
        assert_eq!(names(&j), ["add-fd"]);
        ok(&mut j, "remove-fd", json!({"fdset-id": 0}));
        assert!(j.is_empty());
    }

    #[test]
    fn replayed_hmp_text_is_judged_like_the_original() {
        let mut j = Journal::default();
        let hmc = |line: &str| json!({ "command-line": line });
        qmp(
            &mut j,
            "human-monitor-command",
            hmc("drive_add 0 if=none,id=d"),
            json!("OK\r\n"),
        );
        ok(&mut j, "netdev_add", json!({"type": "user", "id": "n"}));
        let e = j.entries();
        assert!(e[0].succeeded(&json!("OK\r\n")));
        assert!(!e[0].succeeded(&json!("Could not open 'x'\r\n")));
        assert!(e[1].succeeded(&json!({})));
    }

    #[test]
    fn options_are_read_as_qemu_reads_them() {
        assert_eq!(
            option("virtio-blk,id=a,,b,serial=x", "id").as_deref(),
            Some("a,b")
        );
        assert_eq!(option("driver=x,serial=id=y", "id"), None);
        assert_eq!(hmp_args(r#" "a b\"c"  d "#), ["a b\"c", "d"]);
        assert!(Command::hmp(" \r").is_none());
        let cmd = Command::qmp(
            "netdev_add",
            json!({"type": "tap", "id": "n", "fds": "a:b"}),
        );
        assert!(cmd.mentions("b") && !cmd.mentions("n2"));
        let cmd = Command::qmp(
            "blockdev-add",
            json!({"filename": "/dev/fdset/12", "node-name": "x"}),
        );
        assert!(cmd.mentions_fdset(12) && !cmd.mentions_fdset(1));
    }
}
