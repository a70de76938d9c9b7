//! Every socket a VM listens on, and who holds it across upgrades.
//!
//! A QEMU that listens on a TCP port, a display port or a socket path keeps it until it
//! exits, so the next generation, started beside it, could not listen there. The launcher
//! therefore holds the VM's listeners itself, bound once:
//! - monitors and socket chardevs, unix or TCP, are served by the [`crate::proxy`], which
//!   relays each client to the generation running the guest ([`crate::monitors`]);
//! - VNC and SPICE ports: the launcher accepts, QEMU takes each connection over whole with
//!   `add_client` ([`graphics`], [`handoff`]);
//! - user-mode networking's forwards stay QEMU's, and each new generation gets them back once
//!   the old one has let go of them ([`hostfwd`]).
//!
//! What none of that can carry is named, before anything is tried, by [`blockers`] (an
//! upgrade is refused) and [`caveats`] (it goes ahead; this is what users see).

pub mod graphics;
mod handoff;
pub mod hostfwd;
pub mod inet;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::cmdline::CmdLine;
use crate::generation::Base;
use crate::monitors::{self, ListenOn};
use crate::proxy::{Listen, Proxy};
use crate::resources::{resources, SocketAddr};
use crate::verdict::Reason;
use graphics::{Display, Public, Published};

/// A reason a VM cannot be upgraded, or a note on what an upgrade does not keep: the
/// verdict's own ([`crate::verdict`]).
pub type Blocker = Reason;

/// Something an upgrade does not keep although it goes ahead, said in advance: a note of
/// the verdict.
pub type Caveat = Reason;

/// What keeps the VM of `cmd` from being upgraded, listener by listener (a check of
/// [`crate::verdict::CHECKS`]).
pub fn blockers(cmd: &CmdLine) -> Vec<Blocker> {
    let mut out = graphics::blockers(cmd);
    out.extend(hostfwd::blockers(cmd));
    out.extend(vhost_user_blockers(cmd));
    out.extend(socket_blockers(cmd));
    out
}

/// What an upgrade of `cmd`'s VM does to the users of its listeners (notes of the verdict,
/// [`crate::verdict::NOTES`]).
pub fn caveats(cmd: &CmdLine) -> Vec<Caveat> {
    let mut out: Vec<Caveat> = graphics::find(cmd)
        .iter()
        .map(|d| {
            Caveat::new(
                format!("-{}", d.protocol.name()),
                "a viewer connected during an upgrade is disconnected when the old QEMU goes; \
                 it can connect again at once to the same port, where the new QEMU serves it",
            )
        })
        .collect();
    out.extend(hostfwd::caveats(cmd));
    out
}

/// vhost-user devices: their backend's session (memory table, vring fds, negotiated state)
/// belongs to the running QEMU, which keeps the socket (the launcher never relays it).
fn vhost_user_blockers(cmd: &CmdLine) -> Vec<Blocker> {
    let netdevs = cmd
        .opts("netdev")
        .filter(|o| o.parse_arg().and_then(|a| a.get("type")).as_deref() == Some("vhost-user"));
    let devices = cmd.opts("device").filter(|o| {
        o.parse_arg()
            .and_then(|a| a.get("driver"))
            .is_some_and(|d| d.starts_with("vhost-user"))
    });
    netdevs
        .chain(devices)
        .map(|o| {
            Blocker::about(
                o,
                "a vhost-user backend is connected to the running QEMU, which sends it the \
                 guest's memory and vring fds: a new QEMU would need a second session with \
                 the backend (QEMU waits for its backend at start), and the backend would have \
                 to move its device state between the two",
            )
        })
        .collect()
}

