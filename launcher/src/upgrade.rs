//! The live upgrade: the guest moves from the running QEMU into a newly started one.
//!
//! Read `Supervisor::swap` and then `Upgrade::move_guest` top to bottom: they are the whole
//! sequence, one named step a line, each step a method below them in the same order. Guest
//! RAM lives in
//! memfds the launcher owns (see [`crate::memfd`]) and every generation maps them, so with
//! `x-ignore-shared` the migration stream carries only device state: the guest pauses for
//! milliseconds and no RAM is copied. When RAM cannot be shared it travels through the same
//! pipe, with settings that let a busy guest converge.
//!
//! Until the new QEMU runs the guest, every step can be undone: a step that changes the old
//! QEMU or the proxy pushes its [`Undo`] as it does so, and a failure kills the new QEMU, then
//! undoes those in reverse order (the migration cancelled, the old QEMU's settings put back,
//! the guest resumed only if it was running). From that point on, what the guest's users see
//! moves first (consoles and monitor clients switch to the new QEMU at once), then the old
//! QEMU is killed, and whatever can wait (capabilities, thread placement, the report) comes
//! last. The guest is never on two QEMUs, because the old one is paused (by migration) before
//! the new one starts running, and never on none, because the old one is killed only once
//! the new one runs. The report's `pause` ([`timeline`]) says when each part of the guest's
//! pause happened.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fault::Phase;
use crate::generation::{GenArgs, Generation};
use crate::proxy::ProxyError;
use crate::resolve::{self, Binary, Source};
use crate::supervisor::{CallError, Supervisor, To};
use crate::threads;

mod migration;
mod replay;
mod report;
mod timeline;
mod undo;

use crate::json::JsonExt;
use migration::{capabilities, caps_arg, is_active, migration_status, ms, ram_size, SOURCE_FAILED};
use report::{Failure, Stats};
use timeline::{Mark, Timeline};
use undo::Undo;

/// How often a long migration reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// fd names the launcher gives the stream's pipe ends inside each QEMU.
const FD_OUT: &str = "qemu-liveupgrade-out";
const FD_IN: &str = "qemu-liveupgrade-in";

/// Run states a guest can be upgraded from.
const UPGRADABLE: [&str; 4] = ["running", "paused", "prelaunch", "suspended"];

/// Why an upgrade was abandoned; the guest stays on the old QEMU.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No binary to upgrade to.
    #[error("cannot find the new QEMU")]
    Resolve(#[source] resolve::ResolveError),
    /// The guest is in a state that cannot be migrated now.
    #[error("guest is {0}, not running, paused or prelaunch")]
    State(String),
    /// The first QEMU is still loading the VM's state (`-incoming`): there is nothing whole
    /// to move yet, and a swap would race the stream.
    #[error("guest is inmigrate, still loading its state from an incoming migration: upgrade it once it has loaded")]
    Loading,
    /// The new QEMU could not be started or did not answer.
    #[error("new QEMU did not start")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The VM has something QEMU cannot hand over; nothing was tried.
    #[error("cannot upgrade this VM: {0}")]
    Unsupported(String),
    /// The new QEMU lacks something the running VM needs.
    #[error("new QEMU is incompatible: {0}")]
    Incompatible(String),
    /// A monitor command of the upgrade failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: CallError,
    },
    /// The migration reported failure.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A hot-plugged device could not be added to the new QEMU.
    #[error("cannot replay hot-plugged devices: {0}")]
    Replay(String),
    /// Monitor clients could not be connected to the new QEMU.
    #[error("cannot move monitor clients: {0}")]
    Monitors(String),
    /// The new QEMU exited during the upgrade.
    #[error("new QEMU exited during the upgrade")]
    NewExited,
    /// A signal that ends the VM came before the migration started.
    #[error("the VM is ending ({0})")]
    Ending(nix::sys::signal::Signal),
}

/// The guest as the upgrade found it.
#[derive(Debug)]
struct Guest {
    /// Its run state (`query-status`), which the new QEMU must end in.
    status: String,
}

