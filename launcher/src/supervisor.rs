//! The supervisor: one `mio` loop that owns the running QEMU generation.
//!
//! Signal handlers only wake the loop (`signal-hook-mio`'s self-pipe); the loop then forwards
//! SIGTERM, SIGINT, SIGHUP and SIGQUIT to QEMU, reaps children on SIGCHLD until `waitpid`
//! reports none left, and records how the current generation ended so `main` can end the same
//! way. Nothing here wakes up on a timer: an idle VM costs the launcher no CPU at all.
//!
//! Sequential steps (the start-up handshake, later the upgrade) are written as plain code that
//! waits with [`Supervisor::call`], which keeps pumping the loop while it waits, so signals and
//! child exits are never left unhandled during a step.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::child::InheritedSignals;
use crate::control::{self, Client, Control};
use crate::daemonize::{Daemon, StartResult};
use crate::generation::{Base, GenArgs, Generation, GenerationError};
use crate::monitors::ListenOn;
use crate::proxy::{Listen, Proxy};
use crate::ptys::{OpenPty, PtyRelay};
use crate::qmp::{self, QmpError};
use crate::relay::{self, Relay};
use crate::resolve::Binary;
use crate::spawn::{child_stdio, spawn_registered, Sockets};

/// Signals the launcher passes on to the running QEMU, as QEMU would have received them.
pub const FORWARDED: [i32; 4] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT];

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

/// How the VM's QEMU ended; the launcher ends the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(Signal),
}

/// Why [`Supervisor::call`] returned without a reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The command failed, or the monitor broke.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The generation exited while the command was outstanding.
    #[error("QEMU exited")]
    Exited,
    /// The deadline passed.
    #[error("{0} timed out")]
    Timeout(String),
    /// The loop itself failed.
    #[error("event loop failed")]
    Poll(#[source] io::Error),
}

/// Which generation a command goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The one running the guest.
    Current,
    /// The one being started by an upgrade.
    Incoming,
}

/// What the loop can be woken by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Signals,
    /// Output of QEMU copied to the launcher's stdout (0) or stderr (1), when daemonized.
    Relay(usize),
    /// The control socket's listener.
    Control,
    /// A control client, by slot.
    ControlClient(usize),
    /// A generation's private monitor, by generation number.
    Monitor(u32),
    /// A generation's tap guard, by generation number.
    TapGuard(u32),
    /// A kept pty's master or generation sockets, by pty.
    Pty(usize),
    /// The pipes of a probe asking a new binary what it accepts.
    Probe,
}

impl Token {
    const RELAY_BASE: usize = 1 << 10;
    const CONTROL_CLIENT_BASE: usize = 1 << 16;
    const MONITOR_BASE: usize = 1 << 20;
    const TAP_GUARD_BASE: usize = 1 << 22;
    const PTY_BASE: usize = 1 << 23;
    /// Tokens from here up belong to the proxy.
    const PROXY_BASE: usize = 1 << 24;

    pub(crate) fn to_mio(self) -> mio::Token {
        mio::Token(match self {
            Token::Signals => 0,
            Token::Control => 1,
            Token::Probe => 2,
            Token::Relay(i) => Self::RELAY_BASE + i,
            Token::ControlClient(i) => Self::CONTROL_CLIENT_BASE + i,
            Token::Monitor(n) => Self::MONITOR_BASE + n as usize,
            Token::TapGuard(n) => Self::TAP_GUARD_BASE + n as usize,
            Token::Pty(i) => Self::PTY_BASE + i,
        })
    }

    fn from_mio(t: mio::Token) -> Token {
        match t.0 {
            0 => Token::Signals,
            1 => Token::Control,
            2 => Token::Probe,
            i if i < Self::CONTROL_CLIENT_BASE => Token::Relay(i - Self::RELAY_BASE),
            i if i < Self::MONITOR_BASE => Token::ControlClient(i - Self::CONTROL_CLIENT_BASE),
            n if n < Self::TAP_GUARD_BASE => Token::Monitor((n - Self::MONITOR_BASE) as u32),
            n if n < Self::PTY_BASE => Token::TapGuard((n - Self::TAP_GUARD_BASE) as u32),
            i => Token::Pty(i - Self::PTY_BASE),
        }
    }
}

