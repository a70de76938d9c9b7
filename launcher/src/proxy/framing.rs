//! Where one command or one message ends on a monitor stream, and which messages a swap hides.
//!
//! Client input is forwarded in whole units (a QMP JSON value, an HMP line) so that a swap never
//! leaves half a command in the old QEMU and the other half for the new one. QEMU's output is
//! split into whole messages so that events the swap causes can be dropped; everything else is
//! passed on byte for byte.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

use super::envelope::Members;
use super::Mode;
use crate::journal::{Command, Outcome};

/// How much may wait in one direction before the proxy stops reading the side that fills it.
pub(super) const CAP: usize = 1 << 20;

/// The prompt HMP prints when it is ready for the next line (QEMU's `monitor/hmp.c`).
const PROMPT: &[u8] = b"(qemu) ";

/// A piece at the front of a buffer, by length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Piece {
    /// Bytes between top-level values (whitespace, stray characters).
    Gap(usize),
    /// One complete top-level object or array.
    Value(usize),
}

/// Finds the ends of top-level JSON values in a stream, across reads.
///
/// Only brackets and strings are tracked, as QEMU's own JSON streamer does to decide when a
/// value is complete (`qobject/json-streamer.c`). QEMU also accepts single-quoted strings, so
/// both quote characters open a string.
#[derive(Debug, Default)]
pub(super) struct JsonScan {
    depth: usize,
    quote: u8,
    escape: bool,
    /// How far into the current unfinished value the scan has looked.
    pos: usize,
}

impl JsonScan {
    /// The next complete piece at the front of `buf`, which must start where the previous piece
    /// ended. `None` when `buf` holds only part of a value (or nothing).
    pub(super) fn next(&mut self, buf: &[u8]) -> Option<Piece> {
        if self.depth == 0 {
            let gap = buf
                .iter()
                .position(|&b| b == b'{' || b == b'[')
                .unwrap_or(buf.len());
            if gap > 0 {
                return Some(Piece::Gap(gap));
            }
        }
        while let Some(&b) = buf.get(self.pos) {
            self.pos += 1;
            if self.quote != 0 {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == self.quote {
                    self.quote = 0;
                }
                continue;
            }
            match b {
                b'"' | b'\'' => self.quote = b,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let end = self.pos;
                        self.pos = 0;
                        return Some(Piece::Value(end));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The caller took the whole buffer without a complete value (an oversized or endless one).
    /// The lexical state stays, so the scan resumes in the middle of that value.
    pub(super) fn consumed(&mut self) {
        self.pos = 0;
    }
}

/// One unit of client input ready to forward.
#[derive(Debug)]
pub(super) struct Unit {
    /// Its length at the front of the buffer.
    pub len: usize,
    /// Whether QEMU answers it: QMP answers every top-level value with one `return` or `error`
    /// (`monitor/qmp.c`), HMP prints a prompt after every CR or LF (`util/readline.c`).
    pub answered: bool,
    /// What the command is, for one QEMU answers.
    pub request: Request,
}

/// What the proxy knows of one command: its envelope, and what the journal makes of it.
#[derive(Debug, Default)]
pub(super) struct Request {
    /// The QMP `id`, which QEMU copies into the reply.
    pub id: Option<Value>,
    /// Sent with `exec-oob`: its reply may overtake those of earlier commands.
    pub oob: bool,
    /// It is `qmp_capabilities`, whose arguments a new generation must be given again.
    pub caps: bool,
    /// The command itself, for the journal: QMP name and arguments, or the HMP line.
    pub command: Option<Command>,
}

impl Request {
    /// Reads a QMP command's envelope. Anything QEMU will refuse reads as no command.
    fn qmp(bytes: &[u8]) -> Request {
        let Some(msg) = Members::of(bytes) else {
            return Request::default();
        };
        let id = msg.value("id");
        let (name, oob) = match (msg.string("execute"), msg.string("exec-oob")) {
            (Some(name), None) if !msg.has("exec-oob") => (name, false),
            (None, Some(name)) if !msg.has("execute") => (name, true),
            _ => {
                return Request {
                    id,
                    ..Request::default()
                }
            }
        };
        let arguments = msg
            .value("arguments")
            .unwrap_or_else(|| Value::Object(Map::new()));
        Request {
            id,
            oob,
            caps: name == "qmp_capabilities",
            command: Some(Command::qmp(&name, arguments)),
        }
    }

    /// Reads an HMP line (without its line end). A line with control characters is an edit
    /// that QEMU's readline resolves, not text to read.
    fn hmp(line: &[u8]) -> Request {
        let edited = line.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f);
        let command = match std::str::from_utf8(line) {
            Ok(text) if !edited => Command::hmp(text),
            _ => None,
        };
        Request {
            command,
            ..Request::default()
        }
    }
}

/// Splits client input into units.
#[derive(Debug)]
pub(super) enum Inbound {
    Qmp(JsonScan),
    Hmp,
    Raw,
}

impl Inbound {
    pub(super) fn new(mode: Mode) -> Inbound {
        match mode {
            Mode::Qmp => Inbound::Qmp(JsonScan::default()),
            Mode::Hmp => Inbound::Hmp,
            Mode::Raw => Inbound::Raw,
        }
    }

    /// The next complete unit at the front of `buf`.
    pub(super) fn next(&mut self, buf: &[u8]) -> Option<Unit> {
        let plain = |len| Unit {
            len,
            answered: false,
            request: Request::default(),
        };
        match self {
            Inbound::Raw => (!buf.is_empty()).then(|| plain(buf.len())),
            Inbound::Hmp => buf
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .map(|i| Unit {
                    len: i + 1,
                    answered: true,
                    request: Request::hmp(buf.get(..i).unwrap_or_default()),
                }),
            Inbound::Qmp(scan) => match scan.next(buf)? {
                Piece::Gap(len) => Some(plain(len)),
                Piece::Value(len) => Some(Unit {
                    len,
                    answered: true,
                    request: Request::qmp(buf.get(..len).unwrap_or_default()),
                }),
            },
        }
    }

    /// The caller forwarded the whole buffer although no unit was complete.
    pub(super) fn consumed(&mut self) {
        if let Inbound::Qmp(scan) = self {
            scan.consumed();
        }
    }
}

/// Which events to hide, by the role of the QEMU generation the stream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filter {
    /// The generation serving the client, no swap under way.
    Live,
    /// The generation being left, from `hold` until the swap ends. Its STOP would make libvirt
    /// mark the domain paused and release its leases, SHUTDOWN would make it send SIGTERM;
    /// MIGRATION is about a migration libvirt never started. The RESUME it sends when a failed
    /// migration restarts the guest answers a STOP the client never saw.
    Leaving,
    /// The generation being moved to, before commit: its RESUME and migration events belong
    /// to the swap, not to the client.
    Arriving,
}

/// What a connection still expects at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Greeting {
    /// The greeting (QMP) or banner up to the first prompt (HMP) goes to the client.
    Pass,
    /// It is swallowed: the client already saw the previous generation's.
    Drop,
    /// It has been seen.
    Done,
}