/// The migration settings an upgrade chose.
#[derive(Debug)]
struct Capabilities {
    /// Guest RAM stays where it is (`x-ignore-shared`); otherwise it travels in the stream.
    shared: bool,
    /// Capabilities turned on for the upgrade that the VM's users had off.
    added: Vec<String>,
}

/// What moving the guest leaves for the last step.
#[derive(Debug)]
struct Moved {
    capabilities: Capabilities,
    /// Where the old vCPU threads and iothreads ran.
    placement: threads::Snapshot,
}

/// An upgrade whose new QEMU is up: the generation it started (the upgrade owns it until it
/// runs the guest or is ended), the guest it is to receive, and what a failure must undo.
struct Upgrade<'s> {
    sup: &'s mut Supervisor,
    new: Generation,
    guest: Guest,
    /// Options of the user's argv the new QEMU got in another form, for the report.
    translations: Vec<Value>,
    undo: Vec<Undo>,
    /// Once monitor clients are held: when the new QEMU must run the guest, or the upgrade
    /// gives up. It bounds how long clients wait and how long the guest may stay paused.
    held_until: Option<Instant>,
    /// When each part of the guest's pause happened, for the report.
    timeline: Timeline,
}

impl Supervisor {
    /// Upgrades the VM to `to`, or to the binary resolution finds now. Returns the report,
    /// one JSON object, for the domain log and the control socket.
    pub fn upgrade(&mut self, to: Option<PathBuf>) -> Value {
        let started = Instant::now();
        let from = report::generation(&self.current);
        self.upgrading = true;
        // Until the migration starts, a signal that ends the VM ends the upgrade first.
        self.interruptible = true;
        let result = self.swap(to);
        self.interruptible = false;
        self.upgrading = false;
        let coalesced = std::mem::take(&mut self.upgrade_requests);
        let head = json!({
            "qemu-liveupgrade": "upgrade",
            "from": from,
            "machine": self.machine,
            "total_ms": ms(started.elapsed()),
            "coalesced_requests": coalesced,
        });
        report::complete(head, &self.current, result)
    }

    /// The sequence itself. Steps 1 to 3 change nothing on the old QEMU; from step 4 on every
    /// step records what a failure must undo, until the new QEMU runs the guest.
    fn swap(&mut self, to: Option<PathBuf>) -> Result<Stats, Failure> {
        // 1. The binary: resolved again, since a package upgrade replaced the file.
        let binary = match to {
            Some(path) => Binary {
                path,
                source: Source::Request,
            },
            None => resolve::resolve(&self.config.argv0).map_err(UpgradeError::Resolve)?,
        };

        self.progress("checking the guest");
        // 2. The guest's state now, which the new QEMU must end in.
        let guest = self.check_guest()?;

        self.progress("asking the new QEMU what it accepts");
        // 3. The new QEMU's argv: the user's, with the machine type pinned, translated for
        //    what the new binary accepts (asked once per binary file). An option it cannot be
        //    given in any form stops the upgrade here, before anything is started.
        let (args, translations) = self.new_args(&binary)?;

        self.progress("starting the new QEMU");
        // 4. The new QEMU, waiting for the incoming stream. A QEMU that lacks the machine type
        //    refuses to start, and the report carries its words.
        let new = self.start_new(binary, &args)?;

        let mut upgrade = Upgrade {
            sup: self,
            new,
            guest,
            translations,
            undo: Vec::new(),
            held_until: None,
            timeline: Timeline::default(),
        };
        match upgrade.move_guest() {
            Ok(moved) => Ok(upgrade.finish(moved)),
            Err(error) => Err(upgrade.roll_back(error)),
        }
    }

