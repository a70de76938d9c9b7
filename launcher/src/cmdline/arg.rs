//! A structured option argument: `key=value,...` or a JSON object.
//!
//! Since QEMU 6.0, `-object`, `-device`, `-netdev`, `-blockdev`, `-display`, `-audiodev`,
//! `-compat` (and, from 9.x, `-incoming`) also take a JSON object when the argument starts
//! with `{` (`qobject_input_visitor_new_str()`); libvirt uses that form. Both forms answer the
//! same questions here, so callers read `qom-type` or `addr.str` without caring which one
//! the user wrote.

use std::fmt;

use serde_json::{Map, Number, Value};

use super::keyval::KeyVal;

/// A structured option argument: QEMU's `key=value,...` (QemuOpts/keyval) syntax, or the JSON
/// syntax that -object, -device, -netdev, -blockdev (and some others) accept when the
/// argument starts with '{'.
#[derive(Debug, Clone, PartialEq)]
pub enum OptArg {
    /// `key=value,...`, with the option's implied key for a keyless first value.
    KeyVal(KeyVal),
    /// A JSON object; key order is kept (serde_json's `preserve_order`).
    Json(Map<String, Value>),
}

/// Keys QEMU reads as integers or sizes, so that a new JSON key gets a number, not a string:
/// QEMU's JSON input is strictly typed and refuses `"size":"1024"`.
fn is_numeric_key(key: &str) -> bool {
    key.ends_with("size")
        || matches!(
            key,
            "align" | "prealloc-threads" | "bootindex" | "slots" | "maxmem"
        )
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" | "y" => Some(true),
        "off" | "false" | "no" | "n" => Some(false),
        _ => None,
    }
}

fn parse_number(value: &str) -> Option<Number> {
    if let Ok(n) = value.parse::<u64>() {
        return Some(n.into());
    }
    if let Ok(n) = value.parse::<i64>() {
        return Some(n.into());
    }
    value.parse::<f64>().ok().and_then(Number::from_f64)
}

/// The JSON value `value` becomes under `key`, given what the key held before.
fn json_value(old: Option<&Value>, key: &str, value: &str) -> Value {
    let string = || Value::String(value.to_owned());
    match old {
        Some(Value::Number(_)) => parse_number(value).map_or_else(string, Value::Number),
        Some(Value::Bool(_)) => parse_bool(value).map_or_else(string, Value::Bool),
        Some(_) => string(),
        None => match value {
            "on" | "true" => Value::Bool(true),
            "off" | "false" => Value::Bool(false),
            _ if is_numeric_key(key) => value
                .parse::<u64>()
                .map_or_else(|_| string(), |n| Value::Number(n.into())),
            _ => string(),
        },
    }
}

fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.to_owned()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

fn json_get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(v) = map.get(key) {
        return Some(v);
    }
    let (head, rest) = key.split_once('.')?;
    json_get(map.get(head)?.as_object()?, rest)
}

fn json_set(map: &mut Map<String, Value>, key: &str, make: impl FnOnce(Option<&Value>) -> Value) {
    if map.contains_key(key) || !key.contains('.') {
        let new = make(map.get(key));
        map.insert(key.to_owned(), new);
        return;
    }
    let (head, rest) = key.split_once('.').unwrap_or((key, ""));
    let child = map
        .entry(head.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    if let Value::Object(child) = child {
        json_set(child, rest, make);
    }
}

fn json_remove(map: &mut Map<String, Value>, key: &str) -> Option<Value> {
    if let Some(v) = map.shift_remove(key) {
        return Some(v);
    }
    let (head, rest) = key.split_once('.')?;
    json_remove(map.get_mut(head)?.as_object_mut()?, rest)
}

fn json_keys(map: &Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in map {
        let key = format!("{prefix}{k}");
        match v {
            Value::Object(inner) if !inner.is_empty() => json_keys(inner, &format!("{key}."), out),
            _ => out.push(key),
        }
    }
}

impl OptArg {
    /// Parses an option argument: JSON when it starts with `{` (`None` if that is not a JSON
    /// object), `key=value,...` otherwise, with `implied_key` naming a keyless first value.
    pub fn parse(arg: &str, implied_key: Option<&str>) -> Option<OptArg> {
        if arg.starts_with('{') {
            return match serde_json::from_str(arg) {
                Ok(Value::Object(map)) => Some(OptArg::Json(map)),
                _ => None,
            };
        }
        Some(OptArg::KeyVal(KeyVal::parse(arg, implied_key)))
    }

    /// The value of `key` as a string. Nested JSON objects and keyval's dotted keys are both
    /// addressed with dots (`addr.str`). JSON strings come as they are, numbers in decimal,
    /// booleans as `on`/`off` (what the same setting reads as in keyval syntax), nested
    /// objects and arrays as JSON text; `null` as `None`.
    pub fn get(&self, key: &str) -> Option<String> {
        match self {
            OptArg::KeyVal(kv) => kv.get(key),
            OptArg::Json(map) => json_get(map, key).and_then(scalar_string),
        }
    }

    /// The value of `key` read as a boolean the way QEMU reads one (`on`/`off`, `true`/
    /// `false`, `yes`/`no`, JSON booleans); `None` if absent or not a boolean.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).as_deref().and_then(parse_bool)
    }

    /// Sets `key` to `value`, replacing it where it stands or appending it.
    ///
    /// In JSON the value keeps the type the key had: a number stays a number and a boolean a
    /// boolean when `value` reads as one. A new JSON key becomes a boolean for `on`, `off`,
    /// `true` and `false`, a number for an integer under a size-like key (`size`,
    /// `hugetlbsize`, `align`, `maxmem`, ...), and a string otherwise. Use
    /// [`OptArg::set_value`] for anything else.
    pub fn set(&mut self, key: &str, value: &str) {
        match self {
            OptArg::KeyVal(kv) => kv.set(key, value),
            OptArg::Json(map) => {
                let last = key.rsplit('.').next().unwrap_or(key);
                json_set(map, key, |old| json_value(old, last, value));
            }
        }
    }

    /// Sets `key` to a JSON value exactly; in keyval syntax the value is written as
    /// [`OptArg::get`] would read it back.
    pub fn set_value(&mut self, key: &str, value: Value) {
        match self {
            OptArg::KeyVal(kv) => kv.set(key, &scalar_string(&value).unwrap_or_default()),
            OptArg::Json(map) => json_set(map, key, |_| value),
        }
    }

    /// Removes `key` and returns its value as [`OptArg::get`] gives it.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        match self {
            OptArg::KeyVal(kv) => kv.remove(key),
            OptArg::Json(map) => json_remove(map, key).as_ref().and_then(scalar_string),
        }
    }

    /// The keys in order; nested JSON objects are flattened into dotted keys.
    pub fn keys(&self) -> Vec<String> {
        match self {
            OptArg::KeyVal(kv) => kv.keys(),
            OptArg::Json(map) => {
                let mut out = Vec::new();
                json_keys(map, "", &mut out);
                out
            }
        }
    }

    /// Whether this argument is in JSON syntax.
    pub fn is_json(&self) -> bool {
        matches!(self, OptArg::Json(_))
    }
}

