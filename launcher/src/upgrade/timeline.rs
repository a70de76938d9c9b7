//! The swap's timeline: when each part of the guest's pause happened, for the report's
//! `pause` breakdown, in microseconds after `migrate` was issued.
//!
//! The launcher's own moments are read from CLOCK_MONOTONIC. QEMU's come from its events,
//! which it stamps with the wall clock when it emits them (`timestamp`, `g_get_real_time()` in
//! `qapi/qmp-event.c`), not when the launcher gets around to reading them: they are moved onto
//! CLOCK_MONOTONIC through the offset between the two clocks, read once per report. The report
//! also gives `migrate` itself on CLOCK_MONOTONIC (`migrate_monotonic_us`), the clock every
//! process on the host shares, so that a benchmark can put its own observations (the guest's
//! heartbeats) on the same line.

use std::time::Instant;

use nix::time::{clock_gettime, ClockId};
use serde_json::{json, Map, Value};

use super::migration::migration_status;

/// Moments of one swap, in microseconds on CLOCK_MONOTONIC.
#[derive(Debug, Default)]
pub(super) struct Timeline {
    /// `migrate` sent to the old QEMU.
    migrate: Option<i64>,
    /// The old QEMU stopped the guest (its STOP).
    old_stop: Option<i64>,
    /// The old QEMU wrote the stream's last byte (its MIGRATION `completed`).
    stream_end: Option<i64>,
    /// The new QEMU loaded the state and set the run state (its MIGRATION `completed`).
    loaded: Option<i64>,
    /// The new QEMU runs the guest (its RESUME).
    resume: Option<i64>,
    /// The launcher read the new QEMU's completion.
    seen: Option<i64>,
    /// `cont` sent to a new QEMU that stayed paused (`-S`).
    cont: Option<i64>,
    /// Consoles and monitor clients switched to the new QEMU.
    switched: Option<i64>,
    /// The first console byte relayed from the new QEMU.
    console: Option<i64>,
    /// The first monitor reply relayed from the new QEMU.
    monitor: Option<i64>,
    /// The old QEMU killed.
    old_killed: Option<i64>,
    /// The old QEMU reaped: its exit (unmapping guest RAM, closing its fds) is over.
    old_reaped: Option<i64>,
}

/// A launcher moment: the steps it can mark.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mark {
    Migrate,
    Seen,
    Cont,
    Switched,
    OldKilled,
    OldReaped,
}

impl Timeline {
    /// Records a launcher moment, now.
    pub(super) fn mark(&mut self, mark: Mark) {
        let slot = match mark {
            Mark::Migrate => &mut self.migrate,
            Mark::Seen => &mut self.seen,
            Mark::Cont => &mut self.cont,
            Mark::Switched => &mut self.switched,
            Mark::OldKilled => &mut self.old_killed,
            Mark::OldReaped => &mut self.old_reaped,
        };
        slot.get_or_insert(monotonic_us(ClockId::CLOCK_MONOTONIC));
    }

    /// Records what an event of the old QEMU marks, once `migrate` was sent.
    pub(super) fn old_event(&mut self, event: &Value) {
        if self.migrate.is_none() {
            return;
        }
        if event["event"] == "STOP" {
            set_once(&mut self.old_stop, event);
        } else if migration_status(event) == Some("completed") {
            set_once(&mut self.stream_end, event);
        }
    }

    /// Records what an event of the new QEMU marks.
    pub(super) fn new_event(&mut self, event: &Value) {
        if event["event"] == "RESUME" {
            set_once(&mut self.resume, event);
        } else if migration_status(event) == Some("completed") {
            set_once(&mut self.loaded, event);
        }
    }

    /// Whether the new QEMU said it runs the guest.
    pub(super) fn resumed(&self) -> bool {
        self.resume.is_some()
    }

    /// Records when the proxy and the pty relay first passed on what the new QEMU said.
    pub(super) fn relayed(&mut self, console: Option<Instant>, monitor: Option<Instant>) {
        self.console = self.console.or(console.map(instant_us));
        self.monitor = self.monitor.or(monitor.map(instant_us));
    }

