//! Starting one generation from inside the supervisor: every owner's fds placed at their
//! layout numbers (guest RAM, the proxy's and the ptys' per-generation sockets, taps), the tap
//! guard for every generation but the first, and its private monitor and guard registered in
//! the loop.

use std::os::fd::{AsFd, OwnedFd};

use mio::unix::SourceFd;
use mio::Interest;

use crate::generation::{generation_cmdline, Fds, GenArgs, Generation, GenerationError, Stdio};
use crate::proxy::Proxy;
use crate::ptys::PtyRelay;
use crate::resolve::Binary;
use crate::supervisor::{Config, Token};

/// Where a generation's stdio goes: the launcher's own, or the relay pipes when daemonized.
pub(crate) fn child_stdio<'a>(null: &'a std::fs::File, child_out: &'a [OwnedFd]) -> Stdio<'a> {
    match child_out {
        [out, err] => Stdio {
            fds: [Some(null.as_fd()), Some(out.as_fd()), Some(err.as_fd())],
        },
        _ => Stdio::default(),
    }
}

/// What makes each generation's own sockets: listening ones for the proxy, connected ones for
/// the ptys.
pub(crate) struct Sockets<'a> {
    pub(crate) proxy: &'a mut Proxy,
    pub(crate) ptys: &'a mut PtyRelay,
}

/// Starts a generation with the layout's fds and registers its private monitor.
pub(crate) fn spawn_registered(
    registry: &mio::Registry,
    sockets: Sockets<'_>,
    config: &Config,
    stdio: Stdio<'_>,
    number: u32,
    binary: Binary,
    args: &GenArgs,
) -> Result<Generation, GenerationError> {
    let cmd = generation_cmdline(&config.base, args);
    let layout = &config.base.layout;
    let backends = sockets
        .proxy
        .backends_for(number)
        .map_err(GenerationError::Socket)?;
    let pty_ends = sockets
        .ptys
        .ends_for(registry, number)
        .map_err(GenerationError::Socket)?;
    let place = config
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
            config
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
        && !config.base.cmd.opts("netdev").any(|o| {
            // qemu-bridge-helper is setuid, which the filter's no_new_privs would defeat.
            o.parse_arg().and_then(|a| a.get("type")).as_deref() == Some("bridge")
        });
    let fds = Fds {
        layout,
        stdio,
        place: place.collect(),
        tap_guard: guarded.then_some(filter.as_slice()),
    };
    let gen = Generation::spawn(number, binary, &config.argv0, &cmd, &fds, &config.signals)?;
    let fd = gen.qmp.raw_fd();
    registry
        .register(
            &mut SourceFd(&fd),
            Token::Monitor(number).to_mio(),
            Interest::READABLE,
        )
        .map_err(GenerationError::Socket)?;
    if let Some(guard) = &gen.tap_guard {
        let fd = guard.raw_fd();
        registry
            .register(
                &mut SourceFd(&fd),
                Token::TapGuard(number).to_mio(),
                Interest::READABLE,
            )
            .map_err(GenerationError::Socket)?;
    }
    Ok(gen)
}