impl fmt::Display for OptArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptArg::KeyVal(kv) => kv.fmt(f),
            OptArg::Json(map) => f.write_str(&serde_json::to_string(map).map_err(|_| fmt::Error)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> OptArg {
        OptArg::parse(s, Some("qom-type")).unwrap()
    }

    #[test]
    fn json_get_in_both_syntaxes() {
        let j = json(
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456,"share":true}"#,
        );
        let k = OptArg::parse(
            "memory-backend-ram,id=pc.ram,size=268435456,share=on",
            Some("qom-type"),
        )
        .unwrap();
        for a in [&j, &k] {
            assert_eq!(a.get("qom-type").as_deref(), Some("memory-backend-ram"));
            assert_eq!(a.get("size").as_deref(), Some("268435456"));
            assert_eq!(a.get("share").as_deref(), Some("on"));
            assert_eq!(a.get_bool("share"), Some(true));
            assert_eq!(a.keys(), ["qom-type", "id", "size", "share"]);
        }
        assert!(j.is_json() && !k.is_json());
    }

    #[test]
    fn json_nested_keys() {
        let a =
            json(r#"{"type":"stream","addr":{"type":"fd","str":"5"},"server":false,"id":"n1"}"#);
        assert_eq!(a.get("addr.type").as_deref(), Some("fd"));
        assert_eq!(a.get("addr.str").as_deref(), Some("5"));
        assert_eq!(a.get("addr").as_deref(), Some(r#"{"type":"fd","str":"5"}"#));
        assert_eq!(a.keys(), ["type", "addr.type", "addr.str", "server", "id"]);
    }

    #[test]
    fn json_set_keeps_order_and_types() {
        let mut a = json(r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#);
        a.set("qom-type", "memory-backend-file");
        a.set("size", "536870912");
        a.set("mem-path", "/proc/self/fd/5");
        a.set("share", "on");
        a.set("prealloc-threads", "2");
        assert_eq!(
            a.to_string(),
            r#"{"qom-type":"memory-backend-file","id":"pc.ram","size":536870912,"mem-path":"/proc/self/fd/5","share":true,"prealloc-threads":2}"#
        );
        // A string stays a string even when it looks like a number (a tap fd is a str in QAPI).
        let mut n = json(r#"{"type":"tap","fd":"32","id":"hostnet0"}"#);
        n.set("fd", "40");
        n.set("addr.type", "fd");
        assert_eq!(
            n.to_string(),
            r#"{"type":"tap","fd":"40","id":"hostnet0","addr":{"type":"fd"}}"#
        );
        assert_eq!(n.remove("addr.type").as_deref(), Some("fd"));
        assert_eq!(n.remove("id").as_deref(), Some("hostnet0"));
        assert_eq!(n.to_string(), r#"{"type":"tap","fd":"40","addr":{}}"#);
        n.set_value("vhost", Value::Bool(false));
        assert_eq!(n.get("vhost").as_deref(), Some("off"));
    }

    #[test]
    fn not_an_object_is_not_parsed() {
        assert_eq!(OptArg::parse("{broken", None), None);
        assert_eq!(OptArg::parse("[1]", None).map(|a| a.is_json()), Some(false));
    }
}
