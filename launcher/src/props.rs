//! Properties every parser of outside input must keep, whatever the input: no panic, no hang,
//! and where a parser prints back what it read, the round trip holds. Each function takes raw
//! bytes and panics when a property breaks. The same functions are the fuzz targets in
//! `fuzz/` (coverage-guided, on a nightly toolchain) and the property tests below (random
//! inputs, on stable, in the test command).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use serde_json::Value;

use crate::cmdline::{CmdLine, KeyVal, OptArg};
use crate::journal::{Command, Journal, Outcome};
use crate::proxy::{check_split_invariance, Mode};

/// The argv grammar: `data` split at NUL bytes is an argv; one that parses prints back as
/// itself, and parses again to the same command line.
pub fn argv(data: &[u8]) {
    let args: Vec<OsString> = data
        .split(|&b| b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    if let Ok(cmd) = CmdLine::parse(&args) {
        let printed = cmd.to_args();
        assert_eq!(printed, args, "argv printed back differs");
        let again = CmdLine::parse(&printed).map(|c| c.to_args());
        assert_eq!(again.ok(), Some(printed), "argv parsed twice differs");
        let _ = cmd.is_info_only();
        for opt in cmd.opts("drive").chain(cmd.opts("netdev")) {
            let _ = opt.parse_arg();
        }
    }
}

/// `key=value,...` arguments, with and without an implied first key: printed back as they
/// were given, and read again to the same elements.
pub fn keyval(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for implied in [None, Some("type")] {
        let kv = KeyVal::parse(&text, implied);
        let printed = kv.to_string();
        assert_eq!(printed, text, "keyval printed back differs");
        assert_eq!(
            KeyVal::parse(&printed, implied),
            kv,
            "keyval parsed twice differs"
        );
        for key in kv.keys() {
            let _ = kv.get(&key);
        }
    }
}

/// JSON option arguments (`-object {"qom-type":...}`, libvirt's syntax): an object parses,
/// anything else starting with `{` is refused, and every key reads back.
pub fn json_option(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let json = format!("{{{}", text.trim_start_matches('{'));
    for arg in [text.as_ref(), json.as_str()] {
        let Some(parsed) = OptArg::parse(arg, Some("qom-type")) else {
            assert!(arg.starts_with('{'), "only JSON is refused: {arg:?}");
            continue;
        };
        if arg.starts_with('{') {
            assert!(parsed.is_json(), "{arg:?} read as keyval");
        }
        for key in parsed.keys() {
            let _ = parsed.get(&key);
            let _ = parsed.get_bool(&key);
        }
    }
}

/// QMP framing through the monitor proxy, both ways, whatever the split; the launcher's own
/// monitor reads the same bytes without panicking.
pub fn qmp_framing(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b));
    check_split_invariance(Mode::Qmp, data, split);
    private_monitor(data);
}

/// HMP framing through the monitor proxy (lines in, prompts out), whatever the split.
pub fn hmp_framing(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b));
    check_split_invariance(Mode::Hmp, data, split);
}

/// The hot-plug journal fed any sequence of monitor traffic: each line of `data` is a QMP
/// command (`{...}`), an event (`!{...}`), or an HMP line; the first byte of a command line
/// says whether QEMU accepted it. The journal never panics, holds no more entries than
/// commands it was given, and answers `succeeded` for each.
pub fn journal(data: &[u8]) {
    let mut journal = Journal::default();
    let mut commands = 0;
    for line in data.split(|&b| b == b'\n') {
        let accepted = line.first().is_none_or(|b| b % 4 != 0);
        let text = String::from_utf8_lossy(line);
        if let Some(event) = text.strip_prefix('!') {
            if let Ok(event) = serde_json::from_str::<Value>(event) {
                journal.event(&event);
            }
            continue;
        }
        let (cmd, outcome) = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(msg)) => {
                let Some(name) = msg.get("execute").and_then(Value::as_str) else {
                    continue;
                };
                let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
                let outcome = match accepted {
                    true => Outcome::Return(Value::Object(serde_json::Map::new())),
                    false => Outcome::Error,
                };
                (Command::qmp(name, args), outcome)
            }
            _ => match Command::hmp(&text) {
                Some(cmd) => {
                    let printed = if accepted { "" } else { "Error: no" };
                    (cmd, Outcome::Printed(printed.to_owned()))
                }
                None => continue,
            },
        };
        commands += 1;
        journal.record(usize::from(accepted), cmd, outcome, None);
    }
    assert!(journal.len() <= commands, "more entries than commands");
    for entry in journal.entries() {
        let _ = entry.succeeded(&Value::Null);
        let _ = entry.succeeded(&Value::Object(serde_json::Map::new()));
    }
}

