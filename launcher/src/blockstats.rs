//! Disk I/O counters that go on across generations.
//!
//! QEMU counts each disk's I/O from its own start (`query-blockstats`: bytes, operations,
//! time spent). A new generation would start again from zero, and `virsh domblkstat`,
//! `virsh domstats` and every monitoring tool reading them would see the counters of a
//! running VM go back, which they never do under one QEMU. So at each upgrade the launcher
//! reads the old QEMU's counters once the guest has stopped there, and adds them to what every
//! later generation reports, per disk.
//!
//! A process-wide table, as the pty names are ([`crate::ptys::publish`]): the proxy frames
//! QEMU's replies per connection, deep below the upgrade that learns the totals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::Value;

/// Counters carried over, by disk ([`key`]) and counter name.
static CARRIED: Mutex<Option<HashMap<String, HashMap<String, u64>>>> = Mutex::new(None);
/// Whether anything was carried: until then no reply is looked into.
static ANY: AtomicBool = AtomicBool::new(false);

/// Whether [`blockstats_reply`] can change anything: an upgrade carried counters over.
pub fn rewrites_replies() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Whether a `stats` member counts up for as long as the QEMU runs. `wr_highest_offset` (a
/// maximum), `idle_time_ns` (time since the last I/O), the `account_*` flags and the
/// `timed_stats` windows are not counters.
fn cumulative(name: &str) -> bool {
    ["_bytes", "_operations", "_total_time_ns", "_merged"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// What names a disk across generations: its device (`qdev`, then the legacy `device`), which
/// a block job's pivot leaves in place, else its node.
fn key(entry: &Value) -> Option<String> {
    ["qdev", "device", "node-name"]
        .iter()
        .filter_map(|k| entry.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Whether `ret` is the `return` of `query-blockstats`: a list of entries with `stats`.
fn is_blockstats(ret: &Value) -> bool {
    ret.as_array().is_some_and(|list| {
        !list.is_empty()
            && list.iter().all(|e| {
                e.get("stats").is_some_and(Value::is_object)
                    && (e.get("qdev").is_some() || e.get("device").is_some())
            })
    })
}

/// Adds `reply` (the old generation's `query-blockstats` return, read when the guest had
/// stopped there) to what later generations report. Its counters already include what was
/// carried into it.
pub fn carry(reply: &Value) {
    let Some(ret) = carried_reply(reply) else {
        return;
    };
    let mut table = CARRIED.lock().unwrap_or_else(|e| e.into_inner());
    let table = table.get_or_insert_with(HashMap::new);
    for entry in ret.as_array().into_iter().flatten() {
        let (Some(key), Some(stats)) = (key(entry), entry["stats"].as_object()) else {
            continue;
        };
        ANY.store(true, Ordering::Relaxed);
        let totals = table.entry(key).or_default();
        for (name, value) in stats {
            if let (true, Some(v)) = (cumulative(name), value.as_u64()) {
                totals.insert(name.clone(), v);
            }
        }
    }
}

/// `ret` with the counters carried from earlier generations added, if it is a
/// `query-blockstats` return and anything was carried.
pub fn blockstats_reply(ret: &Value) -> Option<Value> {
    let table = CARRIED.lock().unwrap_or_else(|e| e.into_inner());
    add(ret, table.as_ref()?)
}

/// `ret` as a client would see it now: what the old QEMU reported plus what it carried.
fn carried_reply(ret: &Value) -> Option<Value> {
    if !is_blockstats(ret) {
        return None;
    }
    Some(blockstats_reply(ret).unwrap_or_else(|| ret.clone()))
}

fn add(ret: &Value, table: &HashMap<String, HashMap<String, u64>>) -> Option<Value> {
    if !is_blockstats(ret) {
        return None;
    }
    let mut out = ret.clone();
    for entry in out.as_array_mut().into_iter().flatten() {
        let Some(totals) = key(entry).and_then(|k| table.get(&k)) else {
            continue;
        };
        let Some(stats) = entry.get_mut("stats").and_then(Value::as_object_mut) else {
            continue;
        };
        for (name, value) in stats.iter_mut() {
            if let (Some(base), Some(v)) = (totals.get(name), value.as_u64()) {
                *value = Value::from(v.saturating_add(*base));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(wr: u64, highest: u64) -> Value {
        json!([{
            "device": "",
            "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
            "node-name": "libvirt-1-format",
            "stats": {"wr_bytes": wr, "wr_operations": wr / 512, "wr_highest_offset": highest,
                      "idle_time_ns": 5, "account_failed": true},
            "parent": {"stats": {"wr_bytes": wr}}
        }])
    }

    #[test]
    fn counters_go_on_and_the_rest_is_left_alone() {
        let mut table = HashMap::new();
        // Generation 1 ends at 1 MiB written.
        let old = reply(1 << 20, 4096);
        for e in old.as_array().unwrap() {
            let mut totals = HashMap::new();
            for (n, v) in e["stats"].as_object().unwrap() {
                if cumulative(n) {
                    totals.insert(n.clone(), v.as_u64().unwrap());
                }
            }
            table.insert(key(e).unwrap(), totals);
        }
        // Generation 2 has written 512 bytes of its own, on a node a pivot renamed.
        let mut new = reply(512, 8192);
        new[0]["node-name"] = "libvirt-2-format".into();
        let seen = add(&new, &table).unwrap();
        assert_eq!(seen[0]["stats"]["wr_bytes"], (1 << 20) + 512);
        assert_eq!(seen[0]["stats"]["wr_operations"], 2048 + 1);
        assert_eq!(seen[0]["stats"]["wr_highest_offset"], 8192);
        assert_eq!(seen[0]["stats"]["idle_time_ns"], 5);
        assert_eq!(seen[0]["parent"]["stats"]["wr_bytes"], 512);
    }

    #[test]
    fn other_replies_are_not_touched() {
        let table = HashMap::new();
        assert!(add(&json!([{"label": "serial0", "filename": "pty"}]), &table).is_none());
        assert!(add(&json!({"status": "running"}), &table).is_none());
        assert!(add(&json!([]), &table).is_none());
    }
}
