//! The top-level members of one QMP message, found without parsing their values.
//!
//! The proxy decides what to do with a message by its envelope: `QMP`, `return` or `error`,
//! `id`, `event`, `execute`. Parsing every message whole into a `serde_json::Value` (a map,
//! its keys and every nested value allocated, then dropped) was most of the proxy's work per
//! round trip, for a `query-status` as for a `query-qmp-schema` of 200 KiB. Here one pass over
//! the bytes finds where each top-level member's value is; the few values looked at are parsed
//! alone, the rest are passed on untouched.
//!
//! QEMU writes valid JSON (`qobject/qjson.c`); anything else is told apart as "not an object",
//! which the callers pass through as they did an unparsable message.

use serde_json::Value;

/// The members of one JSON object, in order: each key as written between its quotes (QMP's
/// member names have no escapes) and its value's bytes.
#[derive(Debug)]
pub(super) struct Members<'a> {
    members: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> Members<'a> {
    /// The members of `bytes`, a whole JSON object; `None` if it is not one.
    pub(super) fn of(bytes: &'a [u8]) -> Option<Members<'a>> {
        let mut at = skip_ws(bytes, 0);
        if bytes.get(at) != Some(&b'{') {
            return None;
        }
        at += 1;
        let mut members = Vec::with_capacity(4);
        loop {
            at = skip_ws(bytes, at);
            match bytes.get(at)? {
                b'}' => break,
                b',' if !members.is_empty() => {
                    at = skip_ws(bytes, at + 1);
                }
                _ => {}
            }
            if bytes.get(at) != Some(&b'"') {
                return None;
            }
            let key_end = value_end(bytes, at)?;
            let key = bytes.get(at + 1..key_end - 1)?;
            at = skip_ws(bytes, key_end);
            if bytes.get(at) != Some(&b':') {
                return None;
            }
            let start = skip_ws(bytes, at + 1);
            let end = value_end(bytes, start)?;
            members.push((key, bytes.get(start..end)?));
            at = end;
        }
        // Nothing but whitespace may follow the object.
        (skip_ws(bytes, at + 1) == bytes.len()).then_some(Members { members })
    }

    /// The bytes of `key`'s value, the last one if it came twice (as `serde_json` keeps).
    pub(super) fn raw(&self, key: &str) -> Option<&'a [u8]> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| *v)
    }

    /// Whether `key` is there.
    pub(super) fn has(&self, key: &str) -> bool {
        self.raw(key).is_some()
    }

    /// `key`'s value, parsed.
    pub(super) fn value(&self, key: &str) -> Option<Value> {
        serde_json::from_slice(self.raw(key)?).ok()
    }

    /// `key`'s value if it is a string.
    pub(super) fn string(&self, key: &str) -> Option<String> {
        let raw = self.raw(key)?;
        // The usual case, a name without escapes, needs no parser.
        match raw {
            [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
                String::from_utf8(inner.to_vec()).ok()
            }
            _ => match serde_json::from_slice(raw).ok()? {
                Value::String(s) => Some(s),
                _ => None,
            },
        }
    }
}

fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// Where the value starting at `start` ends (one past its last byte); `None` if it does not
/// end within `bytes`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => {
            let mut at = start + 1;
            loop {
                match bytes.get(at)? {
                    b'\\' => at += 2,
                    b'"' => return Some(at + 1),
                    _ => at += 1,
                }
            }
        }
        b'{' | b'[' => {
            let (mut depth, mut at, mut quoted, mut escaped) = (0usize, start, false, false);
            loop {
                let b = *bytes.get(at)?;
                at += 1;
                if quoted {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        quoted = false;
                    }
                    continue;
                }
                match b {
                    b'"' => quoted = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at);
                        }
                    }
                    _ => {}
                }
            }
        }
        // A number or a literal: up to the next delimiter.
        _ => {
            let len = bytes
                .get(start..)?
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(bytes.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_found_as_serde_json_reads_them() {
        let messages: [&[u8]; 6] = [
            br#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 7}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"error": {"class": "GenericError", "desc": "a \"}\" and a ] here"}, "id": "x{"}"#,
            br#" { "QMP" : { "version" : {}, "capabilities" : [ "oob" ] } } "#,
            br#"{"return": [1, -2.5e3, null, true, [[], {}], "\\"], "id": null}"#,
            br#"{"execute":"query-status"}"#,
        ];
        for m in messages {
            let whole: Value = serde_json::from_slice(m).unwrap();
            let members =
                Members::of(m).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(m)));
            let obj = whole.as_object().unwrap();
            assert_eq!(members.members.len(), obj.len());
            for (k, v) in obj {
                assert_eq!(members.value(k).as_ref(), Some(v), "{k}");
            }
        }
    }

    #[test]
    fn strings_with_and_without_escapes() {
        let m = Members::of(br#"{"event": "STOP", "x": "a\"b", "n": 1}"#).unwrap();
        assert_eq!(m.string("event").as_deref(), Some("STOP"));
        assert_eq!(m.string("x").as_deref(), Some("a\"b"));
        assert_eq!(m.string("n"), None);
        assert!(m.has("n") && !m.has("id"));
        assert_eq!(m.value("n"), Some(json!(1)));
    }

    #[test]
    fn anything_but_one_whole_object_is_none() {
        for bad in [
            &b"[1]"[..],
            b"",
            b"{",
            b"{\"a\":",
            b"{\"a\" 1}",
            b"{\"a\":\"x}",
            b"{\"a\":1} {}",
            b"{1:2}",
            b"{,\"a\":1}",
        ] {
            assert!(
                Members::of(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(Members::of(b"{}").map(|m| m.members.len()), Some(0));
    }
}
