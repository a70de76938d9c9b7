//! The state one launcher hands to the next, by `execve` in place: the schema, in one place.
//!
//! It travels as one JSON document (serde) in a sealed memfd whose number the new image finds
//! in `QEMU_LIVEUPGRADE_HANDOVER`. Every fd the launcher owns stays open across the exec at its
//! number (close-on-exec cleared for exactly those), and the document names each by that number
//! ([`Fd`]); [`State::fds`] lists them all, once each.
//!
//! What crosses: the VM as started (argv, the fds it inherited, its RAM memfds, taps, pidfile,
//! the signal state QEMU gets), the running QEMU generation (its private monitor with unread
//! replies and events, its stderr relay, its tap guard), the monitor proxy (every listener,
//! every client with the bytes read from it and not yet forwarded, the bytes QEMU said and the
//! client has not read yet, the commands QEMU has yet to answer, the negotiated capabilities,
//! the framing state in the middle of a message, the hot-plug journal), the ptys (masters and
//! their relay buffers), the display listeners and viewers not yet handed to QEMU, the control
//! socket with its clients and the requests they wait on, and the upgrade history. Bytes the
//! kernel holds in socket and pipe buffers need no copy: the fds keep them.
//!
//! Compatibility rules:
//! - [`State::version`] is the schema version the writer wrote ([`VERSION`] of its build). A
//!   build reads every version from [`OLDEST_READ`] to its own [`VERSION`] and refuses any other
//!   in its check mode, so the old launcher never execs a binary that cannot read its state.
//! - A change a reader must understand to keep the VM whole (a new buffer, a new fd, a field
//!   whose absence changes behaviour) bumps [`VERSION`]; the reader of the new version converts
//!   older documents (a missing field gets its `#[serde(default)]`, which must mean what the
//!   older writer meant). Purely informational fields may be added without a bump; readers
//!   ignore fields they do not know.
//! - Enums are written by variant name; variants are never renamed or reused.
//! - Byte buffers are lowercase hex ([`Bytes`]); argv words and paths are UTF-8 strings, or
//!   `{"hex": ...}` when they are not UTF-8 ([`Text`]).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

mod proxy;

pub use proxy::*;

/// What [`State::format`] says.
pub const FORMAT: &str = "qemu-liveupgrade-handover";

/// The schema version this build writes. A build made with `QEMU_LIVEUPGRADE_STATE_VERSION`
/// at compile time writes and reads that version instead, which is how a test stands up a
/// "release" that predates the current schema.
pub const VERSION: u32 = match option_env!("QEMU_LIVEUPGRADE_STATE_VERSION") {
    Some(v) => parse_u32(v),
    // 2: the journal's block graph (pivots, and the block jobs that make them).
    None => 2,
};

/// The oldest schema version this build reads.
pub const OLDEST_READ: u32 = if VERSION < 1 { VERSION } else { 1 };

const _: () = assert!(OLDEST_READ <= VERSION);

const fn parse_u32(s: &str) -> u32 {
    let mut rest = s.as_bytes();
    let mut n: u32 = 0;
    while let [d, tail @ ..] = rest {
        if !d.is_ascii_digit() {
            return 0;
        }
        n = n.saturating_mul(10).saturating_add((*d - b'0') as u32);
        rest = tail;
    }
    n
}

/// The whole document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Always [`FORMAT`].
    pub format: String,
    /// The schema version the writer wrote.
    pub version: u32,
    /// The launcher that wrote it.
    pub from: Supervisor,
    /// When it was written, in microseconds since the Unix epoch: the new image reports how
    /// long the handover took from here.
    pub written_unix_us: u64,
    /// Every fd the document names, once each: open across the exec, close-on-exec cleared.
    pub fds: Vec<Fd>,
    /// The old executable, opened read-only before the exec: where the new image goes back to
    /// if it cannot read this document after all.
    #[serde(default)]
    pub fallback_exe: Option<Fd>,
    /// The handover this state was written for (none in the copy the check mode reads).
    #[serde(default)]
    pub handover: Option<Handover>,
    /// The VM as it was started.
    pub vm: Vm,
    /// The QEMU running the guest.
    pub current: Generation,
    /// The monitor and chardev proxy.
    pub proxy: Proxy,
    /// The ptys the launcher holds.
    pub ptys: Ptys,
    /// The control socket, when the VM has one.
    pub control: Option<Control>,
    /// Requests taken and not yet answered.
    pub requests: Requests,
    /// The latest reports of upgrades of this VM, QEMU's and the supervisor's, oldest first.
    pub history: Vec<Value>,
    /// Supervisor upgrades done over the VM's life (this one not yet counted).
    #[serde(default)]
    pub supervisor_upgrades: u64,
}