/// Socket servers left to QEMU that a new QEMU could not listen on beside the old one, or
/// whose clients would lose their session: TCP servers the launcher does not serve (gdb
/// stub, `-netdev socket,listen=`, `-netdev stream,server=on`, TLS or websocket chardevs),
/// and unix ones with a session layer.
fn socket_blockers(cmd: &CmdLine) -> Vec<Blocker> {
    let served: Vec<String> = monitors::find(cmd)
        .iter()
        .map(|p| p.listen.to_string())
        .collect();
    let vhost_user = monitors::vhost_user_chardevs(cmd);
    let mut out = Vec::new();
    for s in resources(cmd).sockets.iter().filter(|s| s.server) {
        if s.id.as_ref().is_some_and(|id| vhost_user.contains(id)) {
            continue;
        }
        let reason = match (&s.address, s.option.as_str()) {
            (_, "netdev") => {
                "a socket netdev's peer connection belongs to the QEMU that accepted it, and \
                 its frame stream cannot be split between two QEMUs; the peer would have to \
                 connect again"
            }
            (SocketAddr::Tcp { host, port }, option) => {
                let listen = port.parse().ok().map(|port| {
                    ListenOn::Tcp(inet::Endpoint {
                        host: host.clone(),
                        port,
                        to: None,
                        ipv4: None,
                        ipv6: None,
                    })
                    .to_string()
                });
                if listen.is_some_and(|l| served.contains(&l)) {
                    continue;
                }
                if matches!(option, "gdb" | "s") {
                    "the gdb stub's port stays QEMU's: the next QEMU could not bind it while the \
                     running one holds it"
                } else {
                    "this TCP server stays QEMU's (TLS, websocket or telnet-3270 sessions, or a \
                     port given by name): the next QEMU could not bind it while the running one \
                     holds it"
                }
            }
            (SocketAddr::Unix(path), _) => {
                if served.contains(&format!("unix:{}", path.display())) {
                    continue;
                }
                "this socket server stays QEMU's (a TLS or websocket session layer): its \
                 clients would lose their session to the next QEMU"
            }
            (SocketAddr::Fd(fd), _) => {
                if served.contains(&format!("fd:{fd}")) {
                    continue;
                }
                "this socket server stays QEMU's (a TLS or websocket session layer): its \
                 clients would lose their session to the next QEMU"
            }
        };
        let id =
            s.id.as_ref()
                .map(|i| format!(" id={i}"))
                .unwrap_or_default();
        out.push(Blocker::new(
            format!("-{}{id} ({})", s.option, s.address),
            reason,
        ));
    }
    out
}