/// The control protocol: any line is a request or refused, and every request read back from
/// its own JSON is the same request.
pub fn control(data: &[u8]) {
    if let Ok(req) = crate::control::parse_request(data) {
        let line = req.to_json().to_string();
        let again = crate::control::parse_request(line.as_bytes()).ok();
        assert_eq!(again, Some(req), "control request read back differs");
    }
}

/// The launcher's private monitor fed `data` from QEMU, in two reads: no panic, and a
/// message is never both a reply and an event.
fn private_monitor(data: &[u8]) {
    use std::io::Write;
    let Ok((ours, mut theirs)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    let Ok(mut qmp) = crate::qmp::Qmp::new(ours) else {
        return;
    };
    let (a, b) = data.split_at(data.len() / 2);
    for part in [a, b] {
        if theirs.write_all(part).is_err() {
            return;
        }
        if qmp.on_readable().is_err() {
            return;
        }
    }
    let _ = qmp.take_greeting();
    let _ = qmp.take_reply(1);
    let _ = qmp.take_events();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Tokens that make random command lines look like QEMU's.
    fn token() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"-drive".to_vec()),
            Just(b"-netdev".to_vec()),
            Just(b"-object".to_vec()),
            Just(b"-machine".to_vec()),
            Just(b"-readconfig".to_vec()),
            Just(b"--incoming".to_vec()),
            Just(b"-S".to_vec()),
            Just(b"file=a,,b,if=virtio".to_vec()),
            Just(br#"{"qom-type":"memory-backend-ram","id":"r","size":1}"#.to_vec()),
            Just(b"tap,id=n,fd=3".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ]
    }

    fn argv_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(token(), 0..12).prop_map(|ts| ts.join(&0u8))
    }

    fn keyval_text() -> impl Strategy<Value = String> {
        "[a-z=,.{}\"]{0,40}"
    }

    fn qmp_stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(br#"{"return": {}, "id": 1}"#.to_vec()),
            Just(b"{\"event\": \"STOP\"}\r\n".to_vec()),
            Just(br#"{"QMP": {"version": {}}}"#.to_vec()),
            Just(br#"{"execute":"device_add","arguments":{"id":"d","driver":"x"}}"#.to_vec()),
            Just(b"\"str}ing\\\"{\"".to_vec()),
            Just(b"(qemu) ".to_vec()),
            Just(b"info version\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ];
        proptest::collection::vec(piece, 0..10).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn argv_round_trips(data in argv_bytes()) { argv(&data) }

        #[test]
        fn argv_of_any_bytes_round_trips(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            argv(&data)
        }

        #[test]
        fn keyval_round_trips(text in keyval_text()) { keyval(text.as_bytes()) }

        #[test]
        fn json_options_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            json_option(&data)
        }

        #[test]
        fn json_options_of_json_text(text in "[{}\\[\\]\":,a-z0-9 ]{0,40}") {
            json_option(text.as_bytes())
        }

        #[test]
        fn qmp_framing_does_not_depend_on_the_split(data in qmp_stream()) { qmp_framing(&data) }

        #[test]
        fn hmp_framing_does_not_depend_on_the_split(data in qmp_stream()) { hmp_framing(&data) }

        #[test]
        fn journal_takes_any_traffic(lines in proptest::collection::vec(prop_oneof![
            Just(r#"{"execute":"device_add","arguments":{"id":"d1","driver":"e1000"}}"#.to_owned()),
            Just(r#"{"execute":"device_del","arguments":{"id":"d1"}}"#.to_owned()),
            Just(r#"!{"event":"DEVICE_DELETED","data":{"device":"d1"}}"#.to_owned()),
            Just(r#"{"execute":"getfd","arguments":{"fdname":"f"}}"#.to_owned()),
            Just("device_add e1000,id=d2".to_owned()),
            Just("netdev_add user,id=n1".to_owned()),
            Just("set_link n1 off".to_owned()),
            "[ -~]{0,30}",
        ], 0..20)) {
            journal(lines.join("\n").as_bytes())
        }

        #[test]
        fn control_requests_read_back(data in prop_oneof![
            Just(br#"{"execute":"upgrade","to":"/usr/bin/q"}"#.to_vec()),
            Just(br#"{"execute":"check"}"#.to_vec()),
            Just(br#"{"execute":"status","to":3}"#.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..48),
        ]) {
            control(&data)
        }
    }
}