/// A launcher's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervisor {
    /// Its release ([`crate::identity::VERSION`]).
    pub version: String,
    /// Its build ([`crate::identity::BUILD`]).
    pub build: String,
    /// The executable it ran from, as `/proc/self/exe` named it.
    pub exe: Option<Text>,
}

/// The handover under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// When the request was taken, in microseconds since the Unix epoch.
    pub requested_unix_us: u64,
    /// How long the new binary's check mode took, in milliseconds.
    pub check_ms: f64,
    /// The binary executed.
    pub to: Text,
    /// Further requests answered by this handover.
    pub coalesced: usize,
}

/// An fd open in the process at this number, across the exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fd(pub i32);

/// Bytes, written as lowercase hex.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let digit = |d: u8| char::from_digit(u32::from(d), 16).unwrap_or('0');
        let mut text = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            text.push(digit(b >> 4));
            text.push(digit(b & 0xf));
        }
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        unhex(&text).map(Bytes).map_err(serde::de::Error::custom)
    }
}

fn unhex(text: &str) -> Result<Vec<u8>, &'static str> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err("not lowercase hex"),
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return Err("odd number of hex digits");
    }
    bytes
        .chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Ok((digit(*hi)? << 4) | digit(*lo)?),
            _ => Err("odd number of hex digits"),
        })
        .collect()
}

/// An argv word or path: a string when it is UTF-8, else `{"hex": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Text {
    /// UTF-8.
    Utf8(String),
    /// Anything else.
    Raw {
        /// The bytes.
        hex: Bytes,
    },
}

impl Text {
    /// The text of `s`.
    pub fn of(s: &OsStr) -> Text {
        match s.to_str() {
            Some(s) => Text::Utf8(s.to_owned()),
            None => Text::Raw {
                hex: Bytes(s.as_bytes().to_vec()),
            },
        }
    }

    /// The text of a path.
    pub fn path(p: &Path) -> Text {
        Text::of(p.as_os_str())
    }

    /// Back to an OS string.
    pub fn os(&self) -> OsString {
        match self {
            Text::Utf8(s) => OsString::from(s),
            Text::Raw { hex } => OsString::from_vec(hex.0.clone()),
        }
    }

    /// Back to a path.
    pub fn to_path(&self) -> PathBuf {
        PathBuf::from(self.os())
    }
}

/// The VM as started, and what the supervisor keeps for its whole life.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// `argv[0]` the launcher was started with.
    pub argv0: Text,
    /// The rest of its argv, QEMU's arguments as given.
    pub args: Vec<Text>,
    /// The fds above stderr that were open when it started, from which the fd layout every
    /// generation gets was planned ([`crate::generation::Base::new`]).
    pub inherited: Vec<i32>,
    /// What the launcher made of that command line, for the new image to check it plans the
    /// VM the same way.
    pub plan: Plan,
    /// Guest RAM, one memfd per region, in layout order.
    pub ram: Vec<Fd>,
    /// Taps the launcher opened by name, in layout order.
    pub taps: Vec<Tap>,
    /// The signal state every QEMU is started with.
    pub signals: Signals,
    /// The signals the launcher itself had blocked before the handover blocked the ones it
    /// handles: the new image restores this mask once its handlers are in place.
    pub supervisor_mask: Vec<i32>,
    /// The binary the first generation ran.
    pub first_binary: Binary,
    /// `-daemonize` was given: QEMU's output goes through [`Vm::outputs`].
    pub daemonized: bool,
    /// QEMU's stdout and stderr copied on to the launcher's, when daemonized.
    pub outputs: Vec<Relay>,
    /// The write ends of those pipes, which every generation gets as stdout and stderr.
    pub child_out: Vec<Fd>,
    /// The `-pidfile`, locked (`lockf`) by the fd, which keeps the lock across the exec.
    pub pidfile: Option<Pidfile>,
    /// The versioned machine type every later generation runs.
    pub machine: Option<String>,
    /// How long the VM had run.
    pub uptime_ms: u64,
    /// The last QEMU upgrade's report.
    pub last_upgrade: Option<Value>,
    /// The addresses query replies report for the displays.
    pub published: Option<Published>,
    /// The executable the VM's first launcher started from: where a handover that names no
    /// binary finds the new build.
    pub exe: Option<Text>,
    /// A job-control stop was passed on to QEMU: if QEMU stops, the launcher stops too.
    #[serde(default)]
    pub job_stop: bool,
    /// The test fault hook ([`crate::fault`]) has not struck yet.
    #[serde(default)]
    pub fault_armed: bool,
    /// Output for the launcher's stdout and stderr that their readers had not taken yet
    /// ([`crate::stdio`]). A reader that predates it loses these bytes, as the overflow
    /// policy for diagnostics would: no version bump.
    #[serde(default)]
    pub stdio: Vec<StdioQueue>,
}