    /// Step 2: the guest can be moved now, and how it runs.
    fn check_guest(&mut self) -> Result<Guest, UpgradeError> {
        let status = self
            .call(To::CURRENT, "query-status", None, self.step_deadline())
            .map_err(step("query-status"))?;
        let status = status
            .at("/status")
            .as_str()
            .unwrap_or("unknown")
            .to_owned();
        if status == "inmigrate" {
            return Err(UpgradeError::Loading);
        }
        if !UPGRADABLE.contains(&status.as_str()) {
            return Err(UpgradeError::State(status));
        }
        // What QEMU cannot hand from one process to another, judged on the user's argv.
        let verdict = &self.config.base.verdict;
        if !verdict.upgradable() {
            return Err(UpgradeError::Unsupported(verdict.reasons_line()));
        }
        let migration = self
            .call(To::CURRENT, "query-migrate", None, self.step_deadline())
            .map_err(step("query-migrate"))?;
        if let Some(s) = migration.at("/status").as_str().filter(|s| is_active(s)) {
            return Err(UpgradeError::State(format!("migrating ({s})")));
        }
        // A block job (a copy, a commit, a backup) lives in the running QEMU only: the new
        // one would not have it, and its user would wait for its end for ever.
        let jobs = self
            .call(To::CURRENT, "query-jobs", None, self.step_deadline())
            .unwrap_or_default();
        let running = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| !matches!(j["status"].as_str(), Some("concluded" | "null") | None));
        if let Some(job) = running {
            return Err(UpgradeError::State(format!(
                "running block job {} ({}, {})",
                job["id"].as_str().unwrap_or("?"),
                job["type"].as_str().unwrap_or("?"),
                job["status"].as_str().unwrap_or("?")
            )));
        }
        Ok(Guest { status })
    }

    /// Step 3: the new generation's arguments, and the options of the user's argv it gets in
    /// another form. A binary that cannot be asked gets the argv untranslated, and judges it
    /// itself.
    fn new_args(&mut self, binary: &Binary) -> Result<(GenArgs, Vec<Value>), UpgradeError> {
        let target = match self.capabilities(&binary.path) {
            Ok(caps) => Some(caps),
            Err(why) => {
                let line = format!("cannot ask the new QEMU ({why}); its argv is not translated");
                self.progress(&line);
                None
            }
        };
        let block = self
            .proxy
            .journal()
            .block_argv()
            .map_err(UpgradeError::Unsupported)?;
        let args = GenArgs {
            machine: self.machine.clone(),
            incoming: true,
            target,
            block,
            ..GenArgs::default()
        };
        let translated = self
            .translated(&args)
            .map_err(|v| UpgradeError::Unsupported(v.reasons_line()))?;
        let translations = translated
            .map(|t| t.changes.iter().map(|c| c.to_json()).collect())
            .unwrap_or_default();
        Ok((args, translations))
    }

    /// Step 4: the next generation, up and answering, or ended again.
    fn start_new(&mut self, binary: Binary, args: &GenArgs) -> Result<Generation, Failure> {
        let number = self.current.number + 1;
        let deadline = Instant::now() + self.config.settings.timeouts.start;
        self.start_generation(number, binary, args, deadline)
            .map_err(|failed| Failure {
                error: Box::new(UpgradeError::Start(Box::new(failed.error))),
                said: failed.said,
                unrestored: Vec::new(),
            })
    }
}

