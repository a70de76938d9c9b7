//! The supervisor as a handover writes and reads it ([`crate::handover`]): what it holds
//! itself (the VM's resources, the running generation, its loop's sources, the requests it
//! took), each owner's part written and read by that owner.

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use nix::sys::signal::SigSet;
use signal_hook_mio::v1_0::Signals;

use super::{Supervisor, FORWARDED};
use crate::child::InheritedSignals;
use crate::config::{Config, Settings};
use crate::control::{Client, Control};
use crate::daemonize::{Daemon, Pidfile};
use crate::generation::{Base, Generation};
use crate::handover::fds::Take;
use crate::handover::state::{self, Fd, Text};
use crate::handover::{millis, since, Handovers, ImportError};
use crate::proxy::Proxy;
use crate::ptys::PtyRelay;
use crate::relay::Relay;
use crate::resolve::Binary;
use crate::taps::OpenTap;
use crate::token::Token;

/// What the handover adds to the supervisor's own state when it writes it.
pub(crate) struct Extra<'a> {
    /// The launcher's own signal mask before the handover blocked its signals.
    pub(crate) mask: &'a SigSet,
    /// The clients that asked for this handover.
    pub(crate) clients: &'a [Client],
    /// The old executable, open, for the new image to go back to.
    pub(crate) fallback: Option<Fd>,
    /// The handover under way, when the state is written for the exec.
    pub(crate) handover: Option<state::Handover>,
}

impl Supervisor {
    /// Everything the launcher holds, as the handed-over state; `Err` says why it cannot be
    /// handed over now. Nothing changes here: on any later failure the launcher goes on.
    pub(crate) fn export_state(&self, extra: &Extra<'_>) -> Result<state::State, String> {
        if self.upgrading {
            return Err("a QEMU upgrade is under way".into());
        }
        if let Some(old) = self.ending.first() {
            return Err(format!(
                "an old QEMU (pid {}) is still being reaped",
                old.pid
            ));
        }
        if self.current.exit.is_some() {
            return Err("QEMU has exited".into());
        }
        if self.current.exec.is_some() {
            return Err("QEMU is still starting".into());
        }
        if self.probes.active.is_some() {
            return Err("a new QEMU is being asked what it accepts".into());
        }
        if self.config.daemon.as_ref().is_some_and(Daemon::is_waiting) {
            return Err("the VM is still starting".into());
        }
        if !self.deferred.is_empty() {
            return Err("signals for QEMU wait for an upgrade to end".into());
        }
        let proxy = self.proxy.export().map_err(str::to_owned)?;
        let ptys = self
            .ptys
            .export()
            .ok_or("console input is held for a QEMU being started")?;
        let config = &self.config;
        let vm = state::Vm {
            argv0: Text::of(&config.argv0),
            args: std::env::args_os().skip(1).map(|a| Text::of(&a)).collect(),
            inherited: config.base.inherited.clone(),
            plan: crate::handover::plan(&config.base),
            ram: config.ram.iter().map(Fd::of).collect(),
            taps: config.taps.iter().map(OpenTap::export).collect(),
            signals: config.signals.export(),
            supervisor_mask: crate::child::members(extra.mask),
            first_binary: config.binary.export(),
            daemonized: config.daemon.is_some(),
            outputs: self.outputs.iter().map(Relay::export).collect(),
            child_out: self.child_out.iter().map(Fd::of).collect(),
            pidfile: config.pidfile.as_ref().map(Pidfile::export),
            machine: self.machine.clone(),
            uptime_ms: millis(self.started.elapsed()),
            last_upgrade: self.last_upgrade.clone(),
            published: crate::listeners::graphics::export_published(),
            exe: self.handovers.exe.as_deref().map(Text::path),
            job_stop: self.job_stop,
            fault_armed: self.fault.is_some(),
            stdio: crate::stdio::export(),
        };
        let requests = state::Requests {
            upgrades: self.upgrade_requests,
            upgrade_to: self.upgrade_to.as_deref().map(Text::path),
            waiters: self.waiters.iter().map(Client::export).collect(),
            checks: self
                .check_requests
                .iter()
                .map(|(c, to)| (c.export(), to.as_deref().map(Text::path)))
                .collect(),
            handovers: self
                .handovers
                .requests
                .iter()
                .map(|(c, to)| (c.export(), to.as_deref().map(Text::path)))
                .collect(),
            handed_over: extra.clients.iter().map(Client::export).collect(),
        };
        let mut state = state::State {
            format: state::FORMAT.into(),
            version: state::VERSION,
            from: crate::handover::this_supervisor(),
            written_unix_us: crate::handover::unix_us(),
            fds: Vec::new(),
            fallback_exe: extra.fallback,
            handover: extra.handover.clone(),
            vm,
            current: self.current.export(),
            proxy,
            ptys,
            control: self.control.as_ref().map(Control::export),
            requests,
            history: self.handovers.history.clone(),
            supervisor_upgrades: self.handovers.done,
        };
        state.fds = crate::handover::fds::named(&state);
        crate::handover::fds::check_listed(&state).map_err(|e| e.to_string())?;
        Ok(state)
    }