/// Output waiting for the launcher's stdout (1) or stderr (2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StdioQueue {
    /// 1 or 2: the launcher's own, open across the exec and named nowhere else.
    pub fd: i32,
    /// The bytes, oldest first.
    pub queued: Bytes,
    /// Bytes dropped over the VM's life.
    pub dropped: u64,
    /// Bytes dropped that no line has reported yet.
    pub unreported: u64,
}

/// The parts of [`crate::generation::Base`] that hold resources, by identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// RAM regions: id and size.
    pub ram: Vec<(String, u64)>,
    /// Proxied monitors and chardevs: where they listen and how they are framed.
    pub proxied: Vec<String>,
    /// Taps by name: interface and queue count.
    pub taps: Vec<(String, usize)>,
    /// Kept ptys by label.
    pub ptys: Vec<String>,
    /// Displays by protocol.
    pub displays: Vec<String>,
}

/// An opened tap.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tap {
    /// One fd per queue.
    pub fds: Vec<Fd>,
    /// The interface name.
    pub ifname: String,
    /// The down script, run when the VM ends.
    pub downscript: Option<String>,
}

/// Signal numbers blocked and ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    /// Blocked.
    pub blocked: Vec<i32>,
    /// Ignored.
    pub ignored: Vec<i32>,
}

/// A QEMU binary and the rule that found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binary {
    /// Its path.
    pub path: Text,
    /// `env`, `config`, `sibling` or `request`.
    pub source: String,
}

/// A pipe from QEMU copied on to the launcher's stdout (1) or stderr (2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relay {
    /// The read end.
    pub fd: Fd,
    /// 1 or 2.
    pub to: i32,
    /// The writer may still write.
    pub open: bool,
    /// The last bytes copied, for reports.
    pub tail: Bytes,
}

/// A locked pidfile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pidfile {
    /// Its path, removed when the VM ends.
    pub path: Text,
    /// The open file holding the lock.
    pub fd: Fd,
}

/// What display query replies report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The proxy's private directory.
    pub dir: Text,
    /// VNC's public address.
    pub vnc: Option<Public>,
    /// SPICE's public address.
    pub spice: Option<Public>,
}

/// A display's public address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Public {
    /// The first TCP listener's address, and the address as the user gave it.
    Tcp {
        /// `host:port`.
        addr: String,
        /// As given (`*` for none).
        given: String,
    },
    /// A unix socket path.
    Path(Text),
}

/// The generation running the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    /// 1 for the first QEMU.
    pub number: u32,
    /// QEMU's pid, the launcher's child.
    pub pid: i32,
    /// The binary it runs.
    pub binary: Binary,
    /// Its private monitor.
    pub qmp: Qmp,
    /// How long it had run.
    pub uptime_ms: u64,
    /// Its `query-version` reply.
    pub version: Option<Value>,
    /// Its tap guard, for generations started beside another.
    pub tap_guard: Option<TapGuard>,
    /// Its stderr relay, for generations after the first.
    pub stderr: Option<Relay>,
    /// The file its binary was when it started, to tell whether the installed QEMU is
    /// another since.
    #[serde(default)]
    pub started_from: Option<FileId>,
}

