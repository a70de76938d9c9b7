//! The live upgrade: the guest moves from the running QEMU into a newly started one.
//!
//! Read [`Supervisor::upgrade`] top to bottom; it is the whole sequence. Guest RAM lives in
//! memfds the launcher owns (see [`crate::memfd`]) and every generation maps them, so with
//! `x-ignore-shared` the migration stream carries only device state: the guest pauses for
//! milliseconds and no RAM is copied. When RAM cannot be shared it travels through the same
//! pipe, with settings that let a busy guest converge.
//!
//! Until the new QEMU runs the guest, every step can be undone: a failure kills the new QEMU,
//! cancels the migration, puts the old QEMU's migration settings back and resumes it only if
//! it was running. After that point the old QEMU is killed. The guest is never on two QEMUs,
//! because the old one is paused (by migration) before the new one starts running, and never
//! on none, because the old one is killed only once the new one runs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::generation::GenArgs;
use crate::resolve::{self, Binary, Source};
use crate::supervisor::{CallError, Supervisor, Which};
use crate::threads;

/// Time a new QEMU gets to start and answer its monitor, unless
/// `QEMU_LIVEUPGRADE_START_TIMEOUT` (seconds) says otherwise.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time any single monitor command gets.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a migration of device state only gets.
const SHARED_MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Added per GiB of guest RAM when RAM travels in the stream.
const STREAMED_TIMEOUT_PER_GIB: Duration = Duration::from_secs(30);

/// How often a long migration reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// fd names the launcher gives the stream's pipe ends inside each QEMU.
const FD_OUT: &str = "qemu-liveupgrade-out";
const FD_IN: &str = "qemu-liveupgrade-in";

/// Migration states of the source that mean it is over and did not succeed.
const SOURCE_FAILED: [&str; 2] = ["failed", "cancelled"];
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
}

/// What the rollback has to undo, filled in as the sequence advances.
#[derive(Debug, Default)]
struct Undo {
    /// Capabilities changed on the old QEMU, with their previous state.
    capabilities: Vec<(String, bool)>,
    /// Migration parameters changed on the old QEMU, with their previous values.
    parameters: Option<Value>,
    /// The stream's write end was handed to the old QEMU and not yet consumed by `migrate`.
    out_fd_named: bool,
    /// `migrate` was issued.
    migrating: bool,
    /// Monitor clients' input is held for the swap.
    held: bool,
    /// The old QEMU's run state before the upgrade.
    old_status: Option<String>,
}

/// What a successful swap measured.
#[derive(Debug, Default)]
struct Stats {
    downtime_ms: Option<u64>,
    ram_bytes: Option<u64>,
    shared: bool,
    threads: Value,
    /// Tap ioctls the new QEMU made while the old one ran the guest, answered without effect.
    tap_ioctls_held: Option<u32>,
    /// Options of the user's argv the new QEMU got in another form.
    translations: Vec<Value>,
}

