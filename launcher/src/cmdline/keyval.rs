//! QEMU's `key=value,...` option syntax, kept byte-exact.
//!
//! QEMU has two parsers for it, QemuOpts (`util/qemu-option.c`) and keyval
//! (`util/keyval.c`). They agree on what matters here:
//! - elements are separated by `,`; inside a value `,,` stands for one `,`;
//! - an element is `key=value` when a `=` comes before the next `,`; the key never contains
//!   `,` or `=`; keyval's dotted keys (`addr.type`) are plain keys here;
//! - a first element without `=` is the value of the option's implied key (`256` in
//!   `-m 256`), when the option has one;
//! - any other element without `=` is a bare key: QemuOpts reads `server` as `server=on` and
//!   `nowait` as `wait=off`; `help` and `?` ask for help.
//!
//! They differ in corners that do not change how elements split: keyval ends an implied value
//! at the first `,` (no `,,` escape) and refuses bare keys other than `help`. Each element
//! keeps its original text until it is changed, so printing an unchanged list gives back the
//! exact bytes it was parsed from, whatever parser QEMU will use on it.

use std::fmt;

/// One element of a [`KeyVal`] list, as [`KeyVal::elements`] yields it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element<'a> {
    /// A keyless first element: the value of the option's implied key.
    Implied(&'a str),
    /// `key=value`, with `,,` already unescaped in the value.
    Pair(&'a str, &'a str),
    /// A key without `=` (`server`, `nowait`, `help`).
    Bare(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `None` for the implied first value.
    key: Option<String>,
    /// `None` for a bare key.
    value: Option<String>,
    /// The element as written; dropped when the entry changes.
    raw: Option<String>,
}

impl Entry {
    fn element(&self) -> Element<'_> {
        match (&self.key, &self.value) {
            (None, Some(v)) => Element::Implied(v),
            (Some(k), Some(v)) => Element::Pair(k, v),
            (Some(k), None) => Element::Bare(k),
            (None, None) => Element::Bare(""),
        }
    }

    fn render(&self, out: &mut String) {
        if let Some(raw) = &self.raw {
            out.push_str(raw);
            return;
        }
        match self.element() {
            Element::Implied(v) => out.push_str(&escape(v)),
            Element::Pair(k, v) => {
                out.push_str(k);
                out.push('=');
                out.push_str(&escape(v));
            }
            Element::Bare(k) => out.push_str(k),
        }
    }
}

/// A parsed `key=value,...` argument: ordered elements, an optional implied first value,
/// bare keys kept as such, `,,` escapes undone in values and redone on output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyVal {
    implied_key: Option<String>,
    entries: Vec<Entry>,
}

fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Reads a value from `s[start..]` up to a lone `,` or the end, undoing `,,`. Returns the
/// value and the index of the separating `,` (or `s.len()`).
fn read_value(s: &str, start: usize) -> (String, usize) {
    let bytes = s.as_bytes();
    let mut value = String::new();
    let mut i = start;
    let mut run = start;
    while let Some(&b) = bytes.get(i) {
        if b == b',' {
            if bytes.get(i + 1) != Some(&b',') {
                break;
            }
            value.push_str(&s[run..=i]);
            i += 2;
            run = i;
        } else {
            i += 1;
        }
    }
    value.push_str(&s[run..i]);
    (value, i)
}

impl KeyVal {
    /// Parses `s`; `implied_key` names the value of a keyless first element (see the option
    /// table in [`super::options`]). An empty string has no elements.
    pub fn parse(s: &str, implied_key: Option<&str>) -> KeyVal {
        let mut entries = Vec::new();
        let mut start = 0;
        // A trailing `,` leaves one empty element after it, so that printing restores it.
        while !s.is_empty() {
            let len = s[start..].find([',', '=']).unwrap_or(s.len() - start);
            let (key, value, end) = if s.as_bytes().get(start + len) == Some(&b'=') {
                let (value, end) = read_value(s, start + len + 1);
                (Some(s[start..start + len].to_owned()), Some(value), end)
            } else if entries.is_empty() && implied_key.is_some() {
                let (value, end) = read_value(s, start);
                (None, Some(value), end)
            } else {
                (Some(s[start..start + len].to_owned()), None, start + len)
            };
            entries.push(Entry {
                key,
                value,
                raw: Some(s[start..end].to_owned()),
            });
            if end >= s.len() {
                break;
            }
            start = end + 1;
        }
        KeyVal {
            implied_key: implied_key.map(str::to_owned),
            entries,
        }
    }