/// A file's identity ([`crate::installed::FileId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size.
    pub size: u64,
    /// Its modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
}

/// The launcher's end of a private monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qmp {
    /// The socket.
    pub fd: Fd,
    /// Read and not yet framed: the start of a message.
    pub rbuf: Bytes,
    /// The id the next command gets.
    pub next_id: u64,
    /// Messages read and not yet taken, oldest first, as QEMU sent them.
    pub inbox: Vec<Value>,
    /// QEMU closed it.
    pub closed: bool,
}

/// The seccomp listener answering a generation's tap ioctls.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TapGuard {
    /// The listener.
    pub fd: Fd,
    /// Ioctls go through.
    pub live: bool,
    /// Ioctls answered without effect.
    pub suppressed: u32,
}

/// The ptys ([`crate::ptys`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ptys {
    /// The generation that gets input.
    pub live: Option<u32>,
    /// Every kept pty, in layout order.
    pub ptys: Vec<Pty>,
}

/// One kept pty.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pty {
    /// The master.
    pub master: Fd,
    /// The slave's path.
    pub path: Text,
    /// The chardev's label.
    pub label: String,
    /// The `path=` symlink made.
    pub link: Option<Text>,
    /// Read from the master, for the guest.
    pub to_guest: Bytes,
    /// Written by the guest, for the master.
    pub to_pty: Bytes,
    /// Sockets to generations.
    pub ends: Vec<PtyEnd>,
}

/// A generation's socket for a pty.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PtyEnd {
    /// The generation.
    pub gen: u32,
    /// The launcher's end.
    pub ours: Fd,
    /// A copy of QEMU's end.
    pub theirs: Fd,
    /// QEMU shut it down.
    pub closed: bool,
}

/// The control socket ([`crate::control`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Control {
    /// The listener.
    pub listener: Fd,
    /// Its directory, open.
    pub dir: RunDir,
    /// The socket's name in it.
    pub name: String,
    /// Connected clients by slot, with what they sent so far.
    pub clients: Vec<Option<Client>>,
}

/// A checked directory, held open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDir {
    /// The directory.
    pub fd: Fd,
    /// Its path.
    pub path: Text,
    /// Its owner.
    pub owner: u32,
}

/// A control client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Client {
    /// Its socket.
    pub fd: Fd,
    /// What it sent and was not yet a whole request.
    pub buf: Bytes,
}

/// Requests taken from control clients (or signals) and not answered yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Requests {
    /// QEMU upgrade requests (SIGUSR2 or control) not yet acted on.
    pub upgrades: u32,
    /// The binary a control client asked the next upgrade to go to.
    pub upgrade_to: Option<Text>,
    /// Clients waiting for an upgrade's report.
    pub waiters: Vec<Client>,
    /// Clients that asked for a `check`, with the binary they named.
    pub checks: Vec<(Client, Option<Text>)>,
    /// Clients that asked for a supervisor upgrade after the one under way, with the binary.
    pub handovers: Vec<(Client, Option<Text>)>,
    /// The clients that asked for this handover: the new image sends them its report.
    pub handed_over: Vec<Client>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_hex_and_back() {
        let b = Bytes(vec![0, 1, 0xab, 0xff, b'{']);
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(text, "\"0001abff7b\"");
        assert_eq!(serde_json::from_str::<Bytes>(&text).unwrap(), b);
        assert!(serde_json::from_str::<Bytes>("\"0\"").is_err());
        assert!(serde_json::from_str::<Bytes>("\"AB\"").is_err());
    }

    #[test]
    fn text_is_a_string_unless_it_is_not_utf8() {
        let plain = Text::of(OsStr::new("-qmp"));
        assert_eq!(serde_json::to_string(&plain).unwrap(), "\"-qmp\"");
        let odd = Text::of(OsStr::from_bytes(b"a\xff"));
        let text = serde_json::to_string(&odd).unwrap();
        assert_eq!(text, r#"{"hex":"61ff"}"#);
        assert_eq!(serde_json::from_str::<Text>(&text).unwrap().os(), odd.os());
    }

    #[test]
    fn the_version_knob_parses_digits_only() {
        assert_eq!(parse_u32("12"), 12);
        assert_eq!(parse_u32("x"), 0);
    }
}