/// Everything needed to supervise one VM.
#[derive(Debug)]
pub struct Config {
    /// argv[0] the launcher was invoked with; QEMU gets the same, so its messages read the same.
    pub argv0: OsString,
    /// The command line, fd layout, RAM regions and proxied sockets every generation shares.
    pub base: Base,
    /// The memfds of guest RAM, in layout order.
    pub ram: Vec<OwnedFd>,
    /// The taps the launcher opened by name, in layout order.
    pub taps: Vec<crate::taps::OpenTap>,
    /// The ptys the launcher opened, in layout order; the supervisor relays them.
    pub ptys: Vec<OpenPty>,
    /// The real QEMU for the first generation.
    pub binary: Binary,
    /// The signal state to give every QEMU.
    pub signals: InheritedSignals,
    /// Set when `-daemonize` was given and the foreground waits for a start-up report.
    pub daemon: Option<Daemon>,
}

/// The running supervisor.
pub struct Supervisor {
    pub(crate) poll: Poll,
    events: Events,
    signals: Signals,
    pub(crate) config: Config,
    pub(crate) current: Generation,
    pub(crate) incoming: Option<Generation>,
    pub(crate) incoming_exit: Option<Exit>,
    /// The machine type every generation after the first runs, resolved from the first.
    pub(crate) machine: Option<String>,
    /// Upgrade requests (SIGUSR2 or control socket) received and not yet acted on.
    pub(crate) upgrade_requests: u32,
    /// The binary a control client asked for, if any.
    pub(crate) upgrade_to: Option<std::path::PathBuf>,
    /// The control socket, when it could be bound.
    pub(crate) control: Option<Control>,
    /// Connected control clients by slot.
    pub(crate) control_clients: Vec<Option<Client>>,
    /// Control clients waiting for the upgrade under way to finish.
    pub(crate) waiters: Vec<Client>,
    /// When the launcher started.
    pub(crate) started: Instant,
    /// The last upgrade's report, for `status`.
    pub(crate) last_upgrade: Option<Value>,
    /// An upgrade is under way: private-monitor events are kept for it to read (otherwise
    /// they are dropped), and further requests are coalesced into it.
    pub(crate) upgrading: bool,
    pub(crate) relays: Vec<Relay>,
    /// Which relay carries each later generation's stderr.
    stderr_relay: std::collections::HashMap<u32, usize>,
    /// Write ends of the relay pipes, handed to every generation when daemonized.
    child_out: Vec<OwnedFd>,
    null: std::fs::File,
    exit: Option<Exit>,
    /// Pids of former generations not yet reaped.
    retired: Vec<Pid>,
    /// The monitor and chardev sockets served across generations.
    pub(crate) proxy: Proxy,
    /// The ptys held across generations.
    ptys: PtyRelay,
    /// What each new binary accepts, asked once per binary file.
    pub(crate) probes: crate::translate::probe::ProbeCache,
    /// Control clients that asked for a `check`, with the binary they named.
    pub(crate) check_requests: Vec<(Client, Option<std::path::PathBuf>)>,
}