/// How much of an HMP command's output is kept to judge it: the commands the journal follows
/// print a line at most.
const PRINTED_CAP: usize = 4096;

/// What QEMU said that the proxy acts on, besides relaying it.
#[derive(Debug)]
pub(super) enum Seen {
    /// The answer to a client's command: a QMP reply, with the command's `id`, or an HMP
    /// prompt, with what the command printed.
    Answer { id: Option<Value>, reply: Reply },
    /// An event the journal follows (DEVICE_DELETED, a block job's end).
    Event(Value),
}

/// How QEMU answered a command, a QMP `return` still as QEMU wrote it: only the journal reads
/// one, and only for the few commands whose effect depends on it.
#[derive(Debug)]
pub(super) enum Reply {
    Return(Vec<u8>),
    Error,
    Printed(String),
}

impl Reply {
    /// What the journal is told of the answer to `command`.
    pub(super) fn outcome(self, command: Option<&Command>) -> Outcome {
        match self {
            Reply::Return(raw) if command.is_some_and(Command::needs_return) => {
                Outcome::Return(serde_json::from_slice(&raw).unwrap_or(Value::Null))
            }
            Reply::Return(_) => Outcome::Return(Value::Null),
            Reply::Error => Outcome::Error,
            Reply::Printed(text) => Outcome::Printed(text),
        }
    }
}

/// What becomes of one message from QEMU.
#[derive(Debug)]
enum Verdict {
    /// It goes to the client as QEMU wrote it.
    Pass,
    /// It is hidden, with its line end.
    Drop,
    /// These bytes go in its place.
    Replace(Vec<u8>),
}

impl Verdict {
    fn keep(keep: bool) -> Verdict {
        if keep {
            Verdict::Pass
        } else {
            Verdict::Drop
        }
    }
}

