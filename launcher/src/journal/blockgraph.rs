//! Block graph changes a replay through QMP cannot make: a device moved to another node.
//!
//! A block job's pivot (`blockdev-mirror` then `job-complete`: `virsh blockcopy --pivot`; an
//! active `block-commit` then `job-complete`: `virsh blockcommit --active --pivot`) and an
//! external snapshot (`blockdev-snapshot`, alone or in a `transaction`: `virsh
//! snapshot-create-as --disk-only` or `--memspec`) put another node under the disk's device.
//! QEMU has no command that moves a realized device to another node, so a new generation
//! started from the original command line could never be made to match: its device sits on
//! the original node, and libvirt's later `blockdev-del` of that node fails ("in use").
//!
//! Once the journal has seen such a pivot, a new generation is started with the block graph as
//! it is now: every node clients added (their `blockdev-add` arguments are what `-blockdev`
//! takes) on its command line, an overlay's `backing` set as the snapshot set it, and each
//! `-device drive=` pointing where the pivots took it. Those `blockdev-add`s are then not
//! replayed through QMP. Jobs that change backing links inside a chain without a pivot
//! (`block-stream`, a non-active `block-commit`) are not followed.

use serde_json::Value;

use crate::cmdline::CmdLine;

use super::{Entry, Holds, Journal, Target};

/// A block job whose completion moves the disk's device from one node to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The job's id: `job-id`, or the device it was started on.
    pub(crate) id: String,
    /// The node the device is on while the job runs.
    pub(crate) from: String,
    /// The node it is on once the job completes with a pivot.
    pub(crate) to: String,
    /// `job-complete` was asked: a completion is a pivot.
    pub(crate) pivot: bool,
    /// A cancel was asked: a ready mirror that is cancelled completes too, without a pivot.
    pub(crate) cancelled: bool,
    /// QEMU reported the job completed without error. The event and the reply to
    /// `job-complete` come on different connections, in either order.
    pub(crate) completed: bool,
}

impl Job {
    /// The job a command starts, if it ends in a pivot when completed: `blockdev-mirror`, and
    /// a `block-commit` of the active layer (its `device` is its top) into a named base.
    pub(crate) fn started_by(command: &str, args: &Value) -> Option<Job> {
        let s = |key: &str| args[key].as_str().map(str::to_owned);
        let (from, to) = match command {
            "blockdev-mirror" => (s("device")?, s("target")?),
            "block-commit" => {
                let device = s("device")?;
                if s("top-node").is_some_and(|top| top != device) {
                    return None;
                }
                (device, s("base-node")?)
            }
            _ => return None,
        };
        Some(Job {
            id: s("job-id").unwrap_or_else(|| from.clone()),
            from,
            to,
            pivot: false,
            cancelled: false,
            completed: false,
        })
    }
}

impl Job {
    /// As a supervisor handover writes it.
    pub(crate) fn export(&self) -> crate::handover::state::BlockJob {
        crate::handover::state::BlockJob {
            id: self.id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            pivot: self.pivot,
            cancelled: self.cancelled,
            completed: self.completed,
        }
    }

    /// As a supervisor handover brought it.
    pub(crate) fn import(j: crate::handover::state::BlockJob) -> Job {
        Job {
            id: j.id,
            from: j.from,
            to: j.to,
            pivot: j.pivot,
            cancelled: j.cancelled,
            completed: j.completed,
        }
    }
}

/// The `(node, overlay)` pairs of a `blockdev-snapshot`, or of the `blockdev-snapshot` actions
/// of a `transaction`.
pub(crate) fn snapshots(command: &str, args: &Value) -> Vec<(String, String)> {
    let pair = |data: &Value| {
        Some((
            data["node"].as_str()?.to_owned(),
            data["overlay"].as_str()?.to_owned(),
        ))
    };
    match command {
        "blockdev-snapshot" => pair(args).into_iter().collect(),
        "transaction" => args["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "blockdev-snapshot")
            .filter_map(|a| pair(&a["data"]))
            .collect(),
        _ => Vec::new(),
    }
}

/// What a new generation's command line carries of the block graph the journal knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockArgv {
    /// The pivots, in order: a device on `from` is on `to` after each.
    pub renames: Vec<(String, String)>,
    /// `-blockdev` arguments appended, in the order the nodes were added.
    pub blockdevs: Vec<Value>,
}

impl BlockArgv {
    /// Appends the nodes and points every `-device drive=` where the pivots took it.
    pub fn apply(&self, cmd: &mut CmdLine) {
        for item in cmd.items.iter_mut() {
            let crate::cmdline::Item::Opt(opt) = item else {
                continue;
            };
            if opt.name != "device" {
                continue;
            }
            let Some(mut arg) = opt.parse_arg() else {
                continue;
            };
            let Some(drive) = arg.get("drive") else {
                continue;
            };
            let now = self.follow(&drive);
            if now != drive {
                arg.set("drive", &now);
                opt.set_arg(&arg);
            }
        }
        for node in &self.blockdevs {
            cmd.push("blockdev", Some(&node.to_string()));
        }
    }

    /// Where a device on `node` is now.
    pub fn follow(&self, node: &str) -> String {
        let mut now = node.to_owned();
        for (from, to) in &self.renames {
            if *from == now {
                now.clone_from(to);
            }
        }
        now
    }
}