    /// The `pause` object of the report: every moment relative to `migrate`, null when it did
    /// not happen (or nothing was there to relay), and `migrate` itself on CLOCK_MONOTONIC.
    pub(super) fn to_json(&self) -> Value {
        let Some(origin) = self.migrate else {
            return Value::Null;
        };
        let mut out = Map::new();
        out.insert("migrate_monotonic_us".into(), json!(origin));
        for (name, at) in [
            ("old_stop", self.old_stop),
            ("stream_end", self.stream_end),
            ("loaded", self.loaded),
            ("resume", self.resume),
            ("seen", self.seen),
            ("cont", self.cont),
            ("switched", self.switched),
            ("console_first_byte", self.console),
            ("monitor_first_reply", self.monitor),
            ("old_killed", self.old_killed),
            ("old_reaped", self.old_reaped),
        ] {
            out.insert(format!("{name}_us"), json!(at.map(|t| t - origin)));
        }
        // The guest's own pause as QEMU reports it: from the old QEMU's STOP to the new one's
        // RESUME.
        let stopped = self.resume.zip(self.old_stop).map(|(r, s)| r - s);
        out.insert("guest_stopped_us".into(), json!(stopped));
        Value::Object(out)
    }
}

/// Sets `slot` to `event`'s own time, unless it is set already.
fn set_once(slot: &mut Option<i64>, event: &Value) {
    if slot.is_none() {
        *slot = Some(event_us(event).unwrap_or_else(|| monotonic_us(ClockId::CLOCK_MONOTONIC)));
    }
}

/// When QEMU emitted `event`, on CLOCK_MONOTONIC.
fn event_us(event: &Value) -> Option<i64> {
    let stamp = &event["timestamp"];
    let wall = stamp["seconds"].as_i64()? * 1_000_000 + stamp["microseconds"].as_i64()?;
    let mono = monotonic_us(ClockId::CLOCK_MONOTONIC);
    let real = monotonic_us(ClockId::CLOCK_REALTIME);
    Some(wall - (real - mono))
}

/// `t` on CLOCK_MONOTONIC, which is what `Instant` reads on Linux.
fn instant_us(t: Instant) -> i64 {
    let ago = i64::try_from(t.elapsed().as_micros()).unwrap_or(i64::MAX);
    monotonic_us(ClockId::CLOCK_MONOTONIC).saturating_sub(ago)
}

/// `clock` now, in microseconds; 0 if it cannot be read (it always can on Linux).
fn monotonic_us(clock: ClockId) -> i64 {
    clock_gettime(clock).map_or(0, |t| t.tv_sec() * 1_000_000 + t.tv_nsec() / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(event: &str, data: Value, at_us: i64) -> Value {
        let real = monotonic_us(ClockId::CLOCK_REALTIME);
        let mono = monotonic_us(ClockId::CLOCK_MONOTONIC);
        let wall = at_us + (real - mono);
        json!({"event": event, "data": data,
               "timestamp": {"seconds": wall / 1_000_000, "microseconds": wall % 1_000_000}})
    }

    #[test]
    fn events_land_on_the_monotonic_clock_relative_to_migrate() {
        let mut t = Timeline::default();
        let before = stamped("STOP", json!({}), monotonic_us(ClockId::CLOCK_MONOTONIC));
        t.old_event(&before);
        t.mark(Mark::Migrate);
        let origin = t.migrate.unwrap();
        t.old_event(&stamped("STOP", json!({}), origin + 800));
        t.old_event(&stamped(
            "MIGRATION",
            json!({"status": "completed"}),
            origin + 1900,
        ));
        t.new_event(&stamped("RESUME", json!({}), origin + 2500));
        t.new_event(&stamped(
            "MIGRATION",
            json!({"status": "completed"}),
            origin + 2600,
        ));
        t.new_event(&stamped("RESUME", json!({}), origin + 9000));
        let j = t.to_json();
        let near = |key: &str, want: i64| {
            let got = j[key]
                .as_i64()
                .unwrap_or_else(|| panic!("{key} missing: {j}"));
            // The two clocks are read a few microseconds apart.
            assert!((got - want).abs() < 1000, "{key}: {got}, want {want}");
        };
        near("old_stop_us", 800);
        near("stream_end_us", 1900);
        near("resume_us", 2500);
        near("loaded_us", 2600);
        let stopped = j["guest_stopped_us"].as_i64().unwrap();
        assert!((stopped - 1700).abs() < 50, "{stopped}");
        assert_eq!(j["migrate_monotonic_us"], origin);
        assert!(j["cont_us"].is_null() && j["console_first_byte_us"].is_null());
        assert!(t.resumed());
    }

    #[test]
    fn nothing_is_reported_before_migrate() {
        let mut t = Timeline::default();
        t.new_event(&stamped("RESUME", json!({}), 5));
        assert_eq!(t.to_json(), Value::Null);
    }
}
