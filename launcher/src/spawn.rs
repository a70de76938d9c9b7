//! Starting one generation from inside the supervisor: every owner's fds placed at their
//! layout numbers (guest RAM, the proxy's and the ptys' per-generation sockets, taps), the tap
//! guard for every generation but the first, and its exec status, private monitor and stderr
//! registered in the loop. Nothing here waits: whether the child executed QEMU arrives later,
//! as an event, and the caller waits for it with a deadline.

use std::os::fd::{AsFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry};

use crate::config::Template;
use crate::generation::{generation_cmdline, Fds, GenArgs, Generation, GenerationError, Stdio};
use crate::listeners::graphics::Protocol;
use crate::proxy::Proxy;
use crate::ptys::PtyRelay;
use crate::relay::Relay;
use crate::resolve::Binary;
use crate::token::Token;

/// Where a generation's stdio goes: the launcher's own, or the relay pipes when daemonized.
pub(crate) fn child_stdio<'a>(null: &'a std::fs::File, child_out: &'a [OwnedFd]) -> Stdio<'a> {
    match child_out {
        [out, err] => Stdio {
            fds: [Some(null.as_fd()), Some(out.as_fd()), Some(err.as_fd())],
        },
        _ => Stdio::default(),
    }
}

/// What each generation gets from the supervisor besides the template: its own sockets
/// (listening ones for the proxy, connected ones for the ptys) and its stdio.
pub(crate) struct Plumbing<'a> {
    pub(crate) proxy: &'a mut Proxy,
    pub(crate) ptys: &'a mut PtyRelay,
    /// stdin when daemonized.
    pub(crate) null: &'a std::fs::File,
    /// The output pipes' write ends when daemonized, else nothing.
    pub(crate) child_out: &'a [OwnedFd],
    /// A signal the child sends itself just before exec (test fault hook).
    pub(crate) before_exec: Option<nix::sys::signal::Signal>,
}

/// Forks generation `number` with the layout's fds and registers its exec status and private
/// monitor. With `relay_stderr`, its stderr goes through a pipe of its own (closed with it),
/// so a failed start can be reported in QEMU's own words while the text still reaches the
/// launcher's stderr.
pub(crate) fn spawn_registered(
    registry: &Registry,
    plumbing: Plumbing<'_>,
    template: Template<'_>,
    number: u32,
    binary: Binary,
    args: &GenArgs,
    relay_stderr: bool,
) -> Result<Generation, GenerationError> {
    let layout = &template.base.layout;
    let stderr = match relay_stderr {
        true => Some(crate::fdio::pipe().map_err(|e| GenerationError::Socket(e.into()))?),
        false => None,
    };
    let mut stdio = child_stdio(plumbing.null, plumbing.child_out);
    if let Some((_, w)) = &stderr {
        stdio.fds[2] = Some(w.as_fd());
    }
    let backends = plumbing
        .proxy
        .backends_for(number)
        .map_err(GenerationError::Socket)?;
    // Its display servers listen on sockets of its own, made in the proxy's private directory.
    let mut args = args.clone();
    for d in &template.base.displays {
        let path = plumbing
            .proxy
            .display_socket(number, d.protocol.name())
            .map_err(GenerationError::Socket)?;
        match d.protocol {
            Protocol::Vnc => args.displays.vnc = Some(path),
            Protocol::Spice => args.displays.spice = Some(path),
        }
    }
    let cmd = generation_cmdline(template.base, &args);
    let pty_ends = plumbing
        .ptys
        .ends_for(registry, number)
        .map_err(GenerationError::Socket)?;
    let place = template
        .ram
        .iter()
        .map(|fd| fd.as_fd())
        .zip(layout.ram.iter().copied())
        .chain(
            backends
                .iter()
                .map(|fd| fd.as_fd())
                .zip(layout.monitors.iter().copied()),
        )
        .chain(
            template
                .taps
                .iter()
                .flat_map(|t| t.fds.iter().map(|fd| fd.as_fd()))
                .zip(layout.taps.iter().copied()),
        )
        .chain(
            pty_ends
                .iter()
                .map(|fd| fd.as_fd())
                .zip(layout.ptys.iter().copied()),
        );
    // Every generation but the first starts while another runs the guest on the same taps.
    let filter = crate::tapguard::program();
    let guarded = number > 1
        && !template.base.cmd.opts("netdev").any(|o| {
            // qemu-bridge-helper is setuid, which the filter's no_new_privs would defeat.
            o.parse_arg().and_then(|a| a.get("type")).as_deref() == Some("bridge")
        });
    let fds = Fds {
        layout,
        stdio,
        place: place.collect(),
        tap_guard: guarded.then_some(filter.as_slice()),
        before_exec: plumbing.before_exec,
    };
    let mut gen = Generation::spawn(number, binary, template.argv0, &cmd, &fds, template.signals)?;
    drop(fds);
    if let Some((r, _)) = stderr {
        gen.stderr = Some(Relay::new(r, 2));
    }
    register(registry, gen.qmp.raw_fd(), Token::Monitor(number))?;
    if let Some(exec) = &gen.exec {
        register(registry, exec.raw_fd(), Token::Exec(number))?;
    }
    if let Some(relay) = &gen.stderr {
        register(registry, relay.raw_fd(), Token::Stderr(number))?;
    }
    Ok(gen)
}

/// Registers a generation's tap guard, once it executed QEMU and the guard's listener came.
pub(crate) fn register_tap_guard(
    registry: &Registry,
    gen: &Generation,
) -> Result<(), GenerationError> {
    match &gen.tap_guard {
        Some(guard) => register(registry, guard.raw_fd(), Token::TapGuard(gen.number)),
        None => Ok(()),
    }
}

fn register(registry: &Registry, fd: i32, token: Token) -> Result<(), GenerationError> {
    registry
        .register(&mut SourceFd(&fd), token.to_mio(), Interest::READABLE)
        .map_err(GenerationError::Socket)
}
