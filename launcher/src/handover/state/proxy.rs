//! The proxy's part of the state ([`super`]): its listeners, clients with their buffers and
//! pending commands, the framing state mid-message, and the hot-plug journal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Bytes, Fd, Text};

/// The monitor and chardev proxy ([`crate::proxy`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proxy {
    /// Where the private directory is made, and the directory once made.
    pub dir_base: Text,
    /// The private directory of backend and display sockets.
    pub dir: Option<Text>,
    /// The serial that keeps socket names unique.
    pub serial: u64,
    /// The generation clients are served by.
    pub live: Option<u32>,
    /// Backend socket paths by generation, one per monitor.
    pub backends: BTreeMap<u32, Vec<Text>>,
    /// Display socket paths by generation.
    pub displays: BTreeMap<u32, Vec<Text>>,
    /// Every proxied monitor and chardev, in order.
    pub monitors: Vec<Monitor>,
    /// Accepted clients.
    pub conns: Vec<Conn>,
    /// The id the next client gets.
    pub next_conn: u64,
    /// The hot-plug journal.
    pub journal: Journal,
    /// Display listeners.
    pub handoff: Vec<Display>,
    /// Viewers accepted and not yet handed to QEMU, oldest first: protocol and connection.
    pub viewers: Vec<(String, Fd)>,
}

/// `qmp`, `hmp` or `raw` framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// QMP.
    Qmp,
    /// HMP.
    Hmp,
    /// Bytes.
    Raw,
}

/// A listening socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listener {
    /// The socket.
    pub fd: Fd,
    /// `unix` or `tcp`.
    pub family: Family,
    /// The path the launcher bound, removed when the VM ends while it is still this socket.
    pub bound: Option<BoundPath>,
}

/// A socket's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// AF_UNIX.
    Unix,
    /// AF_INET or AF_INET6.
    Tcp,
}

/// A socket path the launcher bound, by the inode it made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoundPath {
    /// The path.
    pub path: Text,
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// One proxied monitor or chardev.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Monitor {
    /// Its framing.
    pub mode: Mode,
    /// Where clients connect.
    pub listener: Listener,
    /// The client being served.
    pub active: Option<u64>,
    /// Clients waiting their turn, oldest first.
    pub waiting: Vec<u64>,
}

/// One accepted client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Conn {
    /// Its id.
    pub id: u64,
    /// Its monitor, by index.
    pub monitor: usize,
    /// The client's socket.
    pub client: Fd,
    /// Its family.
    pub family: Family,
    /// Said by QEMU, not yet written to the client.
    pub to_client: Bytes,
    /// Read from the client, not yet forwarded: the rest of a unit, or units held.
    pub from_client: Bytes,
    /// Fds the client passed, with where in `from_client` they go.
    pub fds_in: Vec<Batch>,
    /// Where the scan of client input stands.
    pub inbound: Scan,
    /// The client ended its input.
    pub client_eof: bool,
    /// The client is gone.
    pub dead: bool,
    /// QEMU is gone: close once the client has everything.
    pub closing: bool,
    /// Its connection to the live generation, once served.
    pub back: Option<Backend>,
    /// Its `qmp_capabilities`, exactly as sent, once QEMU accepted it.
    pub caps: Option<Bytes>,
}

/// Fds passed by SCM_RIGHTS and the byte they go with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    /// Offset in its buffer.
    pub at: usize,
    /// The fds.
    pub fds: Vec<Fd>,
}

/// Where a JSON scan stands in the middle of a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// Bracket depth.
    pub depth: usize,
    /// The open quote character, 0 outside strings.
    pub quote: u8,
    /// After a backslash in a string.
    pub escape: bool,
    /// How far into the unfinished value the scan has looked.
    pub pos: usize,
}

/// A client's connection to a QEMU generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backend {
    /// The socket.
    pub fd: Fd,
    /// Read from QEMU, not yet a whole message.
    pub rx: Bytes,
    /// Where the framing of QEMU's output stands.
    pub out: Outbound,
    /// Forwarded to QEMU, not yet written.
    pub to_qemu: Bytes,
    /// Client fds to go with `to_qemu`.
    pub fds_out: Vec<Batch>,
    /// A copy of the fd QEMU holds for the next `getfd`/`add-fd`.
    pub qemu_fd: Option<Fd>,
    /// Commands QEMU has yet to answer, oldest first.
    pub pending: Vec<Pending>,
    /// QEMU's output held back for the client (only while a swap prepares a connection).
    pub held: Bytes,
    /// QEMU closed it.
    pub eof: bool,
    /// Its write side was shut down, passing on the client's end of input.
    pub shut: bool,
}