impl Supervisor {
    /// Upgrades the VM to `to`, or to the binary resolution finds now. Returns the report,
    /// one JSON object, for the domain log and the control socket.
    pub fn upgrade(&mut self, to: Option<PathBuf>) -> Value {
        let started = Instant::now();
        let from = json!({
            "version": self.current.version_string(),
            "binary": self.current.binary.path.to_string_lossy(),
            "generation": self.current.number,
        });
        let mut undo = Undo::default();
        self.upgrading = true;
        let result = self.swap(to, &mut undo);
        let mut said = None;
        let mut unrestored = Vec::new();
        if result.is_err() {
            unrestored = self.roll_back(&undo);
            // The new QEMU's own explanation, if it gave one on stderr before it was killed.
            said = self.last_stderr_line(self.current.number + 1);
        }
        self.upgrading = false;
        let coalesced = std::mem::take(&mut self.upgrade_requests);
        let mut report = json!({
            "qemu-liveupgrade": "upgrade",
            "from": from,
            "machine": self.machine,
            "total_ms": ms(started.elapsed()),
            "coalesced_requests": coalesced,
        });
        match result {
            Ok(stats) => {
                report["result"] = "ok".into();
                report["to"] = json!({
                    "version": self.current.version_string(),
                    "binary": self.current.binary.path.to_string_lossy(),
                    "generation": self.current.number,
                });
                report["ram"] = if stats.shared { "shared" } else { "streamed" }.into();
                report["downtime_ms"] = json!(stats.downtime_ms);
                report["ram_bytes"] = json!(stats.ram_bytes);
                report["threads"] = stats.threads;
                report["tap_ioctls_held"] = json!(stats.tap_ioctls_held);
                report["translations"] = json!(stats.translations);
            }
            Err(e) => {
                report["result"] = "failed".into();
                let mut reason = crate::error_chain(&e);
                if let Some(line) = said {
                    reason.push_str(&format!(" (new QEMU: {line})"));
                }
                report["reason"] = reason.into();
                if !unrestored.is_empty() {
                    report["rollback_problems"] = json!(unrestored);
                }
                report["generation"] = self.current.number.into();
            }
        }
        report
    }

