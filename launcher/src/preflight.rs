//! What an upgrade learns before it starts anything: what the new binary accepts, and the
//! argv a later generation gets there ([`crate::translate`]), asked through a probe the
//! supervisor's loop drives so that monitors and consoles are served meanwhile; and `check`,
//! which goes one step further and starts the new QEMU exactly as an upgrade would, then ends
//! it, the guest running on untouched.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use mio::unix::SourceFd;
use mio::Interest;

use crate::generation::{generation_cmdline, GenArgs};
use crate::json::JsonExt;
use crate::resolve::{self, Binary, Source};
use crate::supervisor::{Supervisor, To};
use crate::token::Token;
use crate::translate::probe::{FileKey, Probe, PROBE_TIMEOUT};
use crate::translate::{self, Capabilities, Translated};
use crate::verdict::{Reason, Verdict};

/// How long a probe's killed processes may take to be reaped.
const REAP_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

impl Supervisor {
    /// What `binary` accepts for this VM's argv and machine type, asked once per binary file.
    pub(crate) fn capabilities(&mut self, binary: &Path) -> Result<Capabilities, String> {
        let args = GenArgs {
            machine: self.machine.clone(),
            incoming: true,
            target: None,
            ..GenArgs::default()
        };
        let cmd = generation_cmdline(&self.config.base, &args);
        let questions = translate::questions(&cmd, self.machine.as_deref());
        let key = FileKey::of(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
        if let Some(caps) = self.probes.get(&key, &questions) {
            return Ok(caps.clone());
        }
        // As long as a new QEMU gets to start: a binary that hangs here would hang there too.
        let timeout = self.config.settings.timeouts.start.min(PROBE_TIMEOUT);
        let signals = &self.config.signals;
        let probe = Probe::start(binary, &self.config.argv0, &questions, signals, timeout)
            .map_err(|e| crate::error_chain(&e))?;
        let fds = probe.fds();
        for fd in &fds {
            // Both pipes wake the same handler, which reads both.
            let _ = self.poll.registry().register(
                &mut SourceFd(fd),
                Token::Probe.to_mio(),
                Interest::READABLE,
            );
        }
        let deadline = probe.deadline();
        self.probes.active = Some(probe);
        let _ = self.wait_until(None, "the new QEMU's answers", deadline, |s, _| {
            s.probes.active.as_ref().is_none_or(Probe::is_done)
        });
        for fd in &fds {
            let _ = self.poll.registry().deregister(&mut SourceFd(fd));
        }
        let probe = self.probes.active.take().ok_or("the probe went missing")?;
        let pids = probe.pids();
        let caps = probe.finish();
        // Its processes are killed now: none outlives the question (a VM has exactly one
        // QEMU whenever the upgrade says anything).
        self.await_reaped(&pids, std::time::Instant::now() + REAP_PROBE);
        let caps = caps.map_err(|e| crate::error_chain(&e))?;
        self.probes.insert(key, questions, caps.clone());
        Ok(caps)
    }

    /// Reads what a probe's pipes hold.
    pub(crate) fn on_probe(&mut self) {
        if let Some(probe) = self.probes.active.as_mut() {
            probe.on_readable();
        }
    }

    /// The argv a generation started with `args` gets on the binary `args.target` describes,
    /// or every option that binary cannot be given.
    pub(crate) fn translated(&self, args: &GenArgs) -> Result<Option<Translated>, Verdict> {
        let Some(caps) = &args.target else {
            return Ok(None);
        };
        let plain = GenArgs {
            target: None,
            ..args.clone()
        };
        translate::translate(&generation_cmdline(&self.config.base, &plain), caps).map(Some)
    }
}

impl Supervisor {
    /// The preflight behind `qemu-liveupgrade check`: everything an upgrade to `to` (or to the
    /// binary resolution finds) would do up to the migration, then the new QEMU is ended. The
    /// old QEMU is only asked questions; the guest never stops. Returns the report.
    pub(crate) fn check(&mut self, to: Option<PathBuf>) -> Value {
        let started = Instant::now();
        let mut verdict = self.config.base.verdict.clone();
        let mut report = json!({
            "qemu-liveupgrade": "check",
            "generation": self.current.number,
            "machine": self.machine,
        });
        let binary = match to {
            Some(path) => Ok(Binary {
                path,
                source: Source::Request,
            }),
            None => resolve::resolve(&self.config.argv0).map_err(|e| crate::error_chain(&e)),
        };
        let binary = match binary {
            Ok(b) => b,
            Err(why) => {
                verdict.add(Reason::new("the new QEMU", why));
                return finish(report, verdict, started);
            }
        };
        report.put("binary", binary.path.to_string_lossy());
        // What the running QEMU itself refuses to migrate (a mounted 9p share, a device that
        // cannot migrate): QEMU lists its migration blockers in query-migrate.
        let deadline = Some(Instant::now() + std::time::Duration::from_secs(10));
        // A VM still loading its state (`-incoming`) has nothing whole to move yet.
        if let Ok(status) = self.call(To::CURRENT, "query-status", None, deadline) {
            if status.at("/status") == "inmigrate" {
                let why = crate::upgrade::UpgradeError::Loading.to_string();
                verdict.add(Reason::new("the running QEMU", why));
            }
        }
        if let Ok(info) = self.call(To::CURRENT, "query-migrate", None, deadline) {
            for why in info.at("/blocked-reasons").as_array().into_iter().flatten() {
                let why = why.as_str().unwrap_or_default();
                verdict.add(Reason::new(
                    "the running QEMU",
                    format!("blocks migration: {why}"),
                ));
            }
        }
        let target = match self.capabilities(&binary.path) {
            Ok(caps) => {
                report.put("version", caps.version.clone());
                Some(caps)
            }
            Err(why) => {
                let option = format!("--to {}", binary.path.display());
                verdict.add(Reason::new(
                    option,
                    format!("cannot ask it what it accepts: {why}"),
                ));
                None
            }
        };
        let block = self.proxy.journal().block_argv().unwrap_or_else(|why| {
            verdict.add(Reason::new("the block graph", why));
            None
        });
        let args = GenArgs {
            machine: self.machine.clone(),
            incoming: true,
            target,
            block,
            ..GenArgs::default()
        };
        match self.translated(&args) {
            Ok(t) => {
                let changes: Vec<Value> = t
                    .iter()
                    .flat_map(|t| &t.changes)
                    .map(|c| c.to_json())
                    .collect();
                report.put("translations", changes);
            }
            Err(v) => verdict.merge(v),
        }
        if verdict.upgradable() {
            self.start_and_end(binary, &args, &mut verdict, &mut report);
        }
        finish(report, verdict, started)
    }