/// The framing of QEMU's output on one connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outbound {
    /// Its mode.
    pub mode: Mode,
    /// Where the scan of the current message stands.
    pub scan: Scan,
    /// After a message: whether its line end goes too.
    pub trailer: Option<bool>,
    /// How much of HMP's prompt the last bytes matched.
    pub prompt: usize,
    /// `pass`, `drop` or `done`.
    pub greeting: Greeting,
    /// `live`, `leaving` or `arriving`.
    pub filter: Filter,
    /// Hide the next RESUME.
    pub drop_resume: bool,
    /// A STOP was hidden and no RESUME since.
    pub hidden_stop: bool,
    /// Swallow the next reply.
    pub swallow: bool,
    /// What the swallowed reply said, once it came.
    pub replayed: Option<Replayed>,
    /// HMP: past the echo of the current line.
    pub echoed: bool,
    /// HMP: what the current command printed so far.
    pub printed: Bytes,
}

/// What a swallowed reply said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replayed {
    /// `return`.
    Ok,
    /// `error`, with its description.
    Error(String),
}

/// What a connection still expects at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Greeting {
    /// The greeting goes to the client.
    Pass,
    /// It is swallowed.
    Drop,
    /// It was seen.
    Done,
}

/// Which events are hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// None but a swap's RESUME.
    Live,
    /// The old generation's during a swap.
    Leaving,
    /// The new generation's during a swap.
    Arriving,
}

/// A forwarded command QEMU has yet to answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// The QMP `id`.
    pub id: Option<Value>,
    /// Sent with `exec-oob`.
    pub oob: bool,
    /// It is `qmp_capabilities`: its bytes, to replay if QEMU accepts it.
    pub caps: Option<Bytes>,
    /// The command, for the journal.
    pub command: Option<Command>,
    /// A copy of the fd QEMU takes for it.
    pub fd: Option<Fd>,
}

/// A client's command as the journal reads it: from these, the journal reads it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    /// The QMP command name (`human-monitor-command` for HMP kept as text).
    pub command: String,
    /// Its arguments.
    pub arguments: Value,
    /// The HMP line, for HMP commands.
    pub line: Option<String>,
    /// QEMU answers it with HMP text.
    pub printed: bool,
    /// QEMU hands it the fds the connection received last.
    pub takes_fd: bool,
}

/// The hot-plug journal ([`crate::journal`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    /// Commands to replay, in order.
    pub entries: Vec<Entry>,
    /// A count of changes.
    pub changes: u64,
    /// DEVICE_DELETED events applied: timestamp and device.
    pub deleted: Vec<(Value, String)>,
    /// Block jobs under way that move a device when they complete (since version 2).
    #[serde(default)]
    pub jobs: Vec<BlockJob>,
}

/// A block job the journal follows ([`crate::journal`]'s block graph).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJob {
    /// Its id.
    pub id: String,
    /// The node its device is on while it runs.
    pub from: String,
    /// The node its device is on once it completes with a pivot.
    pub to: String,
    /// Completing it was asked.
    pub pivot: bool,
    /// Cancelling it was asked, or it failed.
    pub cancelled: bool,
    /// QEMU reported it completed.
    pub completed: bool,
}

/// One journal entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The QMP command.
    pub command: String,
    /// Its arguments.
    pub arguments: Value,
    /// The fds passed with it.
    pub fds: Vec<Fd>,
    /// The monitor it came through.
    pub monitor: usize,
    /// What it stands for.
    pub holds: Holds,
    /// For fds: the addition that took them.
    pub used_by: Option<Target>,
}

/// What a journal entry stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holds {
    /// Something that exists because of it.
    Added(Target),
    /// A `device_del` not completed yet.
    Unplug(String),
    /// A `getfd` name.
    FdName(String),
    /// An `add-fd`.
    FdSet {
        /// The set.
        set: i64,
        /// The fd's number in the set.
        fd: Option<i64>,
        /// A `remove-fd` took it out while in use.
        removed: bool,
    },
    /// The latest `set_link`.
    Link(String),
    /// The latest display password setting.
    Setting(String),
    /// A removal of something from the command line.
    Kept,
    /// A device moved from node `from` to node `to` (since version 2).
    Pivot {
        /// The node it was on.
        from: String,
        /// The node it is on.
        to: String,
        /// `to` is a snapshot overlay backed by `from`.
        snapshot: bool,
    },
}

/// Something an addition makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A device by id.
    Device(String),
    /// A netdev.
    Netdev(String),
    /// A block node.
    Node(String),
    /// A drive.
    Drive(String),
    /// A chardev.
    Chardev(String),
    /// An object.
    Object(String),
    /// A device without id.
    Anonymous,
}

/// A display's listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Display {
    /// `vnc` or `spice`.
    pub protocol: String,
    /// Its sockets.
    pub listeners: Vec<Listener>,
}