impl Entry {
    /// Whether it is a pivot, which only a command line can carry.
    pub(crate) fn is_pivot(&self) -> bool {
        matches!(self.holds, Holds::Pivot { .. })
    }

    fn added_node(&self) -> Option<&str> {
        match &self.holds {
            Holds::Added(Target::Node(n)) if self.command == "blockdev-add" => Some(n),
            _ => None,
        }
    }
}

impl Journal {
    /// The block graph a new generation starts with, when a pivot happened; `None` when the
    /// command line and a replay through QMP make it as it is. `Err` names a node that cannot
    /// go on a command line: one opened through an fd passed at run time, which exists only
    /// once that replay has run.
    pub fn block_argv(&self) -> Result<Option<BlockArgv>, String> {
        let mut renames = Vec::new();
        let mut backing = Vec::new();
        for e in &self.entries {
            if let Holds::Pivot { from, to, snapshot } = &e.holds {
                renames.push((from.clone(), to.clone()));
                if *snapshot {
                    backing.push((to.clone(), from.clone()));
                }
            }
        }
        if renames.is_empty() {
            return Ok(None);
        }
        let mut blockdevs = Vec::new();
        for e in &self.entries {
            let Some(node) = e.added_node() else { continue };
            let needs_fd = self.entries.iter().any(|f| {
                f.used_by.as_ref() == Some(&Target::Node(node.to_owned())) && !f.fds.is_empty()
            });
            if needs_fd {
                return Err(format!(
                    "disk node {node} is opened through an fd passed at run time, and a block \
                     job or snapshot has since moved a device between nodes"
                ));
            }
            let mut args = e.arguments.clone();
            if let (Some((_, base)), Some(map)) = (
                backing.iter().rev().find(|(overlay, _)| overlay == node),
                args.as_object_mut(),
            ) {
                map.insert("backing".into(), Value::String(base.clone()));
            }
            blockdevs.push(args);
        }
        Ok(Some(BlockArgv { renames, blockdevs }))
    }

    /// Whether a new generation gets `e` by a replay through QMP: all but pivots, and the
    /// `blockdev-add`s a command line with the block graph ([`Journal::block_argv`]) carries.
    pub fn replays(&self, e: &Entry) -> bool {
        if e.is_pivot() {
            return false;
        }
        let graph = self.entries.iter().any(Entry::is_pivot);
        !(graph && e.added_node().is_some())
    }

    /// Notes a job that ends in a pivot when completed.
    pub(crate) fn start_job(&mut self, job: Job) {
        self.jobs.retain(|j| j.id != job.id);
        self.jobs.push(job);
    }

    /// Notes what a client asked of job `id`: to complete it (`pivot`), or to cancel it.
    /// Returns whether a pivot was recorded.
    pub(crate) fn ask_job(&mut self, id: &str, pivot: bool) -> bool {
        if let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) {
            if pivot {
                job.pivot = true;
            } else {
                job.cancelled = true;
            }
        }
        self.settle_job(id)
    }

    /// Forgets job `id` (`job-dismiss`): whatever it did is known by now.
    pub(crate) fn dismiss_job(&mut self, id: &str) {
        self.jobs.retain(|j| j.id != id);
    }

    /// Takes note of a job's end (BLOCK_JOB_COMPLETED, BLOCK_JOB_CANCELLED). Each monitor
    /// gets a copy of the event; once the job's pivot is recorded the job is gone, and later
    /// copies find nothing. Returns whether the journal changed.
    pub(crate) fn job_event(&mut self, event: &Value) -> bool {
        let name = event["event"].as_str().unwrap_or_default();
        let data = &event["data"];
        let Some(id) = data["device"].as_str() else {
            return false;
        };
        let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) else {
            return false;
        };
        if name == "BLOCK_JOB_COMPLETED" && data.get("error").is_none() {
            job.completed = true;
        } else if matches!(name, "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED") {
            job.cancelled = true;
        }
        self.settle_job(id)
    }

    /// Records job `id`'s pivot once it both completed and was asked to, and forgets a job
    /// that can no longer pivot. Returns whether a pivot was recorded.
    fn settle_job(&mut self, id: &str) -> bool {
        let Some(i) = self.jobs.iter().position(|j| j.id == id) else {
            return false;
        };
        let Some(job) = self.jobs.get(i) else {
            return false;
        };
        if job.cancelled {
            self.jobs.remove(i);
            return false;
        }
        if !(job.completed && job.pivot) {
            return false;
        }
        let job = self.jobs.remove(i);
        self.push_pivot(job.from, job.to, false);
        true
    }

    /// Records that a device on `from` is now on `to`; `snapshot`: `to` is an overlay whose
    /// backing is `from`.
    pub(crate) fn push_pivot(&mut self, from: String, to: String, snapshot: bool) {
        let arguments = serde_json::json!({ "from": from, "to": to });
        self.entries.push(Entry {
            command: if snapshot {
                "blockdev-snapshot"
            } else {
                "job-complete"
            }
            .to_owned(),
            arguments,
            fds: Vec::new(),
            monitor: 0,
            holds: Holds::Pivot { from, to, snapshot },
            used_by: None,
        });
    }
}