/// A listener that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what}")]
pub struct ListenError {
    /// The socket path, fd or address.
    pub what: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Binds and serves every listener the launcher holds for the VM of `base`: its monitors and
/// socket chardevs, then its displays. Call once, before the first generation starts.
pub fn listen(proxy: &mut Proxy, registry: &mio::Registry, base: &Base) -> Result<(), ListenError> {
    for p in &base.proxied {
        let what = p.listen.to_string();
        let err = |source| ListenError {
            what: what.clone(),
            source,
        };
        let listen = match &p.listen {
            ListenOn::Path(path) => Listen::Path(path.clone()),
            // SAFETY: the fd was inherited open (the layout checked it) and nothing else in
            // this process uses it: it is not passed on to QEMU, only served from here.
            ListenOn::Fd(fd) => Listen::Fd(unsafe { OwnedFd::from_raw_fd(*fd) }),
            ListenOn::Tcp(ep) => {
                let mut bound = inet::bind(ep, false).map_err(err)?;
                Listen::Tcp(bound.remove(0))
            }
        };
        proxy
            .add(registry, listen, p.mode)
            .map_err(|source| ListenError {
                what: what.clone(),
                source,
            })?;
    }
    if base.displays.is_empty() {
        return Ok(());
    }
    let mut published = Published {
        dir: proxy.private_dir().map_err(|source| ListenError {
            what: "the launcher's private directory".into(),
            source,
        })?,
        vnc: None,
        spice: None,
    };
    for d in &base.displays {
        let (listens, public) = bind_display(d)?;
        match d.protocol {
            graphics::Protocol::Vnc => published.vnc = Some(public),
            graphics::Protocol::Spice => published.spice = Some(public),
        }
        proxy
            .add_display(registry, listens, d.protocol.name())
            .map_err(|source| ListenError {
                what: format!("-{}", d.protocol.name()),
                source,
            })?;
    }
    graphics::publish(published);
    Ok(())
}

/// Binds one display's sockets, with the address its query replies report.
fn bind_display(d: &Display) -> Result<(Vec<Listen>, Public), ListenError> {
    match &d.listen {
        graphics::Listen::Path(path) => {
            Ok((vec![Listen::Path(path.clone())], Public::Path(path.clone())))
        }
        graphics::Listen::Tcp { endpoint, all } => {
            let bound = inet::bind(endpoint, *all).map_err(|source| ListenError {
                what: format!("-{} {endpoint}", d.protocol.name()),
                source,
            })?;
            let first = bound
                .first()
                .and_then(inet::local)
                .ok_or_else(|| ListenError {
                    what: format!("-{} {endpoint}", d.protocol.name()),
                    source: io::ErrorKind::AddrNotAvailable.into(),
                })?;
            let given = if endpoint.host.is_empty() {
                "*".to_owned()
            } else {
                endpoint.host.clone()
            };
            Ok((
                bound.into_iter().map(Listen::Tcp).collect(),
                Public::Tcp(first, given),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::parse;

    fn options(b: &[Blocker]) -> Vec<&str> {
        b.iter().map(|b| b.option.as_str()).collect()
    }

    #[test]
    fn a_script_vm_with_vnc_hostfwd_and_tcp_qmp_has_no_blockers_but_caveats() {
        let cmd = parse(&[
            "-vnc",
            ":47",
            "-netdev",
            "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22",
            "-qmp",
            "tcp:127.0.0.1:4444,server=on,wait=off",
            "-serial",
            "telnet::4555,server,nowait",
        ]);
        assert_eq!(blockers(&cmd), []);
        assert_eq!(
            caveats(&cmd)
                .iter()
                .map(|c| c.option.as_str())
                .collect::<Vec<_>>(),
            ["-vnc", "hostfwd=tcp:127.0.0.1:2222-:22"]
        );
    }

    #[test]
    fn listeners_only_qemu_can_hold_are_named() {
        let cmd = parse(&[
            "-chardev",
            "socket,id=vu0,path=/run/vu.sock,server=on",
            "-netdev",
            "vhost-user,id=n1,chardev=vu0",
            "-device",
            r#"{"driver":"vhost-user-fs-pci","chardev":"fs0","tag":"t"}"#,
            "-netdev",
            "socket,id=n2,listen=:1234",
            "-gdb",
            "tcp::1235",
            "-chardev",
            "socket,id=t0,host=127.0.0.1,port=4446,server=on,tls-creds=tls0",
            "-spice",
            "port=5901,tls-port=5902",
        ]);
        let b = blockers(&cmd);
        assert_eq!(
            options(&b),
            [
                "-spice port=5901",
                "-netdev vhost-user",
                "-device vhost-user-fs-pci",
                "-netdev id=n2 (tcp::1234)",
                "-gdb (tcp::1235)",
                "-chardev id=t0 (tcp:127.0.0.1:4446)",
            ],
            "{b:#?}"
        );
    }

    #[test]
    fn served_sockets_are_not_blockers() {
        let cmd = parse(&[
            "-chardev",
            "socket,id=charmonitor,fd=28,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-chardev",
            "socket,id=c1,host=,port=4447,server=on,wait=off",
            "-chardev",
            "socket,id=c2,path=/tmp/c2.sock,server=on,wait=off",
            "-spice",
            "port=5901,addr=127.0.0.1,disable-ticketing=on",
        ]);
        assert_eq!(blockers(&cmd), []);
    }
}
