//! The supervisor: one `mio` loop that owns the running QEMU generation.
//!
//! Signal handlers only wake the loop (`signal-hook-mio`'s self-pipe); the loop then forwards
//! SIGTERM, SIGINT, SIGHUP and SIGQUIT to QEMU, reaps children on SIGCHLD until `waitpid`
//! reports none left, and records how the current generation ended so `main` can end the same
//! way. Nothing here wakes up on a timer: an idle VM costs the launcher no CPU at all.
//!
//! Sequential steps (the start-up handshake, later the upgrade) are written as plain code that
//! waits with [`Supervisor::call`] and [`Supervisor::pump`], which keep serving the loop while
//! they wait, with a deadline: signals, consoles, monitors and the control socket are never
//! left unserved during a step. A generation being started next to the current one (by an
//! upgrade) is not the supervisor's to own: the step that started it passes it along
//! ([`To::Beside`]), so its events are served too, and it ends when that value is given back
//! ([`Supervisor::end_generation`]).

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;
use signal_hook_mio::v1_0::Signals;

pub use crate::child::Exit;
pub use crate::config::Config;

use crate::control::{Client, Control};
use crate::daemonize::StartResult;
use crate::fault::Phase;
use crate::generation::{GenArgs, Generation, GenerationError};
use crate::proxy::Proxy;
use crate::ptys::PtyRelay;
use crate::qmp::QmpError;
use crate::relay::Relay;
use crate::resolve::Binary;
use crate::signals::{self, Reaction};
use crate::spawn::{spawn_registered, Plumbing};
use crate::token::Token;

mod calls;
pub(crate) mod handover;
mod requests;

use calls::Awaited;
pub(crate) use calls::{CallError, To};

pub use crate::signals::FORWARDED;