    /// The sequence itself. Every step records in `undo` what a failure must reverse.
    fn swap(&mut self, to: Option<PathBuf>, undo: &mut Undo) -> Result<Stats, UpgradeError> {
        let step = |step| move |source| UpgradeError::Step { step, source };
        let deadline = || Some(Instant::now() + STEP_TIMEOUT);

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
        let status = self
            .call(Which::Current, "query-status", None, deadline())
            .map_err(step("query-status"))?;
        let old_status = status["status"].as_str().unwrap_or("unknown").to_owned();
        if !UPGRADABLE.contains(&old_status.as_str()) {
            return Err(UpgradeError::State(old_status));
        }
        undo.old_status = Some(old_status.clone());
        // What QEMU cannot hand from one process to another, judged on the user's argv.
        let verdict = &self.config.base.verdict;
        if !verdict.upgradable() {
            return Err(UpgradeError::Unsupported(verdict.reasons_line()));
        }
        let migration = self
            .call(Which::Current, "query-migrate", None, deadline())
            .map_err(step("query-migrate"))?;
        if let Some(s) = migration["status"].as_str().filter(|s| is_active(s)) {
            return Err(UpgradeError::State(format!("migrating ({s})")));
        }

        self.progress("asking the new QEMU what it accepts");
        // 3. The new QEMU's argv: the user's, with the machine type pinned, translated for
        //    what the new binary accepts (asked once per binary file). An option it cannot be
        //    given in any form stops the upgrade here, before anything is started. A binary
        //    that cannot be asked gets the argv untranslated, and judges it itself.
        let target = match self.capabilities(&binary.path) {
            Ok(caps) => Some(caps),
            Err(why) => {
                self.progress(&format!("cannot ask the new QEMU ({why}); its argv is not translated"));
                None
            }
        };
        let args = GenArgs {
            machine: self.machine.clone(),
            incoming: true,
            target,
        };
        let translated = self
            .translated(&args)
            .map_err(|v| UpgradeError::Unsupported(v.reasons_line()))?;
        let translations = translated
            .map(|t| t.changes.iter().map(|c| c.to_json()).collect())
            .unwrap_or_default();

        self.progress("starting the new QEMU");
        // 4. The new QEMU, waiting for the incoming stream. A QEMU that lacks the machine type
        //    refuses to start, and the report carries its words.
        let number = self.current.number + 1;
        let gen = self
            .spawn_generation(number, binary, &args)
            .map_err(|e| UpgradeError::Start(Box::new(e)))?;
        self.incoming = Some(gen);
        self.incoming_exit = None;
        self.handshake(Which::Incoming, Some(Instant::now() + start_timeout()))
            .map_err(|e| UpgradeError::Start(Box::new(e)))?;

        self.progress("setting migration capabilities");
        // 5. Migration capabilities: the ones the VM's users set, plus ours, on both sides.
        let old_caps = capabilities(
            &self
                .call(
                    Which::Current,
                    "query-migrate-capabilities",
                    None,
                    deadline(),
                )
                .map_err(step("query-migrate-capabilities"))?,
        );
        let new_caps = capabilities(
            &self
                .call(
                    Which::Incoming,
                    "query-migrate-capabilities",
                    None,
                    deadline(),
                )
                .map_err(step("query-migrate-capabilities"))?,
        );
        let knows = |caps: &[(String, bool)], name: &str| caps.iter().any(|(c, _)| c == name);
        let shared = self.config.base.unshared.is_none()
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
        let on_old: Vec<String> = wanted
            .iter()
            .filter(|c| !old_caps.iter().any(|(n, on)| n == *c && *on))
            .cloned()
            .collect();
        self.call(
            Which::Incoming,
            "migrate-set-capabilities",
            Some(caps_arg(&wanted, true)),
            deadline(),
        )
        .map_err(step("migrate-set-capabilities on the new QEMU"))?;
        self.call(
            Which::Current,
            "migrate-set-capabilities",
            Some(caps_arg(&on_old, true)),
            deadline(),
        )
        .map_err(step("migrate-set-capabilities on the old QEMU"))?;
        undo.capabilities = on_old.iter().map(|c| (c.clone(), false)).collect();
        if !shared {
            // RAM crosses in the stream: no bandwidth cap (7.2 defaults to 32 MiB/s, at
            // which a busy guest never converges), QEMU's default downtime target.
            let before = self
                .call(Which::Current, "query-migrate-parameters", None, deadline())
                .map_err(step("query-migrate-parameters"))?;
            undo.parameters = Some(json!({
                "max-bandwidth": before["max-bandwidth"],
                "downtime-limit": before["downtime-limit"],
            }));
            let params = json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 300 });
            self.call(
                Which::Current,
                "migrate-set-parameters",
                Some(params),
                deadline(),
            )
            .map_err(step("migrate-set-parameters"))?;
        }

        // 6. Clients of the VM's monitors: their input is held from here on (never failed),
        //    the old QEMU answers what it already has, then each client gets a connection to
        //    the new QEMU with its capability negotiation replayed.
        self.progress("moving monitor clients");
        self.proxy.set_swap_running(old_status == "running");
        self.proxy.hold(self.poll.registry());
        undo.held = true;
        self.wait_until(
            "monitor clients to drain",
            Instant::now() + STEP_TIMEOUT,
            |s| s.proxy.drained(),
        )
        .map_err(step("waiting for monitor replies"))?;
        let prepared =
            self.proxy
                .prepare(self.poll.registry(), number, Instant::now() + STEP_TIMEOUT);
        prepared.map_err(|e| UpgradeError::Monitors(crate::error_chain(&e)))?;

        // 7. Devices the VM's users hot-plugged exist only in the old QEMU: the new one gets
        //    them now, in the order they came, before any device state arrives for them.
        self.replay_hotplug()?;

        // Where libvirt placed the old vCPU threads, read while they are certainly there.
        let old_placement = threads::snapshot(&self.thread_list(Which::Current));

        self.progress("migrating");
        // 8. The stream: one pipe, its read end in the new QEMU, its write end in the old.
        let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| step("pipe")(CallError::Poll(e.into())))?;
        // A larger pipe lets streamed RAM move in bigger batches; best effort.
        let _ = nix::fcntl::fcntl(
            pipe_w.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
        );
        self.call_with_fd(
            Which::Incoming,
            "getfd",
            Some(json!({"fdname": FD_IN})),
            Some(pipe_r.as_fd()),
            deadline(),
        )
        .map_err(step("getfd on the new QEMU"))?;
        self.call(
            Which::Incoming,
            "migrate-incoming",
            Some(json!({"uri": format!("fd:{FD_IN}")})),
            deadline(),
        )
        .map_err(step("migrate-incoming"))?;
        self.call_with_fd(
            Which::Current,
            "getfd",
            Some(json!({"fdname": FD_OUT})),
            Some(pipe_w.as_fd()),
            deadline(),
        )
        .map_err(step("getfd on the old QEMU"))?;
        undo.out_fd_named = true;
        drop((pipe_r, pipe_w));
        undo.migrating = true;
        // From here the old QEMU stops the guest and the new one sets up the taps for it.
        if let Some(guard) = self.gen_mut(Which::Incoming).tap_guard.as_mut() {
            guard.live = true;
        }
        self.call(
            Which::Current,
            "migrate",
            Some(json!({"uri": format!("fd:{FD_OUT}")})),
            deadline(),
        )
        .map_err(step("migrate"))?;
        undo.out_fd_named = false;

        // 9. Completion, as the new QEMU sees it; the old one's failure, or either's exit.
        let ram_size: u64 = self.ram_size();
        let limit = if shared {
            SHARED_MIGRATION_TIMEOUT
        } else {
            SHARED_MIGRATION_TIMEOUT + STREAMED_TIMEOUT_PER_GIB * (1 + (ram_size >> 30) as u32)
        };
        let mut outcome: Option<Result<(), String>> = None;
        let until = Instant::now() + limit;
        loop {
            // When RAM is streamed this takes seconds: every half second, tell waiting control
            // clients how far it got.
            let tick = until.min(Instant::now() + PROGRESS_EVERY);
            let waited = self.wait_until("migration", tick, |s| {
                for e in s.gen_mut(Which::Incoming).qmp.take_events() {
                    match migration_status(&e) {
                        Some("completed") => outcome = Some(Ok(())),
                        Some(st) if SOURCE_FAILED.contains(&st) => {
                            outcome = Some(Err(format!("new QEMU reports {st}")))
                        }
                        _ => {}
                    }
                }
                for e in s.current.qmp.take_events() {
                    if let Some(st) = migration_status(&e).filter(|st| SOURCE_FAILED.contains(st)) {
                        outcome = Some(Err(format!("old QEMU reports {st}")));
                    }
                }
                if s.incoming_exit.is_some() {
                    outcome = Some(Err("new QEMU exited".into()));
                }
                outcome.is_some() || s.has_exited()
            });
            match waited {
                Ok(()) => break,
                Err(CallError::Timeout(_)) if Instant::now() < until => self.report_progress(),
                Err(e) => return Err(step("waiting for the migration")(e)),
            }
        }
        if let Some(Err(reason)) = outcome {
            return Err(UpgradeError::Migration(reason));
        }
        if self.has_exited() {
            return Err(UpgradeError::Migration("old QEMU exited".into()));
        }

        // 10. The run state the guest had. A destination started with -S (libvirt's way)
        //    stays paused after migration even when the source ran; QEMU autostarts it
        //    otherwise, a few moments after reporting completion.
        let mut status = String::from("inmigrate");
        let settle = Instant::now() + STEP_TIMEOUT;
        while status == "inmigrate" {
            let st = self
                .call(Which::Incoming, "query-status", None, Some(settle))
                .map_err(step("query-status on the new QEMU"))?;
            status = st["status"].as_str().unwrap_or("unknown").to_owned();
            if status == "inmigrate" {
                let _ =
                    self.wait_until("settle", Instant::now() + Duration::from_millis(1), |_| {
                        false
                    });
            }
        }
        if old_status == "running" && status != "running" {
            self.call(Which::Incoming, "cont", None, deadline())
                .map_err(step("cont on the new QEMU"))?;
        }
        // From here the new QEMU runs the guest: there is no way back.

        self.progress("quitting the old QEMU");
        // 11. The old QEMU's figures, then it goes at once, by SIGKILL: its guest runs
        //     elsewhere now, and anything it still does (it keeps polling the taps it shares
        //     with the new QEMU, and a packet it reads is lost) can only take from the new one.
        //     A `quit` would let it run its main loop a few milliseconds more. Then monitor
        //     clients move over with their held commands, the new QEMU's capabilities go back
        //     to what the VM's users had, and its threads get the old ones' placement.
        let mut stats = Stats {
            shared,
            translations,
            ..Stats::default()
        };
        if let Ok(info) = self.call(Which::Current, "query-migrate", None, deadline()) {
            stats.downtime_ms = info["downtime"].as_u64();
            stats.ram_bytes = info["ram"]["transferred"].as_u64();
        }
        let old = self.promote_incoming();
        let _ = nix::sys::signal::kill(old.pid, nix::sys::signal::Signal::SIGKILL);
        self.proxy.commit(self.poll.registry(), number);
        undo.held = false;
        let caps = Some(caps_arg(&on_old, false));
        let _ = self.call(Which::Current, "migrate-set-capabilities", caps, deadline());
        stats.tap_ioctls_held = self.current.tap_guard.as_ref().map(|g| g.suppressed);
        let new_threads = self.thread_list(Which::Current);
        stats.threads = threads::apply(&old_placement, &new_threads);
        let pid = old.pid;
        drop(old);
        let _ = self.wait_until("the old QEMU to exit", Instant::now() + STEP_TIMEOUT, |s| {
            !s.is_retired_alive(pid)
        });
        Ok(stats)
    }

    /// Puts the old QEMU back exactly as it was: new QEMU gone, migration cancelled, settings
    /// restored, and the guest running again only if it was running before. Returns what
    /// could not be put back, for the report.
    fn roll_back(&mut self, undo: &Undo) -> Vec<String> {
        let deadline = || Some(Instant::now() + STEP_TIMEOUT);
        let mut problems = Vec::new();
        let mut note = |what: &str, r: Result<Value, CallError>| {
            if let Err(e) = r {
                problems.push(format!("{what}: {}", crate::error_chain(&e)));
            }
        };
        self.kill_incoming();
        if undo.held {
            self.proxy.abort(self.poll.registry());
        }
        if self.has_exited() {
            return problems;
        }
        if undo.migrating {
            note(
                "migrate_cancel",
                self.call(Which::Current, "migrate_cancel", None, deadline()),
            );
            let settle = Instant::now() + STEP_TIMEOUT;
            while Instant::now() < settle {
                match self.call(Which::Current, "query-migrate", None, deadline()) {
                    Ok(info) if info["status"].as_str().is_some_and(is_active) => {
                        let pause = Instant::now() + Duration::from_millis(2);
                        let _ = self.wait_until("cancel", pause, |_| false);
                    }
                    _ => break,
                }
            }
        }
        if undo.out_fd_named {
            let args = json!({"fdname": FD_OUT});
            note(
                "closefd",
                self.call(Which::Current, "closefd", Some(args), deadline()),
            );
        }
        if !undo.capabilities.is_empty() {
            let names: Vec<String> = undo.capabilities.iter().map(|(c, _)| c.clone()).collect();
            let args = caps_arg(&names, false);
            let r = self.call(
                Which::Current,
                "migrate-set-capabilities",
                Some(args),
                deadline(),
            );
            note("migrate-set-capabilities", r);
        }
        if let Some(params) = &undo.parameters {
            let r = self.call(
                Which::Current,
                "migrate-set-parameters",
                Some(params.clone()),
                deadline(),
            );
            note("migrate-set-parameters", r);
        }
        // QEMU resumes a source whose migration failed by itself, but not one that finished
        // sending and then lost its destination: `cont` takes its disks back and runs it.
        if undo.old_status.as_deref() == Some("running") {
            let now = self.call(Which::Current, "query-status", None, deadline());
            if now.is_ok_and(|s| s["status"] != "running") {
                note("cont", self.call(Which::Current, "cont", None, deadline()));
            }
        }
        let _ = self.current.qmp.take_events();
        problems
    }

    /// Replays the hot-plug journal into the incoming generation through its private
    /// monitor. QEMU keeps `getfd` names per monitor, so fds and the commands that use them
    /// both go through this one monitor.
    pub(crate) fn replay_hotplug(&mut self) -> Result<(), UpgradeError> {
        let entries: Vec<(String, Value, Option<OwnedFd>)> = self
            .proxy
            .journal()
            .entries()
            .iter()
            .map(|e| {
                let fd = e.fds.first().and_then(|fd| fd.try_clone().ok());
                (e.command.clone(), e.arguments.clone(), fd)
            })
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.progress("replaying hot-plugged devices");
        for (i, (command, arguments, fd)) in entries.iter().enumerate() {
            let deadline = Some(Instant::now() + STEP_TIMEOUT);
            let fd = fd.as_ref().map(|f| f.as_fd());
            let ret = self
                .call_with_fd(
                    Which::Incoming,
                    command,
                    Some(arguments.clone()),
                    fd,
                    deadline,
                )
                .map_err(|e| {
                    UpgradeError::Replay(format!(
                        "{command} {arguments}: {}",
                        crate::error_chain(&e)
                    ))
                })?;
            let ok = self
                .proxy
                .journal()
                .entries()
                .get(i)
                .is_none_or(|e| e.succeeded(&ret));
            if !ok {
                return Err(UpgradeError::Replay(format!(
                    "{command} {arguments}: {ret}"
                )));
            }
        }
        Ok(())
    }

    /// Sends waiting control clients the old QEMU's migration figures.
    fn report_progress(&mut self) {
        let deadline = Some(Instant::now() + STEP_TIMEOUT);
        if let Ok(info) = self.call(Which::Current, "query-migrate", None, deadline) {
            let ram = &info["ram"];
            let line = format!(
                "migrating: {} of {} MiB sent, {} MiB left",
                ram["transferred"].as_u64().unwrap_or(0) >> 20,
                ram["total"].as_u64().unwrap_or(0) >> 20,
                ram["remaining"].as_u64().unwrap_or(0) >> 20,
            );
            self.progress(&line);
        }
    }

    /// A generation's vCPU and iothread ids, for [`threads::snapshot`] and [`threads::apply`].
    fn thread_list(&mut self, which: Which) -> Vec<(String, i32)> {
        let deadline = Some(Instant::now() + STEP_TIMEOUT);
        let cpus = self
            .call(which, "query-cpus-fast", None, deadline)
            .unwrap_or_default();
        let io = self
            .call(which, "query-iothreads", None, deadline)
            .unwrap_or_default();
        threads::threads(&cpus, &io)
    }

    /// Total bytes of guest RAM the launcher owns, or the `-m` size when RAM is streamed.
    fn ram_size(&self) -> u64 {
        let owned: u64 = self
            .config
            .ram
            .iter()
            .filter_map(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).ok())
            .map(|st| st.st_size as u64)
            .sum();
        if owned > 0 {
            return owned;
        }
        crate::resources::resources(&self.config.base.cmd)
            .memory
            .iter()
            .filter_map(|m| m.size)
            .sum()
    }
}

pub(crate) fn start_timeout() -> Duration {
    std::env::var("QEMU_LIVEUPGRADE_START_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(START_TIMEOUT)
}

/// `[(name, enabled)]` from a `query-migrate-capabilities` reply.
fn capabilities(reply: &Value) -> Vec<(String, bool)> {
    reply
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| Some((c["capability"].as_str()?.to_owned(), c["state"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn caps_arg(names: &[String], state: bool) -> Value {
    let caps: Vec<Value> = names
        .iter()
        .map(|c| json!({"capability": c, "state": state}))
        .collect();
    json!({ "capabilities": caps })
}

fn migration_status(event: &Value) -> Option<&str> {
    if event["event"] != "MIGRATION" {
        return None;
    }
    event["data"]["status"].as_str()
}

fn is_active(status: &str) -> bool {
    !matches!(status, "none" | "completed" | "failed" | "cancelled")
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