impl Upgrade<'_> {
    /// Steps 5 to 10: everything up to the new QEMU running the guest.
    fn move_guest(&mut self) -> Result<Moved, UpgradeError> {
        self.sup.progress("moving monitor clients");
        // 5. Clients of the VM's monitors: their input is held from here on (never failed),
        //    the old QEMU answers what it already has, then each client gets a connection to
        //    the new QEMU with its capability negotiation replayed. Held first, so that no
        //    client ever sees the settings the upgrade changes, nor their undoing.
        let held = Instant::now();
        let likely_shared = self.sup.config.base.unshared.is_none();
        self.held_until = Some(held + self.switch_limit(likely_shared));
        self.hold_monitors()?;

        self.sup.progress("setting migration capabilities");
        // 6. Migration capabilities: the ones the VM's users set, plus ours, on both sides.
        let capabilities = self.set_capabilities()?;
        self.held_until = Some(held + self.switch_limit(capabilities.shared));

        // 7. Devices the VM's users hot-plugged exist only in the old QEMU: the new one gets
        //    them now, in the order they came, before any device state arrives for them.
        self.replay_hotplug()?;

        // Where libvirt placed the old vCPU threads, read while they are certainly there
        // (and recorded by the root placer too, when the launcher may not move threads).
        let old_threads = To::Current {
            beside: Some(&mut self.new),
        };
        let old_threads = thread_list(self.sup, old_threads);
        let (sup, new) = (&mut *self.sup, &mut self.new);
        let placement = threads::snapshot(&old_threads, &mut |req| {
            sup.ask_placer(Some(&mut *new), req)
        });

        self.sup.progress("migrating");
        // 8. The stream: one pipe, its read end in the new QEMU, its write end in the old.
        self.migrate()?;

        // 9. Completion, as the new QEMU sees it; the old one's failure, or either's exit.
        self.await_migration()?;

        // 10. The run state the guest had.
        self.restore_run_state()?;
        Ok(Moved {
            capabilities,
            placement,
        })
    }

    /// Step 5.
    fn hold_monitors(&mut self) -> Result<(), UpgradeError> {
        let sup = &mut *self.sup;
        sup.proxy.set_swap_running(self.guest.status == "running");
        sup.proxy.hold(sup.poll.registry());
        self.undo.push(Undo::Monitors);
        let deadline = self.deadline();
        self.wait("monitor clients to drain", deadline, |s, _| {
            s.proxy.drained()
        })
        .map_err(step("waiting for monitor replies"))?;
        let monitors = |e: ProxyError| UpgradeError::Monitors(crate::error_chain(&e));
        let sup = &mut *self.sup;
        sup.proxy
            .prepare(sup.poll.registry(), self.new.number)
            .map_err(monitors)?;
        let mut failed = None;
        self.wait("monitor clients to reconnect", deadline, |s, _| {
            match s.proxy.prepared(s.poll.registry()) {
                Ok(ready) => ready,
                Err(e) => {
                    failed = Some(e);
                    true
                }
            }
        })
        .map_err(step("moving monitor clients"))?;
        failed.map_or(Ok(()), |e| Err(monitors(e)))
    }
    /// Step 6.
    fn set_capabilities(&mut self) -> Result<Capabilities, UpgradeError> {
        let old_caps = capabilities(
            &self
                .ask_old("query-migrate-capabilities", None)
                .map_err(step("query-migrate-capabilities"))?,
        );
        let new_caps = capabilities(
            &self
                .ask_new("query-migrate-capabilities", None)
                .map_err(step("query-migrate-capabilities"))?,
        );
        let knows = |caps: &[(String, bool)], name: &str| caps.iter().any(|(c, _)| c == name);
        let shared = self.sup.config.base.unshared.is_none()
            && knows(&old_caps, "x-ignore-shared")
            && knows(&new_caps, "x-ignore-shared");
        let mut wanted: Vec<String> = old_caps
            .iter()
            .filter(|(_, on)| *on)
            .map(|(c, _)| c.clone())
            .collect();
        wanted.push("events".into());
        wanted.push(
            if shared {
                "x-ignore-shared"
            } else {
                "auto-converge"
            }
            .into(),
        );
        wanted.sort();
        wanted.dedup();
        if let Some(missing) = wanted.iter().find(|c| !knows(&new_caps, c)) {
            return Err(UpgradeError::Incompatible(format!(
                "no migration capability {missing}"
            )));
        }
        let added: Vec<String> = wanted
            .iter()
            .filter(|c| !old_caps.iter().any(|(n, on)| n == *c && *on))
            .cloned()
            .collect();
        self.ask_new("migrate-set-capabilities", Some(caps_arg(&wanted, true)))
            .map_err(step("migrate-set-capabilities on the new QEMU"))?;
        self.ask_old("migrate-set-capabilities", Some(caps_arg(&added, true)))
            .map_err(step("migrate-set-capabilities on the old QEMU"))?;
        self.undo.push(Undo::Capabilities(added.clone()));
        if !shared {
            // RAM crosses in the stream: no bandwidth cap (7.2 defaults to 32 MiB/s, at
            // which a busy guest never converges), QEMU's default downtime target.
            let before = self
                .ask_old("query-migrate-parameters", None)
                .map_err(step("query-migrate-parameters"))?;
            self.undo.push(Undo::Parameters(json!({
                "max-bandwidth": before.at("/max-bandwidth"),
                "downtime-limit": before.at("/downtime-limit"),
            })));
            let params = json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 300 });
            self.ask_old("migrate-set-parameters", Some(params))
                .map_err(step("migrate-set-parameters"))?;
        }
        Ok(Capabilities { shared, added })
    }

    /// Step 7: the hot-plug journal replayed into the new QEMU.
    fn replay_hotplug(&mut self) -> Result<(), UpgradeError> {
        self.sup.replay_hotplug(&mut self.new, self.held_until)
    }

    /// Step 8: the stream's pipe handed out, and the migration started.
    fn migrate(&mut self) -> Result<(), UpgradeError> {
        if let Some(sig) = self.sup.ending_signal() {
            return Err(UpgradeError::Ending(sig));
        }
        let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| step("pipe")(CallError::Poll(e.into())))?;
        // A larger pipe lets streamed RAM move in bigger batches; best effort.
        let _ = nix::fcntl::fcntl(
            pipe_w.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
        );
        self.ask_new_fd(
            "getfd",
            Some(json!({"fdname": FD_IN})),
            Some(pipe_r.as_fd()),
        )
        .map_err(step("getfd on the new QEMU"))?;
        self.sup.strike(Phase::StreamIn, Some(self.new.pid));
        self.ask_new(
            "migrate-incoming",
            Some(json!({"uri": format!("fd:{FD_IN}")})),
        )
        .map_err(step("migrate-incoming"))?;
        self.ask_old_fd(
            "getfd",
            Some(json!({"fdname": FD_OUT})),
            Some(pipe_w.as_fd()),
        )
        .map_err(step("getfd on the old QEMU"))?;
        self.undo.push(Undo::OutFd);
        self.sup.strike(Phase::StreamOut, Some(self.new.pid));
        drop((pipe_r, pipe_w));
        self.undo.push(Undo::Migration);
        // Whatever comes of it, QEMU will remember this migration: clients are not to see it.
        crate::proxy::hide_migration_state(true);
        // The migration finishes or is cancelled now, whatever comes meanwhile.
        self.sup.interruptible = false;
        // From here the old QEMU stops the guest and the new one sets up the taps for it.
        if let Some(guard) = self.new.tap_guard.as_mut() {
            guard.live = true;
        }
        self.timeline.mark(Mark::Migrate);
        self.ask_old("migrate", Some(json!({"uri": format!("fd:{FD_OUT}")})))
            .map_err(step("migrate"))?;
        // `migrate` took the fd.
        self.undo.retain(|u| !matches!(u, Undo::OutFd));
        self.sup.strike(Phase::Migrating, Some(self.new.pid));
        Ok(())
    }

    /// Step 9: waits for the migration to end, telling waiting control clients how far it
    /// got every half second (when RAM is streamed this takes seconds).
    fn await_migration(&mut self) -> Result<(), UpgradeError> {
        let mut outcome: Option<Result<(), String>> = None;
        let until = self.deadline();
        let mut timeline = std::mem::take(&mut self.timeline);
        loop {
            let tick = until.min(Instant::now() + PROGRESS_EVERY);
            let waited = self.wait("migration", tick, |s, new| {
                for e in new.qmp.take_events() {
                    timeline.new_event(&e);
                    match migration_status(&e) {
                        Some("completed") => outcome = Some(Ok(())),
                        Some(st) if SOURCE_FAILED.contains(&st) => {
                            outcome = Some(Err(format!("new QEMU reports {st}")))
                        }
                        _ => {}
                    }
                }
                for e in s.current.qmp.take_events() {
                    timeline.old_event(&e);
                    if let Some(st) = migration_status(&e).filter(|st| SOURCE_FAILED.contains(st)) {
                        outcome = Some(Err(format!("old QEMU reports {st}")));
                    }
                }
                if new.exit.is_some() {
                    outcome = Some(Err("new QEMU exited".into()));
                }
                outcome.is_some() || s.has_exited()
            });
            match waited {
                Ok(()) => break,
                Err(CallError::Timeout(_)) if Instant::now() < until => self.report_progress(),
                Err(e) => {
                    self.timeline = timeline;
                    return Err(step("waiting for the migration")(e));
                }
            }
        }
        timeline.mark(Mark::Seen);
        self.timeline = timeline;
        if let Some(Err(reason)) = outcome {
            return Err(UpgradeError::Migration(reason));
        }
        if self.sup.has_exited() {
            return Err(UpgradeError::Migration("old QEMU exited".into()));
        }
        Ok(())
    }

    /// Step 10: the new QEMU in the run state the guest had. QEMU sets an incoming guest's run
    /// state before it reports completion (`process_incoming_migration_bh`, 7.2 and 10.0:
    /// `vm_start` and its RESUME, or the source's state, then MIGRATION `completed`), so the
    /// events read by then tell: a destination started with -S (libvirt's way) stays paused
    /// even when the source ran, and gets `cont` at once.
    fn restore_run_state(&mut self) -> Result<(), UpgradeError> {
        if self.guest.status != "running" || self.timeline.resumed() {
            return Ok(());
        }
        self.timeline.mark(Mark::Cont);
        self.ask_new("cont", None)
            .map_err(step("cont on the new QEMU"))?;
        // Its RESUME came before the answer.
        for e in self.new.qmp.take_events() {
            self.timeline.new_event(&e);
        }
        Ok(())
    }

    /// Steps 11 to 13, once the new QEMU runs the guest: there is no way back, and what the
    /// guest's users see goes first.
    fn finish(self, moved: Moved) -> Stats {
        let Upgrade {
            sup,
            new,
            translations,
            mut timeline,
            ..
        } = self;
        // The old QEMU's disk counters, final since the guest stopped there, go on in the new
        // one's, before any client can ask for them.
        let counters = sup.call(To::CURRENT, "query-blockstats", None, sup.step_deadline());
        if let Ok(counters) = counters {
            crate::blockstats::carry(&counters);
        }
        // 11. Consoles and monitor clients continue on the new QEMU, their held input first.
        let number = new.number;
        let mut old = sup.promote(new);
        sup.proxy.commit(sup.poll.registry(), number);
        timeline.mark(Mark::Switched);

        sup.progress("quitting the old QEMU");
        // 12. The old QEMU's figures, then it goes, by SIGKILL: a `quit` would let it run its
        //     main loop a few milliseconds more, polling the taps it shares with the new one.
        let mut stats = Stats {
            shared: moved.capabilities.shared,
            translations,
            ..Stats::default()
        };
        let info = sup.call(
            To::Beside(&mut old),
            "query-migrate",
            None,
            sup.step_deadline(),
        );
        if let Ok(info) = info {
            stats.downtime_ms = info.at("/downtime").as_u64();
            stats.ram_bytes = info.at("/ram/transferred").as_u64();
        }
        // Its STOP and completion may have come after the new QEMU's completion was seen.
        for e in old.qmp.take_events() {
            timeline.old_event(&e);
        }
        sup.retire(old);
        timeline.mark(Mark::OldKilled);

        // 13. The new QEMU's capabilities back to what the VM's users had, its threads where
        //     libvirt placed the old ones, and the host forwards the old QEMU held, free once
        //     it is reaped.
        let caps = Some(caps_arg(&moved.capabilities.added, false));
        let _ = sup.call(
            To::CURRENT,
            "migrate-set-capabilities",
            caps,
            sup.step_deadline(),
        );
        stats.tap_ioctls_held = sup.current.tap_guard.as_ref().map(|g| g.suppressed);
        let new_threads = thread_list(sup, To::CURRENT);
        stats.threads = threads::apply(&moved.placement, &new_threads, &mut |req| {
            sup.ask_placer(None, req)
        });
        let step = sup.config.settings.timeouts.step;
        sup.reap_ended(Instant::now() + step);
        if sup.ending_is_empty() {
            timeline.mark(Mark::OldReaped);
        }
        stats.hostfwd = sup.restore_forwards();
        let (console, monitor) = sup.proxy.first_relayed();
        let console = [console, sup.ptys.first_output()]
            .into_iter()
            .flatten()
            .min();
        timeline.relayed(console, monitor);
        stats.pause = timeline.to_json();
        stats
    }

    /// Puts the old QEMU back exactly as it was: new QEMU gone, then every step undone in
    /// reverse order, the guest running again only if it was running before.
    fn roll_back(self, error: UpgradeError) -> Failure {
        let Upgrade {
            sup,
            new,
            guest,
            undo,
            ..
        } = self;
        // The rollback runs to its end, whatever signal came.
        sup.interruptible = false;
        let said = sup.end_generation(new);
        let mut unrestored = Vec::new();
        for step in undo.into_iter().rev() {
            if let Err(problem) = sup.undo(step, &guest) {
                unrestored.push(problem);
            }
        }
        let _ = sup.current.qmp.take_events();
        Failure {
            error: Box::new(error),
            said,
            unrestored,
        }
    }

    /// Serves the loop, the new QEMU included, until `done` holds or `deadline`.
    fn wait(
        &mut self,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&mut Supervisor, &mut Generation) -> bool,
    ) -> Result<(), CallError> {
        while !done(self.sup, &mut self.new) {
            self.sup.serve(Some(&mut self.new), Some(deadline), what)?;
        }
        Ok(())
    }

    /// The deadline of one command or wait sent now: a step's time, and never past the
    /// moment the held clients are released.
    fn deadline(&self) -> Instant {
        let step = Instant::now() + self.sup.config.settings.timeouts.step;
        self.held_until.map_or(step, |held| held.min(step))
    }

    /// How long clients may be held and the guest paused: device state only crosses when RAM
    /// is shared; RAM streamed adds time per GiB.
    fn switch_limit(&self, shared: bool) -> Duration {
        let t = &self.sup.config.settings.timeouts;
        if shared {
            return t.migration;
        }
        let gib = u32::try_from(ram_size(&self.sup.config) >> 30).unwrap_or(u32::MAX);
        t.migration
            .saturating_add(t.per_gib.saturating_mul(gib.saturating_add(1)))
    }

    /// A command to the old QEMU, the new one served meanwhile.
    fn ask_old(&mut self, command: &str, args: Option<Value>) -> Result<Value, CallError> {
        self.ask_old_fd(command, args, None)
    }

    fn ask_old_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, CallError> {
        let deadline = Some(self.deadline());
        let to = To::Current {
            beside: Some(&mut self.new),
        };
        self.sup.call_with_fd(to, command, args, fd, deadline)
    }

    /// A command to the new QEMU.
    fn ask_new(&mut self, command: &str, args: Option<Value>) -> Result<Value, CallError> {
        self.ask_new_fd(command, args, None)
    }

    fn ask_new_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, CallError> {
        let deadline = Some(self.deadline());
        let to = To::Beside(&mut self.new);
        self.sup.call_with_fd(to, command, args, fd, deadline)
    }

    /// Sends waiting control clients the old QEMU's migration figures.
    fn report_progress(&mut self) {
        if let Ok(info) = self.ask_old("query-migrate", None) {
            let ram = info.at("/ram");
            let line = format!(
                "migrating: {} of {} MiB sent, {} MiB left",
                ram.at("/transferred").as_u64().unwrap_or(0) >> 20,
                ram.at("/total").as_u64().unwrap_or(0) >> 20,
                ram.at("/remaining").as_u64().unwrap_or(0) >> 20,
            );
            self.sup.progress(&line);
        }
    }
}

/// A generation's vCPU and iothread ids, for [`threads::snapshot`] and [`threads::apply`].
fn thread_list(sup: &mut Supervisor, mut to: To<'_>) -> Vec<(String, i32)> {
    let cpus = sup
        .call(to.reborrow(), "query-cpus-fast", None, sup.step_deadline())
        .unwrap_or_default();
    let io = sup
        .call(to.reborrow(), "query-iothreads", None, sup.step_deadline())
        .unwrap_or_default();
    threads::threads(&cpus, &io)
}

/// The error for a monitor command of step `step` that failed.
fn step(step: &'static str) -> impl Fn(CallError) -> UpgradeError {
    move |source| UpgradeError::Step { step, source }
}
