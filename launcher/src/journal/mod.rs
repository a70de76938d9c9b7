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

use crate::json::JsonExt;
use serde_json::{json, Value};

mod args;
mod blockgraph;

use args::{
    any_string, device_id, display_setting, drive_add, hmp_args, option, printed_ok, removal,
};
pub use blockgraph::BlockArgv;

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
        let word = self
            .arguments
            .at("/command-line")
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
    /// The latest `set_password` or `expire_password` of a display: its key names the
    /// command, protocol and display.
    Setting(String),
    /// A removal of something the command line made, which the new generation has too.
    Kept,
    /// A device on node `from` was moved to node `to` (a block job's pivot, or an external
    /// snapshot: `to` is then an overlay backed by `from`); see [`blockgraph`].
    Pivot {
        from: String,
        to: String,
        snapshot: bool,
    },
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
    /// A display password or its expiry, which a new generation must be given again: libvirt
    /// sets a VNC or SPICE password (`<graphics passwd=...>`) with `set_password` once, after
    /// start, and a display with `password=on` but none set lets nobody in.
    Setting(String),
    /// External snapshots taken: `(node, overlay)`.
    Snapshot(Vec<(String, String)>),
    /// A block job started that moves a device when completed.
    StartJob(blockgraph::Job),
    /// Completing (`true`) or cancelling a block job asked, by its id.
    AskJob(String, bool),
    /// A concluded block job dismissed, by its id.
    DismissJob(String),
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
    /// Whether this is `migrate` (QMP or HMP): the VM's users moving it themselves.
    pub(crate) fn is_migrate(&self) -> bool {
        let hmp_word = self
            .line
            .as_deref()
            .and_then(|l| l.split_whitespace().next());
        self.command == "migrate" || hmp_word == Some("migrate")
    }

    /// A QMP command, `execute` or `exec-oob`, with its `arguments`.
    pub(crate) fn qmp(name: &str, arguments: Value) -> Command {
        if name == "human-monitor-command" {
            if let Some(mut cmd) = arguments
                .at("/command-line")
                .as_str()
                .and_then(Command::text)
            {
                // It runs on a monitor of its own, without the connection's fds.
                cmd.takes_fd = false;
                return cmd;
            }
        }
        let s = |key: &str| {
            arguments
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
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
            "remove-fd" => match arguments.at("/fdset-id").as_i64() {
                Some(set) => Effect::RemoveFd {
                    set,
                    fd: arguments.at("/fd").as_i64(),
                },
                None => Effect::Other,
            },
            "set_link" => s("name").map_or(Effect::Other, Effect::Link),
            "set_password" | "expire_password" => s("protocol").map_or(Effect::Other, |p| {
                Effect::Setting(display_setting(name, &p, s("display").as_deref()))
            }),
            "blockdev-snapshot" | "transaction" => {
                let taken = blockgraph::snapshots(name, &arguments);
                if taken.is_empty() {
                    Effect::Other
                } else {
                    Effect::Snapshot(taken)
                }
            }
            "blockdev-mirror" | "block-commit" => blockgraph::Job::started_by(name, &arguments)
                .map_or(Effect::Other, Effect::StartJob),
            "job-complete" => s("id").map_or(Effect::Other, |id| Effect::AskJob(id, true)),
            "block-job-complete" => {
                s("device").map_or(Effect::Other, |id| Effect::AskJob(id, true))
            }
            "job-cancel" => s("id").map_or(Effect::Other, |id| Effect::AskJob(id, false)),
            "block-job-cancel" => s("device").map_or(Effect::Other, |id| Effect::AskJob(id, false)),
            "job-dismiss" => s("id").map_or(Effect::Other, Effect::DismissJob),
            "block-job-dismiss" => s("id").map_or(Effect::Other, Effect::DismissJob),
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
            // `set_password [-d DISPLAY] PROTOCOL PASSWORD [CONNECTED]`, `expire_password [-d
            // DISPLAY] PROTOCOL TIME`: kept as typed.
            ("set_password" | "expire_password", Some(first)) => {
                let (display, protocol) = match first.as_str() {
                    "-d" => (args.get(1).map(String::as_str), args.get(2)),
                    _ => (None, Some(&first)),
                };
                match protocol {
                    Some(p) => raw(Effect::Setting(display_setting(word, p, display))),
                    None => (String::new(), Value::Null, Effect::Other),
                }
            }
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

    /// Whether [`Journal::record`] reads what QEMU returned for it: the text of a
    /// `human-monitor-command`, the fd set and fd of an `add-fd`.
    pub(crate) fn needs_return(&self) -> bool {
        self.printed || self.effect == Effect::AddFd
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

/// The hot-plug journal of one VM, across its generations.
#[derive(Debug, Default)]
pub struct Journal {
    entries: Vec<Entry>,
    changes: u64,
    /// DEVICE_DELETED events applied, by timestamp and device: every QMP monitor gets a copy
    /// of each event, and a copy read late must not delete a device added again since.
    deleted: VecDeque<(Value, String)>,
    /// Block jobs under way that move a device when completed.
    jobs: Vec<blockgraph::Job>,
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
        if self.job_event(event) {
            self.changes += 1;
        }
        if event.at("/event") != "DEVICE_DELETED" {
            return;
        }
        let data = event.at("/data");
        let id = match data.at("/device").as_str().filter(|d| !d.is_empty()) {
            Some(id) => id.to_owned(),
            None => match data.at("/path").as_str() {
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
            Effect::AddFd => match (ret.at("/fdset-id").as_i64(), &mut arguments) {
                (Some(set), Value::Object(args)) => {
                    args.insert("fdset-id".into(), set.into());
                    let holds = Holds::FdSet {
                        set,
                        fd: ret.at("/fd").as_i64(),
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
            Effect::Setting(key) => {
                let holds = Holds::Setting(key);
                self.entries.retain(|e| e.holds != holds);
                Some(add(holds, None, arguments))
            }
            Effect::Snapshot(taken) => {
                for (node, overlay) in taken {
                    self.push_pivot(node, overlay, true);
                }
                changed = true;
                None
            }
            Effect::StartJob(job) => {
                self.start_job(job);
                None
            }
            Effect::AskJob(id, pivot) => {
                changed |= self.ask_job(&id, pivot);
                None
            }
            Effect::DismissJob(id) => {
                self.dismiss_job(&id);
                None
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

mod handover;
#[cfg(test)]
mod tests;