    /// The key a keyless first element stands for.
    pub fn implied_key(&self) -> Option<&str> {
        self.implied_key.as_deref()
    }

    /// The elements in order.
    pub fn elements(&self) -> impl Iterator<Item = Element<'_>> {
        self.entries.iter().map(Entry::element)
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn matches(&self, entry: &Entry, key: &str) -> bool {
        match (&entry.key, &entry.value) {
            (None, _) => self.implied_key.as_deref() == Some(key),
            (Some(k), Some(_)) => k == key,
            (Some(k), None) => k == key || k.strip_prefix("no") == Some(key),
        }
    }

    /// The value of `key`, the last one when it is given twice (QemuOpts lets the last win).
    /// A bare `key` reads as `on` and a bare `nokey` as `off`, as QemuOpts reads flags.
    pub fn get(&self, key: &str) -> Option<String> {
        let entry = self.entries.iter().rev().find(|e| self.matches(e, key))?;
        Some(match (&entry.key, &entry.value) {
            (_, Some(v)) => v.clone(),
            (Some(k), None) if k == key => "on".to_owned(),
            _ => "off".to_owned(),
        })
    }

    /// Sets `key` to `value`: the last element naming it is replaced where it stands (an
    /// implied value stays keyless), earlier ones are dropped, and a new key is appended.
    /// Every other element keeps its original bytes.
    pub fn set(&mut self, key: &str, value: &str) {
        let Some(last) = self.entries.iter().rposition(|e| self.matches(e, key)) else {
            self.entries.push(Entry {
                key: Some(key.to_owned()),
                value: Some(value.to_owned()),
                raw: None,
            });
            return;
        };
        let Some(entry) = self.entries.get_mut(last) else {
            return;
        };
        if entry.key.is_some() {
            entry.key = Some(key.to_owned());
        }
        entry.value = Some(value.to_owned());
        entry.raw = None;
        let mut index = 0;
        let implied_key = self.implied_key.clone();
        self.entries.retain(|e| {
            index += 1;
            index - 1 == last || !entry_matches(implied_key.as_deref(), e, key)
        });
    }

    /// Removes every element naming `key` and returns the value [`KeyVal::get`] gave.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let old = self.get(key);
        let implied_key = self.implied_key.clone();
        self.entries
            .retain(|e| !entry_matches(implied_key.as_deref(), e, key));
        old
    }

    /// The keys in order of first appearance; the implied value is listed under its key.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for entry in &self.entries {
            let key = match &entry.key {
                Some(k) => k.as_str(),
                None => self.implied_key.as_deref().unwrap_or_default(),
            };
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_owned());
            }
        }
        keys
    }
}

fn entry_matches(implied_key: Option<&str>, entry: &Entry, key: &str) -> bool {
    KeyVal {
        implied_key: implied_key.map(str::to_owned),
        entries: Vec::new(),
    }
    .matches(entry, key)
}