impl Supervisor {
    /// Starts the first generation and the loop around it.
    pub fn start(mut config: Config) -> Result<Supervisor, SupervisorError> {
        let poll = Poll::new().map_err(SupervisorError::Poll)?;
        let mut watched = vec![SIGCHLD, SIGUSR2];
        watched.extend(FORWARDED);
        let mut signals = Signals::new(watched).map_err(SupervisorError::Poll)?;
        poll.registry()
            .register(&mut signals, Token::Signals.to_mio(), Interest::READABLE)
            .map_err(SupervisorError::Poll)?;

        let mut relays = Vec::new();
        let mut child_out = Vec::new();
        if config.daemon.is_some() {
            for target in [1, 2] {
                let (r, w) = relay::pipe().map_err(|e| SupervisorError::Poll(e.into()))?;
                relays.push(Relay::new(r, target));
                child_out.push(w);
            }
        }
        let null = std::fs::File::open("/dev/null").map_err(SupervisorError::Poll)?;
        let mut proxy = Proxy::new(Token::PROXY_BASE);
        for p in &config.base.proxied {
            let listen = match &p.listen {
                ListenOn::Path(path) => Listen::Path(path.clone()),
                // SAFETY: the fd was inherited open (the layout checked it) and nothing else in
                // this process uses it: it is not passed on to QEMU, only served from here.
                ListenOn::Fd(fd) => Listen::Fd(unsafe { OwnedFd::from_raw_fd(*fd) }),
            };
            let what = match &p.listen {
                ListenOn::Path(path) => path.display().to_string(),
                ListenOn::Fd(fd) => format!("fd {fd}"),
            };
            proxy
                .add(poll.registry(), listen, p.mode)
                .map_err(|source| SupervisorError::Listen { what, source })?;
        }
        let opened = std::mem::take(&mut config.ptys);
        let mut ptys = PtyRelay::new(poll.registry(), opened, |i| Token::Pty(i).to_mio())
            .map_err(SupervisorError::Poll)?;
        let binary = config.binary.clone();
        let sockets = Sockets {
            proxy: &mut proxy,
            ptys: &mut ptys,
        };
        let first = spawn_registered(
            poll.registry(),
            sockets,
            &config,
            child_stdio(&null, &child_out),
            1,
            binary,
            &GenArgs::default(),
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
            incoming: None,
            incoming_exit: None,
            machine: None,
            upgrade_requests: 0,
            upgrade_to: None,
            control: None,
            control_clients: Vec::new(),
            waiters: Vec::new(),
            started: Instant::now(),
            last_upgrade: None,
            upgrading: false,
            relays,
            stderr_relay: std::collections::HashMap::new(),
            child_out,
            null,
            exit: None,
            retired: Vec::new(),
            proxy,
            ptys,
            probes: Default::default(),
            check_requests: Vec::new(),
            config,
        };
        match Control::bind(&control::run_dir(), std::process::id()) {
            Ok(c) => {
                let fd = c.raw_fd();
                sup.poll
                    .registry()
                    .register(
                        &mut SourceFd(&fd),
                        Token::Control.to_mio(),
                        Interest::READABLE,
                    )
                    .map_err(SupervisorError::Poll)?;
                sup.control = Some(c);
            }
            // The VM runs regardless; SIGUSR2 still upgrades it.
            Err(e) => eprintln!(
                "{}: qemu-liveupgrade: no control socket in {}: {e}",
                crate::resolve::invoked_name(&sup.config.argv0).to_string_lossy(),
                control::run_dir().display()
            ),
        }
        for i in 0..sup.relays.len() {
            sup.register_relay(i).map_err(SupervisorError::Poll)?;
        }
        Ok(sup)
    }

    /// Starts a later generation with the layout's fds and registers its private monitor. Its
    /// stderr goes through a relay, so a failed start can be reported in QEMU's own words.
    pub(crate) fn spawn_generation(
        &mut self,
        number: u32,
        binary: Binary,
        args: &GenArgs,
    ) -> Result<Generation, GenerationError> {
        let (r, w) = relay::pipe().map_err(|e| GenerationError::Socket(e.into()))?;
        let mut stdio = child_stdio(&self.null, &self.child_out);
        stdio.fds[2] = Some(w.as_fd());
        let sockets = Sockets {
            proxy: &mut self.proxy,
            ptys: &mut self.ptys,
        };
        let gen = spawn_registered(
            self.poll.registry(),
            sockets,
            &self.config,
            stdio,
            number,
            binary,
            args,
        )?;
        drop(w);
        self.relays.push(Relay::new(r, 2));
        self.register_relay(self.relays.len() - 1)
            .map_err(GenerationError::Socket)?;
        self.stderr_relay.insert(number, self.relays.len() - 1);
        Ok(gen)
    }