    /// The supervisor a handover brought, for the VM `base` was planned for (checked against
    /// the state already). Every fd is taken from the state and registered in a new loop; the
    /// caller restores the launcher's signal mask once this returns.
    pub(crate) fn resume(s: state::State, base: Base) -> Result<Supervisor, ImportError> {
        let mut take = Take::new(&s);
        let poll = Poll::new().map_err(ImportError::io("the event loop"))?;
        let mut watched = vec![signal_hook::consts::SIGCHLD, signal_hook::consts::SIGUSR2];
        watched.extend(FORWARDED);
        let mut signals = Signals::new(watched).map_err(ImportError::io("signal handlers"))?;
        poll.registry()
            .register(&mut signals, Token::Signals.to_mio(), Interest::READABLE)
            .map_err(ImportError::io("signal handlers"))?;
        let registry = poll.registry();

        // The old binary was kept for going back; this image read the state, so it goes.
        if let Some(fd) = s.fallback_exe {
            drop(take.owned(fd)?);
        }
        let vm = s.vm;
        let ram = vm
            .ram
            .iter()
            .map(|fd| take.owned(*fd))
            .collect::<Result<Vec<_>, _>>()?;
        let mut taps = Vec::new();
        for t in &vm.taps {
            let fds = t
                .fds
                .iter()
                .map(|fd| take.owned(*fd))
                .collect::<Result<Vec<_>, _>>()?;
            taps.push(OpenTap::import(t, fds));
        }
        let pidfile = match &vm.pidfile {
            Some(p) => Some(Pidfile::import(p, take.owned(p.fd)?)),
            None => None,
        };
        let config = Config {
            argv0: vm.argv0.os(),
            base,
            ram,
            taps,
            ptys: Vec::new(),
            binary: Binary::import(&vm.first_binary),
            signals: InheritedSignals::import(&vm.signals),
            daemon: vm.daemonized.then(Daemon::reported),
            // Timeouts as the environment says, which is the old image's own.
            settings: Settings::from_env(|name| std::env::var_os(name)).unwrap_or_default(),
            pidfile,
        };
        let mut outputs = Vec::new();
        for (i, r) in vm.outputs.into_iter().enumerate() {
            let fd = take.owned(r.fd)?;
            let relay = Relay::import(r, fd);
            register(registry, relay.raw_fd(), Token::Output(i))?;
            outputs.push(relay);
        }
        let child_out = vm
            .child_out
            .iter()
            .map(|fd| take.owned(*fd))
            .collect::<Result<Vec<_>, _>>()?;
        let null = std::fs::File::open("/dev/null").map_err(ImportError::io("/dev/null"))?;
        crate::stdio::set_prefix(&crate::resolve::invoked_name(&config.argv0).to_string_lossy());
        crate::stdio::import(vm.stdio);
        let proxy = Proxy::import(s.proxy, &mut take, registry, Token::PROXY_BASE)?;
        let ptys = PtyRelay::import(s.ptys, &mut take, registry, |i| Token::Pty(i).to_mio())?;
        let current = Generation::import(s.current, &mut take)?;
        register(
            registry,
            current.qmp.raw_fd(),
            Token::Monitor(current.number),
        )?;
        if let Some(relay) = &current.stderr {
            register(registry, relay.raw_fd(), Token::Stderr(current.number))?;
        }
        if let Some(guard) = &current.tap_guard {
            register(registry, guard.raw_fd(), Token::TapGuard(current.number))?;
        }
        let control = match s.control {
            Some(c) => Some(Control::import(c, &mut take, registry)?),
            None => None,
        };
        let mut client = |c: state::Client| -> Result<Option<Client>, ImportError> {
            let fd = take.owned(c.fd)?;
            Ok(Client::import(c, fd).ok())
        };
        let r = s.requests;
        let mut waiters = Vec::new();
        for c in r.waiters {
            waiters.extend(client(c)?);
        }
        let mut check_requests = Vec::new();
        for (c, to) in r.checks {
            check_requests.extend(client(c)?.map(|c| (c, to.map(|t| t.to_path()))));
        }
        let mut handovers = Handovers::resumed(s.history, s.supervisor_upgrades);
        handovers.exe = vm.exe.as_ref().map(Text::to_path);
        for (c, to) in r.handovers {
            handovers
                .requests
                .extend(client(c)?.map(|c| (c, to.map(|t| t.to_path()))));
        }
        for c in r.handed_over {
            handovers.answer.extend(client(c)?);
        }
        if let Some(p) = &vm.published {
            crate::listeners::graphics::import_published(p);
        }
        let left = take.close_rest();
        if !left.is_empty() {
            crate::stderr_line(&format!(
                "{}: qemu-liveupgrade: closed fds the state listed but this build does not use: {left:?}",
                crate::resolve::invoked_name(&config.argv0).to_string_lossy()
            ));
        }
        let mut sup = Supervisor {
            poll,
            events: Events::with_capacity(64),
            signals,
            current,
            ending: Vec::new(),
            machine: vm.machine,
            upgrade_requests: r.upgrades,
            upgrade_to: r.upgrade_to.map(|t| t.to_path()),
            control,
            waiters,
            started: since(vm.uptime_ms),
            last_upgrade: vm.last_upgrade,
            upgrading: false,
            deferred: Vec::new(),
            interruptible: false,
            job_stop: vm.job_stop,
            fault: config.settings.fault.filter(|_| vm.fault_armed),
            outputs,
            child_out,
            null,
            proxy,
            ptys,
            probes: Default::default(),
            check_requests,
            handovers,
            config,
        };
        // A QEMU that exited while the images changed is reaped now; the SIGCHLD pending
        // since then wakes the loop once the mask is restored, and finds nothing more.
        sup.reap(None);
        Ok(sup)
    }

    /// Handles what signal-hook has caught and not yet delivered to the loop: the handover
    /// blocks the launcher's signals before it writes the state, and what came before that
    /// is acted on now, so that nothing caught is lost with the old image.
    pub(crate) fn take_caught_signals(&mut self) {
        self.on_signals(None);
    }
}

fn register(registry: &mio::Registry, fd: i32, token: Token) -> Result<(), ImportError> {
    registry
        .register(&mut SourceFd(&fd), token.to_mio(), Interest::READABLE)
        .map_err(ImportError::io("a launcher fd"))
}