/// Splits QEMU's output into messages, drops those the swap hides, reports answers.
#[derive(Debug)]
pub(super) struct Outbound {
    mode: Mode,
    scan: JsonScan,
    /// After a message: whether the whitespace ending its line goes too (`Some(true)`).
    trailer: Option<bool>,
    /// How much of [`PROMPT`] the last bytes matched.
    prompt: usize,
    pub greeting: Greeting,
    pub filter: Filter,
    /// Hide the next RESUME: the one the swap causes after commit or abort.
    pub drop_resume: bool,
    /// A STOP was hidden while leaving and no RESUME since.
    pub hidden_stop: bool,
    /// Swallow the next reply: the answer to a replayed `qmp_capabilities`.
    pub swallow: bool,
    /// What the swallowed reply said: `Ok` for `return`, else the error's text.
    pub replayed: Option<Result<(), String>>,
    /// HMP: past the echo of the line typed since the last prompt.
    echoed: bool,
    /// HMP: what the current command printed so far.
    printed: Vec<u8>,
}

impl Outbound {
    pub(super) fn new(mode: Mode, greeting: Greeting, filter: Filter) -> Outbound {
        let greeting = if mode == Mode::Raw {
            Greeting::Done
        } else {
            greeting
        };
        Outbound {
            mode,
            scan: JsonScan::default(),
            trailer: None,
            prompt: 0,
            greeting,
            filter,
            drop_resume: false,
            hidden_stop: false,
            swallow: false,
            replayed: None,
            echoed: false,
            printed: Vec::new(),
        }
    }

    /// What the stream carries.
    pub(super) fn mode(&self) -> Mode {
        self.mode
    }

    /// Moves every complete message from `rx` to `out` (or drops it), and returns the answers
    /// and followed events seen, in order.
    pub(super) fn process(&mut self, rx: &mut Vec<u8>, out: &mut Vec<u8>) -> Vec<Seen> {
        let mut answers = Vec::new();
        match self.mode {
            Mode::Raw => out.append(rx),
            Mode::Hmp => self.process_hmp(rx, out, &mut answers),
            Mode::Qmp => self.process_qmp(rx, out, &mut answers),
        }
        answers
    }

    fn process_hmp(&mut self, rx: &mut Vec<u8>, out: &mut Vec<u8>, answers: &mut Vec<Seen>) {
        let mut start = 0;
        for (i, &b) in rx.iter().enumerate() {
            // QEMU's readline echoes the line as it is typed, redrawing it with escape
            // sequences, and ends it with a line end before the command runs.
            if self.echoed {
                if self.printed.len() < PRINTED_CAP {
                    self.printed.push(b);
                }
            } else {
                self.echoed = b == b'\n';
            }
            if PROMPT.get(self.prompt) == Some(&b) {
                self.prompt += 1;
            } else {
                self.prompt = usize::from(PROMPT.first() == Some(&b));
            }
            if self.prompt < PROMPT.len() {
                continue;
            }
            self.prompt = 0;
            match self.greeting {
                // The banner ends at the first prompt ("QEMU x.y.z monitor - type 'help'...").
                Greeting::Drop => start = i + 1,
                Greeting::Pass => {}
                Greeting::Done => {
                    let printed = std::mem::take(&mut self.printed);
                    let printed = printed.strip_suffix(PROMPT).unwrap_or(&printed);
                    answers.push(Seen::Answer {
                        id: None,
                        reply: Reply::Printed(String::from_utf8_lossy(printed).into_owned()),
                    });
                }
            }
            self.greeting = Greeting::Done;
            self.echoed = false;
            self.printed.clear();
        }
        if self.greeting != Greeting::Drop {
            out.extend_from_slice(rx.get(start..).unwrap_or_default());
        }
        rx.clear();
    }

    fn process_qmp(&mut self, rx: &mut Vec<u8>, out: &mut Vec<u8>, answers: &mut Vec<Seen>) {
        let mut at = 0;
        while let Some(piece) = self.scan.next(rx.get(at..).unwrap_or_default()) {
            match piece {
                Piece::Gap(n) => {
                    let gap = rx.get(at..at + n).unwrap_or_default();
                    let mut from = 0;
                    if let Some(drop) = self.trailer {
                        // QEMU ends every message with "\r\n"; a hidden message takes its line
                        // end with it, so the client sees no empty line.
                        let mut end = false;
                        while let Some(&b) = gap.get(from) {
                            if !b.is_ascii_whitespace() {
                                end = true;
                                break;
                            }
                            from += 1;
                            if b == b'\n' {
                                end = true;
                                break;
                            }
                        }
                        if !drop {
                            out.extend_from_slice(gap.get(..from).unwrap_or_default());
                        }
                        if end {
                            self.trailer = None;
                        }
                    }
                    out.extend_from_slice(gap.get(from..).unwrap_or_default());
                    at += n;
                }
                Piece::Value(n) => {
                    let verdict = self.judge(rx.get(at..at + n).unwrap_or_default(), answers);
                    match &verdict {
                        Verdict::Pass => {
                            out.extend_from_slice(rx.get(at..at + n).unwrap_or_default())
                        }
                        Verdict::Replace(bytes) => out.extend_from_slice(bytes),
                        Verdict::Drop => {}
                    }
                    self.trailer = Some(matches!(verdict, Verdict::Drop));
                    at += n;
                }
            }
        }
        rx.drain(..at);
    }