    fn register_relay(&mut self, i: usize) -> io::Result<()> {
        let fd = self.relays[i].raw_fd();
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token::Relay(i).to_mio(),
            Interest::READABLE,
        )
    }

    /// The last line generation `number` wrote on stderr, once everything it wrote is read.
    pub(crate) fn last_stderr_line(&mut self, number: u32) -> Option<String> {
        let prefix = format!(
            "{}: ",
            crate::resolve::invoked_name(&self.config.argv0).to_string_lossy()
        );
        let relay = &mut self.relays[*self.stderr_relay.get(&number)?];
        relay.pump();
        relay.last_line(&prefix)
    }

    /// Runs until QEMU exits; returns how it ended.
    pub fn run(mut self) -> Result<Exit, SupervisorError> {
        match self.handshake(Which::Current, None) {
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
        loop {
            if let Some(exit) = self.exit {
                self.drain_relays();
                // QEMU's last words (its SHUTDOWN event) reach monitor clients before they see
                // EOF: libvirt treats EOF without SHUTDOWN as a crash.
                self.proxy.flush(Instant::now() + Duration::from_secs(1));
                self.ptys.flush(Instant::now() + Duration::from_secs(1));
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
            if self.upgrade_requests > 0 {
                self.upgrade_requests = 0;
                let to = self.upgrade_to.take();
                let report = self.upgrade(to);
                self.report(report);
                continue;
            }
            self.pump(None).map_err(SupervisorError::Poll)?;
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
        let machines = self
            .call(Which::Current, "query-machines", None, None)
            .ok()?;
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

    /// Waits for a generation's greeting, negotiates its monitor and reads its version. QEMU
    /// dispatches monitor commands only from its main loop, which it enters after creating
    /// every chardev, so a reply here means every user monitor socket already listens.
    pub(crate) fn handshake(
        &mut self,
        which: Which,
        deadline: Option<Instant>,
    ) -> Result<(), CallError> {
        loop {
            if self.gen_mut(which).qmp.take_greeting().is_some() {
                break;
            }
            self.check_alive(which)?;
            self.pump(remaining(deadline, "greeting")?)
                .map_err(CallError::Poll)?;
        }
        self.call(which, "qmp_capabilities", None, deadline)?;
        let version = self.call(which, "query-version", None, deadline)?;
        self.gen_mut(which).version = Some(version);
        Ok(())
    }

    pub(crate) fn gen(&self, which: Which) -> &Generation {
        match which {
            Which::Current => &self.current,
            Which::Incoming => self.incoming.as_ref().expect("no incoming generation"),
        }
    }

    pub(crate) fn gen_mut(&mut self, which: Which) -> &mut Generation {
        match which {
            Which::Current => &mut self.current,
            Which::Incoming => self.incoming.as_mut().expect("no incoming generation"),
        }
    }

    fn check_alive(&self, which: Which) -> Result<(), CallError> {
        let exited = match which {
            Which::Current => self.exit.is_some(),
            Which::Incoming => self.incoming_exit.is_some(),
        };
        if exited {
            return Err(CallError::Exited);
        }
        if self.gen(which).qmp.is_closed() {
            return Err(QmpError::Closed.into());
        }
        Ok(())
    }

    /// Sends a command on a generation's private monitor and waits for its reply, serving
    /// the loop meanwhile.
    pub fn call(
        &mut self,
        which: Which,
        command: &str,
        args: Option<Value>,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        self.call_with_fd(which, command, args, None, deadline)
    }

    /// [`Supervisor::call`] passing an fd with SCM_RIGHTS (`getfd`).
    pub fn call_with_fd(
        &mut self,
        which: Which,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        self.check_alive(which)?;
        let id = self.gen_mut(which).qmp.send_with_fd(command, args, fd)?;
        loop {
            if let Some(result) = self.gen_mut(which).qmp.take_reply(id) {
                return result.map_err(|e| qmp::command_error(command, &e).into());
            }
            self.check_alive(which)?;
            self.pump(remaining(deadline, command)?)
                .map_err(CallError::Poll)?;
        }
    }

    /// Serves the loop until `done` holds or the deadline passes.
    pub(crate) fn wait_until(
        &mut self,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&mut Supervisor) -> bool,
    ) -> Result<(), CallError> {
        while !done(self) {
            self.pump(remaining(Some(deadline), what)?)
                .map_err(CallError::Poll)?;
        }
        Ok(())
    }

    /// Kills the incoming generation and waits until it is reaped.
    pub(crate) fn kill_incoming(&mut self) {
        // Even when the new QEMU never started: its pty sockets may have been made.
        self.ptys.abort(self.poll.registry());
        let Some(gen) = self.incoming.as_ref() else {
            return;
        };
        let pid = gen.pid;
        let fd = gen.qmp.raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        if self.incoming_exit.is_none() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            let _ = self.wait_until("reaping the new QEMU", deadline, |s| {
                s.incoming_exit.is_some()
            });
        }
        self.incoming = None;
        self.incoming_exit = None;
    }

    /// Makes the incoming generation current. The old one is returned for the caller to end;
    /// from here on its exit no longer ends the VM.
    pub(crate) fn promote_incoming(&mut self) -> Generation {
        let new = self.incoming.take().expect("no incoming generation");
        self.ptys.commit(self.poll.registry(), new.number);
        let old = std::mem::replace(&mut self.current, new);
        let fd = old.qmp.raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        self.retired.push(old.pid);
        old
    }

    /// Waits once for events and handles them.
    fn pump(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut tokens = Vec::new();
        for event in self.events.iter() {
            if self.proxy.owns(event.token()) {
                self.proxy.handle(self.poll.registry(), event);
            } else {
                tokens.push(Token::from_mio(event.token()));
            }
        }
        for token in tokens {
            match token {
                Token::Signals => self.on_signals(),
                Token::Relay(i) => self.on_relay(i),
                Token::Monitor(n) => self.on_monitor(n),
                Token::TapGuard(n) => self.on_tap_guard(n),
                Token::Pty(i) => self.ptys.handle(i),
                Token::Control => self.on_control(),
                Token::Probe => self.on_probe(),
                Token::ControlClient(i) => self.on_control_client(i),
            }
        }
        Ok(())
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGCHLD => self.reap(),
                SIGUSR2 => self.upgrade_requests += 1,
                sig => {
                    if let Ok(sig) = Signal::try_from(sig) {
                        let _ = nix::sys::signal::kill(self.current.pid, sig);
                    }
                }
            }
        }
    }

    /// Reaps every exited child; SIGCHLD is coalesced, so one wake-up may stand for several.
    fn reap(&mut self) {
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if pid == self.current.pid {
                self.exit = Some(exit);
            } else if self.incoming.as_ref().map(|g| g.pid) == Some(pid) {
                self.incoming_exit = Some(exit);
            } else {
                self.retired.retain(|p| *p != pid);
            }
        }
    }

    fn on_monitor(&mut self, number: u32) {
        let gen = if self.current.number == number {
            &mut self.current
        } else {
            match self.incoming.as_mut() {
                Some(g) if g.number == number => g,
                _ => return,
            }
        };
        let result = gen.qmp.on_readable();
        if !self.upgrading {
            // The journal learns of completed device removals (DEVICE_DELETED) here too, even
            // when no client is connected to see them.
            for event in gen.qmp.take_events() {
                self.proxy.note_event(&event);
            }
        }
        if result.is_err() || gen.qmp.is_closed() {
            let fd = gen.qmp.raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    fn on_tap_guard(&mut self, number: u32) {
        let gen = match self.incoming.as_mut() {
            Some(g) if g.number == number => g,
            _ if self.current.number == number => &mut self.current,
            _ => return,
        };
        if let Some(guard) = gen.tap_guard.as_mut() {
            if !guard.on_readable() {
                let fd = guard.raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
        }
    }

    fn on_relay(&mut self, i: usize) {
        let relay = &mut self.relays[i];
        if relay.is_open() && !relay.pump() {
            let fd = relay.raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    /// Copies what QEMU wrote just before exiting, so its last error reaches the caller.
    fn drain_relays(&mut self) {
        for relay in self.relays.iter_mut().filter(|r| r.is_open()) {
            relay.pump();
        }
    }

    /// Whether the current generation has exited, which ends the VM.
    pub(crate) fn has_exited(&self) -> bool {
        self.exit.is_some()
    }

    /// Whether a retired generation's process is still to be reaped.
    pub(crate) fn is_retired_alive(&self, pid: Pid) -> bool {
        self.retired.contains(&pid)
    }
}

/// Time left until `deadline`, or a timeout error naming `what`.
fn remaining(deadline: Option<Instant>, what: &str) -> Result<Option<Duration>, CallError> {
    match deadline {
        None => Ok(None),
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(CallError::Timeout(what.to_owned())),
        },
    }
}