    /// Starts the new QEMU as an upgrade's step 4 does (same argv, pinned machine, fds,
    /// `-incoming defer`, the tap guard), replays the hot-plugged devices into it, and ends it.
    fn start_and_end(
        &mut self,
        binary: Binary,
        args: &GenArgs,
        verdict: &mut Verdict,
        report: &mut Value,
    ) {
        let number = self.current.number + 1;
        let deadline = Instant::now() + self.config.settings.timeouts.start;
        match self.start_generation(number, binary, args, deadline) {
            Ok(mut gen) => {
                report.put("started", true);
                report.put("version", gen.version_string());
                let replayed = self.proxy.journal().entries().len();
                match self.replay_hotplug(&mut gen, None) {
                    Ok(()) => report.put("replayed", replayed),
                    Err(e) => {
                        verdict.add(Reason::new("hot-plugged devices", crate::error_chain(&e)))
                    }
                }
                self.end_generation(gen);
            }
            Err(failed) => {
                let mut why = format!("did not start: {}", crate::error_chain(&failed.error));
                if let Some(line) = failed.said {
                    why.push_str(&format!(" ({line})"));
                }
                verdict.add(Reason::new("the new QEMU", why));
            }
        }
        // The per-generation sockets made for it go; the live generation's stay.
        self.proxy.abort(self.poll.registry());
    }
}

/// The check report: `ok`, the verdict, and how long it took.
fn finish(mut report: Value, verdict: Verdict, started: Instant) -> Value {
    report.put("ok", verdict.upgradable());
    report.put("verdict", verdict.to_json());
    report.put(
        "total_ms",
        (started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
    );
    report
}