    /// Whether one message from QEMU goes to the client, and as what. Only the envelope is
    /// looked at, but for the replies rewritten: `query-chardev`'s, whose ptys the launcher
    /// holds ([`crate::ptys`]) while QEMU reports the socket it was given in their place, and
    /// those of the display queries and VNC's connection events, whose ports the launcher
    /// holds ([`crate::listeners::graphics`]), and `query-blockstats`' counters, which go on
    /// from the earlier generations' ([`crate::blockstats`]).
    fn judge(&mut self, bytes: &[u8], answers: &mut Vec<Seen>) -> Verdict {
        let Some(msg) = Members::of(bytes) else {
            return Verdict::Pass;
        };
        if msg.has("QMP") {
            let keep = self.greeting != Greeting::Drop;
            self.greeting = Greeting::Done;
            return Verdict::keep(keep);
        }
        let ret = msg.raw("return");
        if ret.is_some() || msg.has("error") {
            if self.swallow {
                self.swallow = false;
                self.replayed = Some(match msg.value("error") {
                    None => Ok(()),
                    Some(e) => Err(e.get("desc").and_then(Value::as_str).unwrap_or("").into()),
                });
                return Verdict::Drop;
            }
            let verdict = match ret {
                Some(ret) if may_rewrite(ret) => rewrite_reply(bytes, ret),
                _ => Verdict::Pass,
            };
            let reply = match ret {
                Some(ret) => Reply::Return(ret.to_vec()),
                None => Reply::Error,
            };
            answers.push(Seen::Answer {
                id: msg.value("id"),
                reply,
            });
            return verdict;
        }
        let Some(name) = msg.string("event") else {
            return Verdict::Pass;
        };
        let keep = self.keep_event(&name);
        // Only these few events are read whole: VNC's to rewrite, DEVICE_DELETED to journal.
        let whole = || match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(whole)) => Some(whole),
            _ => None,
        };
        let rewritten = (keep && name.starts_with("VNC_"))
            .then(whole)
            .flatten()
            .and_then(|whole| crate::listeners::graphics::event(&name, &whole))
            .and_then(|event| serde_json::to_vec(&event).ok());
        if matches!(
            name.as_str(),
            "DEVICE_DELETED" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
        ) {
            if let Some(whole) = whole() {
                answers.push(Seen::Event(Value::Object(whole)));
            }
        }
        match rewritten {
            Some(bytes) => Verdict::Replace(bytes),
            None => Verdict::keep(keep),
        }
    }

    fn keep_event(&mut self, name: &str) -> bool {
        match (self.filter, name) {
            (Filter::Leaving, "STOP") => {
                self.hidden_stop = true;
                false
            }
            (Filter::Leaving, "RESUME") => {
                self.hidden_stop = false;
                false
            }
            (Filter::Leaving, "MIGRATION" | "MIGRATION_PASS" | "SHUTDOWN") => false,
            (Filter::Arriving, "RESUME" | "MIGRATION" | "MIGRATION_PASS") => false,
            // A new generation's last incoming-migration events may be read only after the
            // switch: until a client migrates the VM itself, no migration event is its own.
            (Filter::Live, "MIGRATION" | "MIGRATION_PASS")
                if HIDE_MIGRATION.load(Ordering::Relaxed) =>
            {
                false
            }
            (Filter::Live, "RESUME") if self.drop_resume => {
                self.drop_resume = false;
                false
            }
            // A STOP the client sees means the next RESUME is the client's own.
            (Filter::Live, "STOP") => {
                self.drop_resume = false;
                true
            }
            _ => true,
        }
    }
}

