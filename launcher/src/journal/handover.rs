//! The journal as a supervisor handover writes and reads it ([`crate::handover`]): every entry
//! with the fds it keeps, and the commands the proxy has forwarded and QEMU not yet answered,
//! which the new image reads again from their name, arguments or HMP line.

use std::os::fd::{AsFd, OwnedFd};

use crate::handover::fds::Take;
use crate::handover::state::{self, Fd};
use crate::handover::ImportError;

use super::{Command, Entry, Holds, Journal, Target};

impl Journal {
    /// Its part of the handed-over state.
    pub(crate) fn export(&self) -> state::Journal {
        state::Journal {
            entries: self
                .entries
                .iter()
                .map(|e| state::Entry {
                    command: e.command.clone(),
                    arguments: e.arguments.clone(),
                    fds: e.fds.iter().map(|fd| Fd::of(&fd.as_fd())).collect(),
                    monitor: e.monitor,
                    holds: holds_out(&e.holds),
                    used_by: e.used_by.as_ref().map(target_out),
                })
                .collect(),
            changes: self.changes,
            deleted: self.deleted.iter().cloned().collect(),
            jobs: self
                .jobs
                .iter()
                .map(super::blockgraph::Job::export)
                .collect(),
        }
    }

    /// The journal a handover brought.
    pub(crate) fn import(s: state::Journal, take: &mut Take) -> Result<Journal, ImportError> {
        let mut entries = Vec::new();
        for e in s.entries {
            let fds = e
                .fds
                .iter()
                .map(|fd| take.owned(*fd))
                .collect::<Result<Vec<OwnedFd>, _>>()?;
            entries.push(Entry {
                command: e.command,
                arguments: e.arguments,
                fds,
                monitor: e.monitor,
                holds: holds_in(e.holds),
                used_by: e.used_by.map(target_in),
            });
        }
        Ok(Journal {
            entries,
            changes: s.changes,
            deleted: s.deleted.into_iter().collect(),
            jobs: s
                .jobs
                .into_iter()
                .map(super::blockgraph::Job::import)
                .collect(),
        })
    }
}

impl Command {
    /// A forwarded command as the state keeps it.
    pub(crate) fn export(&self) -> state::Command {
        state::Command {
            command: self.command.clone(),
            arguments: self.arguments.clone(),
            line: self.line.clone(),
            printed: self.printed,
            takes_fd: self.takes_fd,
        }
    }

    /// The command read again as the proxy first read it: from its HMP line, or from its QMP
    /// name and arguments. What the journal makes of it (its effect) is this build's reading.
    pub(crate) fn import(s: state::Command) -> Option<Command> {
        let mut cmd = match &s.line {
            Some(line) => Command::text(line)?,
            None => Command::qmp(&s.command, s.arguments),
        };
        cmd.printed = s.printed;
        cmd.takes_fd = s.takes_fd;
        Some(cmd)
    }
}

fn target_out(t: &Target) -> state::Target {
    match t {
        Target::Device(s) => state::Target::Device(s.clone()),
        Target::Netdev(s) => state::Target::Netdev(s.clone()),
        Target::Node(s) => state::Target::Node(s.clone()),
        Target::Drive(s) => state::Target::Drive(s.clone()),
        Target::Chardev(s) => state::Target::Chardev(s.clone()),
        Target::Object(s) => state::Target::Object(s.clone()),
        Target::Anonymous => state::Target::Anonymous,
    }
}

fn target_in(t: state::Target) -> Target {
    match t {
        state::Target::Device(s) => Target::Device(s),
        state::Target::Netdev(s) => Target::Netdev(s),
        state::Target::Node(s) => Target::Node(s),
        state::Target::Drive(s) => Target::Drive(s),
        state::Target::Chardev(s) => Target::Chardev(s),
        state::Target::Object(s) => Target::Object(s),
        state::Target::Anonymous => Target::Anonymous,
    }
}

fn holds_out(h: &Holds) -> state::Holds {
    match h {
        Holds::Added(t) => state::Holds::Added(target_out(t)),
        Holds::Unplug(s) => state::Holds::Unplug(s.clone()),
        Holds::FdName(s) => state::Holds::FdName(s.clone()),
        Holds::FdSet { set, fd, removed } => state::Holds::FdSet {
            set: *set,
            fd: *fd,
            removed: *removed,
        },
        Holds::Link(s) => state::Holds::Link(s.clone()),
        Holds::Setting(s) => state::Holds::Setting(s.clone()),
        Holds::Kept => state::Holds::Kept,
        Holds::Pivot { from, to, snapshot } => state::Holds::Pivot {
            from: from.clone(),
            to: to.clone(),
            snapshot: *snapshot,
        },
    }
}

fn holds_in(h: state::Holds) -> Holds {
    match h {
        state::Holds::Added(t) => Holds::Added(target_in(t)),
        state::Holds::Unplug(s) => Holds::Unplug(s),
        state::Holds::FdName(s) => Holds::FdName(s),
        state::Holds::FdSet { set, fd, removed } => Holds::FdSet { set, fd, removed },
        state::Holds::Link(s) => Holds::Link(s),
        state::Holds::Setting(s) => Holds::Setting(s),
        state::Holds::Kept => Holds::Kept,
        state::Holds::Pivot { from, to, snapshot } => Holds::Pivot { from, to, snapshot },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Outcome;
    use serde_json::json;

    #[test]
    fn entries_and_pending_commands_cross_unchanged() {
        let mut j = Journal::default();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let cmd = Command::qmp("getfd", json!({"fdname": "tap0"}));
        j.record(0, cmd, Outcome::Return(json!({})), Some(r));
        let add = Command::qmp(
            "netdev_add",
            json!({"type": "tap", "id": "n1", "fd": "tap0"}),
        );
        j.record(0, add, Outcome::Return(json!({})), None);
        let hmp = Command::hmp("device_add virtio-net-pci,id=d1,netdev=n1").unwrap();
        j.record(1, hmp, Outcome::Printed(String::new()), None);
        let before = j.export();
        // As across the exec: the fds now belong to whoever takes them from the state.
        std::mem::forget(j);
        let text = serde_json::to_string(&before).unwrap();
        let read: state::Journal = serde_json::from_str(&text).unwrap();
        let fd = read.entries[0].fds[0];
        let mut take = Take::for_fds(&[fd]);
        let back = Journal::import(read, &mut take).unwrap();
        assert_eq!(
            serde_json::to_value(back.export()).unwrap(),
            serde_json::to_value(&before).unwrap()
        );
        // The fd went with its entry and stays with it: removing the netdev frees it.
        let mut back = back;
        back.record(
            0,
            Command::qmp("netdev_del", json!({"id": "n1"})),
            Outcome::Return(json!({})),
            None,
        );
        assert_eq!(
            back.len(),
            1,
            "only the device is left: {:?}",
            back.export()
        );

        for cmd in [
            Command::qmp("device_del", json!({"id": "d1"})),
            Command::hmp("getfd f").unwrap(),
            Command::qmp(
                "human-monitor-command",
                json!({"command-line": "drive_del x"}),
            ),
        ] {
            let s = cmd.export();
            let again = Command::import(s.clone()).unwrap().export();
            assert_eq!(
                serde_json::to_value(&again).unwrap(),
                serde_json::to_value(&s).unwrap()
            );
        }
    }
}