impl fmt::Display for KeyVal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            entry.render(&mut out);
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &str, implied: Option<&str>) -> KeyVal {
        KeyVal::parse(s, implied)
    }

    #[test]
    fn round_trips_byte_exact() {
        for s in [
            "",
            "socket,id=x",
            "file=/var/lib/my,,disk.qcow2,if=virtio",
            "a=b,",
            "a=x,,,b=c",
            ",a=b",
            "=x,,y",
            "unix:/run/q.sock,server,nowait",
            "timestamp",
            "a,,b=c",
            "help",
        ] {
            for implied in [None, Some("type")] {
                assert_eq!(kv(s, implied).to_string(), s, "{s:?} implied {implied:?}");
            }
        }
    }

    #[test]
    fn comma_escape() {
        let k = kv("file=/a,,b,,,if=virtio", None);
        assert_eq!(k.get("file").as_deref(), Some("/a,b,"));
        assert_eq!(k.get("if").as_deref(), Some("virtio"));
        let mut k = k;
        k.set("file", "/c,d");
        assert_eq!(k.to_string(), "file=/c,,d,if=virtio");
    }

    #[test]
    fn implied_first_value() {
        let k = kv("256", Some("size"));
        assert_eq!(k.get("size").as_deref(), Some("256"));
        assert_eq!(k.keys(), ["size"]);
        let k = kv("socket,id=mon0,path=/p", Some("backend"));
        assert_eq!(k.get("backend").as_deref(), Some("socket"));
        assert_eq!(k.elements().next(), Some(Element::Implied("socket")));
        // Without an implied key the first element is a bare key.
        let k = kv("timestamp=on", None);
        assert_eq!(k.get("timestamp").as_deref(), Some("on"));
        let k = kv("on,obsolete=deny", None);
        assert_eq!(k.elements().next(), Some(Element::Bare("on")));
        // An explicit implied key counts too, and a later one wins.
        let k = kv("pc,type=q35", Some("type"));
        assert_eq!(k.get("type").as_deref(), Some("q35"));
    }

    #[test]
    fn bare_keys_are_flags() {
        let k = kv("unix:/p,server,nowait", Some("dev"));
        assert_eq!(k.get("dev").as_deref(), Some("unix:/p"));
        assert_eq!(k.get("server").as_deref(), Some("on"));
        assert_eq!(k.get("wait").as_deref(), Some("off"));
        assert_eq!(k.keys(), ["dev", "server", "nowait"]);
        assert_eq!(k.to_string(), "unix:/p,server,nowait");
    }

    #[test]
    fn set_keeps_order_and_other_bytes() {
        let mut k = kv("pc-i440fx-7.2,usb=off,dump-guest-core=off", Some("type"));
        k.set("type", "pc-i440fx-10.0");
        k.set("memory-backend", "pc.ram");
        k.set("usb", "on");
        assert_eq!(
            k.to_string(),
            "pc-i440fx-10.0,usb=on,dump-guest-core=off,memory-backend=pc.ram"
        );
        // Untouched elements keep their exact spelling, escapes included.
        let mut k = kv("file=a,,b,if=virtio,cache=none", None);
        k.set("cache", "writeback");
        assert_eq!(k.to_string(), "file=a,,b,if=virtio,cache=writeback");
        // A flag becomes key=value where it stood; duplicates collapse to the last place.
        let mut k = kv("socket,server,id=a,id=b,wait=off", Some("backend"));
        k.set("server", "off");
        k.set("id", "c");
        assert_eq!(k.to_string(), "socket,server=off,id=c,wait=off");
    }

    #[test]
    fn remove_keeps_the_rest() {
        let mut k = kv(
            "memory-backend-memfd,id=m,size=1G,hugetlb=on,share=on",
            Some("qom-type"),
        );
        assert_eq!(k.remove("hugetlb").as_deref(), Some("on"));
        assert_eq!(k.remove("seal"), None);
        assert_eq!(k.to_string(), "memory-backend-memfd,id=m,size=1G,share=on");
        assert_eq!(
            k.remove("qom-type").as_deref(),
            Some("memory-backend-memfd")
        );
        assert_eq!(k.to_string(), "id=m,size=1G,share=on");
        let mut k = kv("unix:/p,server,nowait", Some("dev"));
        assert_eq!(k.remove("wait").as_deref(), Some("off"));
        assert_eq!(k.to_string(), "unix:/p,server");
    }

    #[test]
    fn dotted_keys() {
        let k = kv(
            "stream,id=n,server=off,addr.type=fd,addr.str=5",
            Some("type"),
        );
        assert_eq!(k.get("addr.str").as_deref(), Some("5"));
        assert_eq!(k.keys(), ["type", "id", "server", "addr.type", "addr.str"]);
    }
}