/// Property check for the fuzz targets and property tests: however QEMU's output and a
/// client's input are split across reads, the proxy frames them the same way (the same
/// bytes reach the client, the same answers are counted, the same units go to QEMU), and no
/// input makes it panic or loop. `split` chooses where `data` is cut.
#[cfg(any(test, feature = "fuzzing"))]
pub fn check_split_invariance(mode: Mode, data: &[u8], split: usize) {
    let cut = if data.is_empty() {
        0
    } else {
        split % (data.len() + 1)
    };
    let (head, tail) = data.split_at(cut);
    let outbound = |chunks: &[&[u8]]| {
        let mut out = Outbound::new(mode, Greeting::Pass, Filter::Live);
        let (mut rx, mut sent, mut answers) = (Vec::new(), Vec::new(), 0);
        for chunk in chunks {
            rx.extend_from_slice(chunk);
            answers += out.process(&mut rx, &mut sent).len();
        }
        (sent, answers, rx)
    };
    assert_eq!(
        outbound(&[data]),
        outbound(&[head, tail]),
        "QEMU's output split at {cut}"
    );
    let inbound = |chunks: &[&[u8]]| {
        let mut scan = Inbound::new(mode);
        let (mut buf, mut units): (Vec<u8>, Vec<(Vec<u8>, bool)>) = (Vec::new(), Vec::new());
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(unit) = scan.next(&buf) {
                assert!(
                    unit.len > 0 && unit.len <= buf.len(),
                    "unit of {} bytes",
                    unit.len
                );
                let bytes: Vec<u8> = buf.drain(..unit.len).collect();
                // Bytes between commands go on as they come; only commands are units.
                match units.last_mut() {
                    Some((prev, false)) if !unit.answered => prev.extend(bytes),
                    _ => units.push((bytes, unit.answered)),
                }
            }
        }
        (units, buf)
    };
    assert_eq!(
        inbound(&[data]),
        inbound(&[head, tail]),
        "client input split at {cut}"
    );
}

/// Whether a reply's `return`, as QEMU wrote it, may be one the launcher rewrites: each
/// rewrite needs a member these bytes would show (or, for the displays, the launcher's own
/// socket directory), so the rest, `query-status` and the like, are passed on unparsed.
fn may_rewrite(ret: &[u8]) -> bool {
    (crate::ptys::rewrites_replies() && contains(ret, b"\"frontend-open\""))
        || crate::listeners::graphics::may_rewrite(ret)
        || (crate::blockstats::rewrites_replies() && contains(ret, b"\"stats\""))
        || (HIDE_MIGRATION.load(Ordering::Relaxed) && contains(ret, b"\"status\""))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Set once an upgrade has migrated the guest: from then on `query-migrate` would report the
/// upgrade's migration (completed, cancelled or failed), which none of the VM's users made.
/// Cleared when a client migrates the VM itself, whose migration it must see.
static HIDE_MIGRATION: AtomicBool = AtomicBool::new(false);

/// Hides (or shows again) the migration state the upgrades leave in QEMU.
pub fn hide_migration_state(hide: bool) {
    HIDE_MIGRATION.store(hide, Ordering::Relaxed);
}

/// `query-migrate`'s `return` with the last migration taken out, as a QEMU that never
/// migrated answers (`{}`, and the migration blockers, which are the VM's); `None` for any
/// other reply. Used while [`hide_migration_state`] says so. Recognized by its shape: a `status` among MigrationStatus's values, without
/// `running` (query-status) or `total` (query-dump).
fn migration_reply(ret: &Value) -> Option<Value> {
    const STATES: [&str; 15] = [
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "completed",
        "failed",
        "colo",
        "pre-switchover",
        "device",
        "wait-unplug",
    ];
    let map = ret.as_object()?;
    let status = map.get("status")?.as_str()?;
    if !STATES.contains(&status) || map.contains_key("running") || map.contains_key("total") {
        return None;
    }
    let kept = map
        .iter()
        .filter(|(k, _)| *k == "blocked-reasons")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(Value::Object(kept))
}

/// A reply with its `return` put back to what the launcher holds (ptys, display ports, disk
/// counters of earlier generations), or passed as QEMU wrote it.
fn rewrite_reply(bytes: &[u8], ret: &[u8]) -> Verdict {
    let Ok(ret) = serde_json::from_slice::<Value>(ret) else {
        return Verdict::Pass;
    };
    let rewritten = crate::ptys::chardev_info_reply(&ret)
        .or_else(|| crate::listeners::graphics::info_reply(&ret))
        .or_else(|| crate::blockstats::blockstats_reply(&ret))
        .or_else(|| {
            HIDE_MIGRATION
                .load(Ordering::Relaxed)
                .then(|| migration_reply(&ret))
                .flatten()
        });
    let Some(ret) = rewritten else {
        return Verdict::Pass;
    };
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(mut reply)) => {
            reply.insert("return".into(), ret);
            serde_json::to_vec(&reply).map_or(Verdict::Pass, Verdict::Replace)
        }
        _ => Verdict::Pass,
    }
}

mod handover;

#[cfg(test)]
mod tests;