/// How long ending a generation waits for it to be reaped after SIGKILL.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure of the supervisor itself (not of QEMU).
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Setting up or waiting on the event loop failed.
    #[error("event loop failed")]
    Poll(#[source] io::Error),
    /// The first generation could not be started.
    #[error(transparent)]
    Start(#[from] GenerationError),
    /// A monitor or chardev socket could not be served.
    #[error("cannot listen on {what}")]
    Listen {
        /// The socket path or fd.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The private monitor failed while QEMU kept running.
    #[error("QEMU's private monitor failed")]
    Monitor(#[source] QmpError),
}

/// Why a generation started next to the current one did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// It could not be forked, or did not execute QEMU.
    #[error(transparent)]
    Spawn(#[from] GenerationError),
    /// Its monitor never answered, or it exited first.
    #[error(transparent)]
    Monitor(#[from] CallError),
}

/// A generation that did not start, already ended again.
#[derive(Debug)]
pub(crate) struct NotStarted {
    /// Why.
    pub(crate) error: StartError,
    /// The last line it wrote on stderr: QEMU's own explanation, when it gave one.
    pub(crate) said: Option<String>,
}

/// The running supervisor.
pub struct Supervisor {
    pub(crate) poll: Poll,
    events: Events,
    signals: Signals,
    pub(crate) config: Config,
    /// The generation running the guest; its exit ends the VM.
    pub(crate) current: Generation,
    /// Generations killed and not yet reaped.
    ending: Vec<Generation>,
    /// The machine type every generation after the first runs, resolved from the first.
    pub(crate) machine: Option<String>,
    /// Upgrade requests (SIGUSR2 or control socket) received and not yet acted on.
    pub(crate) upgrade_requests: u32,
    /// The binary a control client asked for, if any.
    pub(crate) upgrade_to: Option<std::path::PathBuf>,
    /// The control socket, when it could be bound.
    control: Option<Control>,
    /// Control clients waiting for the upgrade under way to finish.
    waiters: Vec<Client>,
    /// When the launcher started.
    started: Instant,
    /// The last upgrade's report, for `status`.
    last_upgrade: Option<Value>,
    /// An upgrade is under way: private-monitor events are kept for it to read (otherwise
    /// they are dropped), further requests are coalesced into it, and signals to forward
    /// wait for it to end.
    pub(crate) upgrading: bool,
    /// Signals to forward that came during an upgrade.
    deferred: Vec<Signal>,
    /// Waits end as soon as a signal to forward is held back: the upgrade has not started
    /// the migration, and gives up rather than keep the VM's end waiting.
    pub(crate) interruptible: bool,
    /// A job-control stop was passed on to QEMU: if QEMU stops, the launcher stops too.
    job_stop: bool,
    /// The test fault still to inject ([`crate::fault`]).
    fault: Option<crate::fault::Fault>,
    /// QEMU's stdout and stderr copied on, when daemonized.
    outputs: Vec<Relay>,
    /// Write ends of the output pipes, handed to every generation when daemonized.
    child_out: Vec<OwnedFd>,
    null: std::fs::File,
    /// The monitor and chardev sockets served across generations.
    pub(crate) proxy: Proxy,
    /// The ptys held across generations.
    pub(crate) ptys: PtyRelay,
    /// What each new binary accepts, asked once per binary file.
    pub(crate) probes: crate::translate::probe::ProbeCache,
    /// Control clients that asked for a `check`, with the binary they named.
    pub(crate) check_requests: Vec<(Client, Option<std::path::PathBuf>)>,
    /// Supervisor upgrades asked for, and those done ([`crate::handover`]).
    pub(crate) handovers: crate::handover::Handovers,
}

impl Supervisor {
    /// Starts the first generation and the loop around it. Returns once it executed QEMU.
    pub fn start(mut config: Config) -> Result<Supervisor, SupervisorError> {
        let poll = Poll::new().map_err(SupervisorError::Poll)?;
        crate::stdio::set_prefix(&crate::resolve::invoked_name(&config.argv0).to_string_lossy());
        // QEMU got the inherited signal state already (main captured it first); from here on
        // the launcher survives what QEMU survives.
        signals::set_dispositions().map_err(SupervisorError::Poll)?;
        let mut signals = Signals::new(signals::watched()).map_err(SupervisorError::Poll)?;
        poll.registry()
            .register(&mut signals, Token::Signals.to_mio(), Interest::READABLE)
            .map_err(SupervisorError::Poll)?;

        let mut outputs = Vec::new();
        let mut child_out = Vec::new();
        if config.daemon.is_some() {
            for (i, target) in [1, 2].into_iter().enumerate() {
                let (r, w) = crate::fdio::pipe().map_err(|e| SupervisorError::Poll(e.into()))?;
                let relay = Relay::new(r, target);
                poll.registry()
                    .register(
                        &mut SourceFd(&relay.raw_fd()),
                        Token::Output(i).to_mio(),
                        Interest::READABLE,
                    )
                    .map_err(SupervisorError::Poll)?;
                outputs.push(relay);
                child_out.push(w);
            }
        }
        let null = std::fs::File::open("/dev/null").map_err(SupervisorError::Poll)?;
        let mut proxy = Proxy::new(Token::PROXY_BASE);
        crate::listeners::listen(&mut proxy, poll.registry(), &config.base).map_err(|e| {
            SupervisorError::Listen {
                what: e.what,
                source: e.source,
            }
        })?;
        let opened = std::mem::take(&mut config.ptys);
        let mut ptys = PtyRelay::new(poll.registry(), opened, |i| Token::Pty(i).to_mio())
            .map_err(SupervisorError::Poll)?;
        let plumbing = Plumbing {
            proxy: &mut proxy,
            ptys: &mut ptys,
            null: &null,
            child_out: &child_out,
            before_exec: None,
        };
        let first = spawn_registered(
            poll.registry(),
            plumbing,
            config.template(),
            1,
            config.binary.clone(),
            &GenArgs::default(),
            false,
        );
        // On failure the daemon's foreground exits 1 once the caller has printed the error.
        let current = first?;
        proxy
            .activate_first(poll.registry(), 1)
            .map_err(GenerationError::Socket)?;
        let mut sup = Supervisor {
            poll,
            events: Events::with_capacity(64),
            signals,
            current,
            ending: Vec::new(),
            machine: None,
            upgrade_requests: 0,
            upgrade_to: None,
            control: None,
            waiters: Vec::new(),
            started: Instant::now(),
            last_upgrade: None,
            upgrading: false,
            deferred: Vec::new(),
            interruptible: false,
            job_stop: false,
            fault: config.settings.fault,
            outputs,
            child_out,
            null,
            proxy,
            ptys,
            probes: Default::default(),
            check_requests: Vec::new(),
            handovers: crate::handover::Handovers::new(),
            config,
        };
        // The first QEMU stands where the launcher was executed: a failed exec is the
        // launcher's own failure, reported as such. No deadline, as none binds QEMU's start.
        match sup.await_exec(To::CURRENT, None) {
            Ok(()) => {}
            Err(Awaited::Exec(e)) => return Err(GenerationError::Spawn(e).into()),
            Err(Awaited::Call(CallError::Poll(e))) => return Err(SupervisorError::Poll(e)),
            // It exited: the loop reports how.
            Err(Awaited::Call(_)) => {}
        }
        match Control::open(sup.poll.registry()) {
            Ok((c, note)) => {
                if let Some(note) = note {
                    crate::stderr_line(&format!(
                        "{}: qemu-liveupgrade: {note}",
                        crate::resolve::invoked_name(&sup.config.argv0).to_string_lossy(),
                    ));
                }
                sup.control = Some(c);
            }
            // The VM runs regardless; SIGUSR2 still upgrades it.
            Err(e) => {
                crate::stderr_line(&format!(
                    "{}: qemu-liveupgrade: no control socket: {}",
                    crate::resolve::invoked_name(&sup.config.argv0).to_string_lossy(),
                    crate::error_chain(&e)
                ));
            }
        }
        Ok(sup)
    }

    /// Runs until QEMU exits; returns how it ended.
    pub fn run(mut self) -> Result<Exit, SupervisorError> {
        match self.handshake(To::CURRENT, None) {
            Ok(()) => {
                self.machine = self.resolve_machine();
                if let Some(d) = self.config.daemon.as_mut() {
                    d.report(StartResult::Ready);
                }
            }
            Err(CallError::Exited) | Err(CallError::Qmp(QmpError::Closed)) => {}
            Err(CallError::Poll(e)) => return Err(SupervisorError::Poll(e)),
            Err(e) => {
                // QEMU runs but its monitor is unusable: nothing could ever be upgraded, and a
                // daemonized caller would wait forever. End it rather than run blind.
                let _ = nix::sys::signal::kill(self.current.pid, Signal::SIGKILL);
                let err = match e {
                    CallError::Qmp(q) => q,
                    other => QmpError::Io(io::Error::other(other.to_string())),
                };
                return Err(SupervisorError::Monitor(err));
            }
        }
        self.supervise()
    }

    /// The loop itself, until QEMU exits; where a launcher that took the VM over from another
    /// ([`crate::handover::resume`]) starts.
    pub fn supervise(mut self) -> Result<Exit, SupervisorError> {
        loop {
            if let Some(exit) = self.current.exit {
                self.drain_outputs();
                // QEMU's last words (its SHUTDOWN event) reach monitor clients before they see
                // EOF: libvirt treats EOF without SHUTDOWN as a crash.
                self.proxy.flush(Instant::now() + Duration::from_secs(1));
                self.ptys.flush(Instant::now() + Duration::from_secs(1));
                crate::stdio::drain(Instant::now() + Duration::from_secs(1));
                // The taps opened by name go now, with their down scripts, as QEMU's would.
                self.config
                    .taps
                    .drain(..)
                    .for_each(crate::taps::OpenTap::close);
                // A daemonized QEMU that failed to start: its error is relayed by now, and
                // the foreground exits with its status.
                if let Some(d) = self.config.daemon.as_mut() {
                    d.report(StartResult::Failed(match exit {
                        Exit::Code(c) => c.clamp(1, 255) as u8,
                        Exit::Signal(_) => 1,
                    }));
                }
                return Ok(exit);
            }
            if let Some((mut client, to)) = self.check_requests.pop() {
                let report = self.check(to);
                let _ = client.send(&report);
                continue;
            }
            if self.proxy.has_viewers() {
                self.hand_over_viewers();
                continue;
            }
            if self.upgrade_requests > 0 {
                self.upgrade_requests = 0;
                let to = self.upgrade_to.take();
                let report = self.upgrade(to);
                self.report(report);
                self.deliver_deferred();
                release_free_memory();
                continue;
            }
            // Never during an upgrade or a check: those run to their end first, from here.
            if !self.handovers.requests.is_empty() {
                self.hand_over();
                continue;
            }
            self.pump(None, None).map_err(SupervisorError::Poll)?;
        }
    }

    /// Resolves the first generation's machine alias (`pc`, `q35`, or the default) to the
    /// versioned type it stands for, which every later generation is started with: local
    /// migration needs the same machine type on both sides, and a newer QEMU's alias points
    /// at a newer type.
    fn resolve_machine(&mut self) -> Option<String> {
        let wanted = self
            .config
            .base
            .cmd
            .opts("machine")
            .filter_map(|o| o.parse_arg())
            .filter_map(|a| a.get("type"))
            .last();
        let machines = self.call(To::CURRENT, "query-machines", None, None).ok()?;
        let machines = machines.as_array()?;
        let found = machines.iter().find(|m| match &wanted {
            Some(t) => {
                m.get("name").and_then(Value::as_str) == Some(t)
                    || m.get("alias").and_then(Value::as_str) == Some(t)
            }
            None => m.get("is-default").and_then(Value::as_bool) == Some(true),
        });
        found
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Starts generation `number` next to the current one and waits, until `deadline`, for
    /// it to execute QEMU and answer its monitor. On failure it is ended again, and what it
    /// said on stderr comes back with the error.
    pub(crate) fn start_generation(
        &mut self,
        number: u32,
        binary: Binary,
        args: &GenArgs,
        deadline: Instant,
    ) -> Result<Generation, NotStarted> {
        let plumbing = Plumbing {
            proxy: &mut self.proxy,
            ptys: &mut self.ptys,
            null: &self.null,
            child_out: &self.child_out,
            before_exec: self
                .fault
                .filter(|f| f.phase == Phase::BeforeExec)
                .map(|f| f.signal),
        };
        if plumbing.before_exec.is_some() {
            self.fault = None;
        }
        let spawned = spawn_registered(
            self.poll.registry(),
            plumbing,
            self.config.template(),
            number,
            binary,
            args,
            true,
        );
        let mut gen = match spawned {
            Ok(gen) => gen,
            Err(e) => {
                self.ptys.abort(self.poll.registry());
                self.proxy.discard(number);
                return Err(NotStarted {
                    error: e.into(),
                    said: None,
                });
            }
        };
        let started = match self.await_exec(To::Beside(&mut gen), Some(deadline)) {
            Ok(()) => {
                self.strike(Phase::Exec, Some(gen.pid));
                Ok(())
            }
            Err(e) => Err(e),
        };
        let started = match started {
            Ok(()) => self
                .handshake(To::Beside(&mut gen), Some(deadline))
                .map_err(StartError::from),
            Err(Awaited::Exec(e)) => Err(GenerationError::Spawn(e).into()),
            Err(Awaited::Call(e)) => Err(e.into()),
        };
        match started {
            Ok(()) => Ok(gen),
            Err(error) => Err(NotStarted {
                error,
                said: self.end_generation(gen),
            }),
        }
    }

    /// Ends a generation that is not the current one: SIGKILL, then the loop is served until
    /// it is reaped (10 s at most; a process stuck in the kernel is reaped later), and its
    /// per-generation sockets go. Returns the last line it wrote on stderr.
    pub(crate) fn end_generation(&mut self, mut gen: Generation) -> Option<String> {
        // Even when it never started: its pty sockets and proxy backends were made.
        self.ptys.abort(self.poll.registry());
        self.proxy.discard(gen.number);
        let pid = gen.pid;
        if gen.exit.is_none() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + REAP_TIMEOUT;
            // Reaping is short and bounded, and a VM that is ending waits for it too.
            let interruptible = std::mem::replace(&mut self.interruptible, false);
            let _ = self.wait_until(Some(&mut gen), "reaping a QEMU", deadline, |_, g| {
                g.is_none_or(|g| g.exit.is_some())
            });
            self.interruptible = interruptible;
        }
        let said = last_words(&self.config.argv0, &mut gen);
        if gen.exit.is_none() {
            // Still not reaped: the loop reaps it later, and drops it then.
            self.ending.push(gen);
        }
        said
    }

    /// Makes `new` the current generation, its consoles live, and returns the old one, still
    /// there to be asked (as the generation beside the current one) until
    /// [`Supervisor::retire`]; from here on its exit no longer ends the VM.
    pub(crate) fn promote(&mut self, new: Generation) -> Generation {
        self.ptys.commit(self.poll.registry(), new.number);
        std::mem::replace(&mut self.current, new)
    }

    /// Ends a generation whose guest runs elsewhere now, at once, by SIGKILL: anything it still
    /// does can only take from the new one. Its exit runs at the lowest priority: taking down
    /// the mappings of guest RAM costs a dying QEMU about 0.2 s of CPU per GiB (measured here,
    /// 1 and 2 GiB of memfd RAM, nested TCG), which should not compete with the guest that has
    /// just resumed next door, nor with any other. The loop reaps it.
    pub(crate) fn retire(&mut self, old: Generation) {
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&old.qmp.raw_fd()));
        if old.exit.is_none() {
            crate::threads::to_lowest_priority(old.pid);
            let _ = nix::sys::signal::kill(old.pid, Signal::SIGKILL);
            self.ending.push(old);
        }
    }

    /// Serves the loop until the children `pids` (not generations: a probe's) are reaped,
    /// or `deadline`.
    pub(crate) fn await_reaped(&mut self, pids: &[Pid], deadline: Instant) {
        let gone = |pid: Pid| match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => false,
            // Reaped now, or already by the loop (ECHILD).
            _ => true,
        };
        let _ = self.wait_until(None, "a probe's processes to end", deadline, |_, _| {
            pids.iter().all(|&p| gone(p))
        });
    }

    /// Whether every generation killed so far has been reaped.
    pub(crate) fn ending_is_empty(&self) -> bool {
        self.ending.is_empty()
    }

    /// Serves the loop until every generation killed so far is reaped, or `deadline`.
    pub(crate) fn reap_ended(&mut self, deadline: Instant) {
        let _ = self.wait_until(None, "reaping old QEMUs", deadline, |s, _| {
            s.ending.is_empty()
        });
    }

    /// Waits once for events, up to `timeout`, and handles them; `beside`'s too.
    pub(crate) fn pump(
        &mut self,
        mut beside: Option<&mut Generation>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        // Output that waits for a stalled reader of the launcher's stdio is written when the
        // reader reads again: watched before the loop sleeps.
        crate::stdio::watch(self.poll.registry());
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut tokens = Vec::new();
        for event in self.events.iter() {
            match Token::from_mio(event.token()) {
                Token::Proxy => self.proxy.handle(self.poll.registry(), event),
                token => tokens.push(token),
            }
        }
        for token in tokens {
            match token {
                Token::Signals => self.on_signals(beside.as_deref_mut()),
                Token::Output(i) => self.on_output(i),
                Token::Stderr(n) => {
                    if let Some(relay) = self.generation(beside.as_deref_mut(), n) {
                        relay.stderr.as_mut().map(Relay::pump);
                    }
                }
                Token::Monitor(n) => self.on_monitor(beside.as_deref_mut(), n),
                Token::TapGuard(n) => self.on_tap_guard(beside.as_deref_mut(), n),
                Token::Pty(i) => self.ptys.handle(i),
                Token::Control => {
                    if let Some(c) = self.control.as_mut() {
                        c.accept(self.poll.registry());
                    }
                }
                Token::ControlClient(i) => self.on_control_client(i),
                Token::Probe => self.on_probe(),
                Token::Stdio(fd) => crate::stdio::on_writable(fd as i32),
                // Exec status is read by whoever waits for it; the event only wakes it.
                Token::Exec(_)
                | Token::Handover
                | Token::Placer
                | Token::Proxy
                | Token::Unknown(_) => {}
            }
        }
        Ok(())
    }

    /// Generation `number`: the current one, the one beside it, or one being ended.
    fn generation<'g>(
        &'g mut self,
        beside: Option<&'g mut Generation>,
        number: u32,
    ) -> Option<&'g mut Generation> {
        if self.current.number == number {
            return Some(&mut self.current);
        }
        if let Some(gen) = beside.filter(|g| g.number == number) {
            return Some(gen);
        }
        self.ending.iter_mut().find(|g| g.number == number)
    }

    fn on_signals(&mut self, beside: Option<&mut Generation>) {
        let pending: Vec<i32> = self.signals.pending().collect();
        let mut beside = beside;
        for raw in pending {
            let Ok(sig) = Signal::try_from(raw) else {
                continue;
            };
            match signals::reaction(raw) {
                Reaction::Reap => self.reap(beside.as_deref_mut()),
                Reaction::Upgrade => self.upgrade_requests += 1,
                // Once the migration has finished or been cancelled: see [`Self::deliver`].
                Reaction::Forward if self.upgrading => self.deferred.push(sig),
                Reaction::Forward | Reaction::Continue => {
                    let _ = nix::sys::signal::kill(self.current.pid, sig);
                }
                Reaction::JobStop => {
                    self.job_stop = true;
                    let _ = nix::sys::signal::kill(self.current.pid, sig);
                }
                Reaction::Ignore | Reaction::Default => {}
            }
        }
    }

    /// Passes on the signals held back while an upgrade ran, to the QEMU that runs the guest
    /// now, in the order they came.
    pub(crate) fn deliver_deferred(&mut self) {
        for sig in std::mem::take(&mut self.deferred) {
            let _ = nix::sys::signal::kill(self.current.pid, sig);
        }
    }

    /// The signal that is to end the VM once the upgrade under way is over, if one came.
    pub(crate) fn ending_signal(&self) -> Option<Signal> {
        self.deferred.first().copied()
    }

    /// Reaps every exited child; SIGCHLD is coalesced, so one wake-up may stand for several.
    fn reap(&mut self, mut beside: Option<&mut Generation>) {
        loop {
            let flags = WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED;
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(flags)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                // QEMU took a job-control stop passed on to it: the VM's pid stops too, until
                // SIGCONT, which the loop passes on in turn.
                Ok(WaitStatus::Stopped(pid, _)) if pid == self.current.pid && self.job_stop => {
                    self.job_stop = false;
                    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
                    continue;
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if pid == self.current.pid {
                self.current.exit = Some(exit);
            } else if let Some(gen) = beside.as_deref_mut().filter(|g| g.pid == pid) {
                gen.exit = Some(exit);
            } else if let Some(i) = self.ending.iter().position(|g| g.pid == pid) {
                let mut gone = self.ending.swap_remove(i);
                gone.exit = Some(exit);
                // What it wrote last still goes to the launcher's stderr; then it closes.
                last_words(&self.config.argv0, &mut gone);
            }
        }
    }

    fn on_monitor(&mut self, beside: Option<&mut Generation>, number: u32) {
        let upgrading = self.upgrading;
        let is_current = self.current.number == number;
        let Some(gen) = self.generation(beside, number) else {
            return;
        };
        let result = gen.qmp.on_readable();
        let events = match is_current && !upgrading {
            true => gen.qmp.take_events(),
            false => Vec::new(),
        };
        if result.is_err() || gen.qmp.is_closed() {
            let fd = gen.qmp.raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        // The journal learns of completed device removals (DEVICE_DELETED) here too, even
        // when no client is connected to see them.
        for event in events {
            self.proxy.note_event(&event);
        }
    }

    fn on_tap_guard(&mut self, beside: Option<&mut Generation>, number: u32) {
        let Some(gen) = self.generation(beside, number) else {
            return;
        };
        if let Some(guard) = gen.tap_guard.as_mut() {
            if !guard.on_readable() {
                let fd = guard.raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
        }
    }

    fn on_output(&mut self, i: usize) {
        if let Some(relay) = self.outputs.get_mut(i).filter(|r| r.is_open()) {
            relay.pump();
        }
    }

    /// Copies what QEMU wrote just before exiting, so its last error reaches the caller.
    fn drain_outputs(&mut self) {
        for relay in self.outputs.iter_mut().filter(|r| r.is_open()) {
            relay.pump();
        }
        if let Some(relay) = self.current.stderr.as_mut() {
            relay.pump();
        }
    }

    /// Injects the test fault if it strikes at `phase` (once); `new` is the QEMU an upgrade
    /// is starting.
    pub(crate) fn strike(&mut self, phase: Phase, new: Option<Pid>) {
        if let Some(fault) = self.fault {
            if fault.strike(phase, new, self.current.pid) {
                self.fault = None;
            }
        }
    }

    /// The deadline of one monitor command sent now.
    pub(crate) fn step_deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.config.settings.timeouts.step)
    }

    /// Whether the current generation has exited, which ends the VM.
    pub(crate) fn has_exited(&self) -> bool {
        self.current.exit.is_some()
    }
}

/// Copies what a generation still has on its stderr relay and returns its last line,
/// QEMU's own explanation when it failed.
fn last_words(argv0: &std::ffi::OsStr, gen: &mut Generation) -> Option<String> {
    let relay = gen.stderr.as_mut()?;
    relay.pump();
    let prefix = format!(
        "{}: ",
        crate::resolve::invoked_name(argv0).to_string_lossy()
    );
    relay.last_line(&prefix)
}

/// Gives the pages an upgrade's passing allocations left free back to the kernel (glibc's
/// `malloc_trim`), so that the launcher's RSS stays near what it holds rather than the
/// high-water mark of every upgrade so far. An upgrade takes hundreds of milliseconds; this
/// takes microseconds on a heap of a few hundred KiB.
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel; this process is
    // single-threaded, so nothing allocates meanwhile.
    unsafe { libc::malloc_trim(0) };
}
