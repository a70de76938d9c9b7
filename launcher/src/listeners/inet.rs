//! TCP addresses QEMU would listen on, and listening sockets bound the way QEMU binds them.
//!
//! The launcher binds a VM's TCP listeners once, in place of QEMU: a second QEMU cannot bind a
//! port the first one holds. It binds them as QEMU would (`inet_listen_saddr` in
//! `util/qemu-sockets.c`): every address the host resolves to is tried in order, `SO_REUSEADDR`
//! set, a port range (`to=`) tried port by port, and an IPv6 socket made dual-stack unless
//! `ipv4=`/`ipv6=` restrict it, falling back to IPv6 only when the IPv4 port is taken. A
//! chardev stops at the first address that binds; VNC listens on every address
//! (`qio_net_listener_open_sync`).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};

/// A TCP address as QEMU's options give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or numeric address, brackets removed; empty for every address.
    pub host: String,
    /// The first port to try.
    pub port: u16,
    /// The last port to try (`to=`), when a range is given.
    pub to: Option<u16>,
    /// `ipv4=`, when given.
    pub ipv4: Option<bool>,
    /// `ipv6=`, when given.
    pub ipv6: Option<bool>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "tcp:[{}]:{}", self.host, self.port)
        } else {
            write!(f, "tcp:{}:{}", self.host, self.port)
        }
    }
}

/// Splits `HOST:PORT` (`[V6]:PORT`, `:PORT`) as `inet_parse` does: the port after the last
/// colon, a bracketed host unwrapped. `None` without a colon.
pub fn split_host_port(s: &str) -> Option<(String, String)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_owned(), port.to_owned()));
    }
    let (host, port) = s.rsplit_once(':')?;
    Some((host.to_owned(), port.to_owned()))
}

/// A port QEMU would accept for listening: a number. Service names are left to QEMU.
pub fn parse_port(s: &str) -> Option<u16> {
    s.parse().ok()
}

/// The addresses to try for `host`, in the order QEMU tries them: the wildcard addresses for
/// an empty host (IPv4 first, as getaddrinfo(3) gives them for `AI_PASSIVE`), else what the
/// resolver says, restricted by `ipv4=`/`ipv6=`.
fn candidates(ep: &Endpoint) -> io::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = if ep.host.is_empty() {
        vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
    } else if let Ok(ip) = ep.host.parse::<IpAddr>() {
        vec![ip]
    } else {
        (ep.host.as_str(), 0)
            .to_socket_addrs()?
            .map(|a| a.ip())
            .collect()
    };
    // QEMU's family choice (`inet_ai_family_from_address`): both on means either family;
    // otherwise `ipv6=on` or `ipv4=off` means IPv6 alone, `ipv4=on` or `ipv6=off` IPv4 alone.
    let (v4, v6) = (ep.ipv4, ep.ipv6);
    if v4 != Some(true) || v6 != Some(true) {
        if v6 == Some(true) || v4 == Some(false) {
            ips.retain(IpAddr::is_ipv6);
        } else if v4 == Some(true) || v6 == Some(false) {
            ips.retain(IpAddr::is_ipv4);
        }
    }
    let mut seen = Vec::new();
    ips.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
    if ips.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("address resolution failed for {}", ep.host),
        ));
    }
    Ok(ips)
}

/// Whether an IPv6 socket also takes IPv4 (QEMU's `try_bind`): unless exactly one family
/// was asked for.
fn dual_stack(ep: &Endpoint) -> bool {
    matches!((ep.ipv4, ep.ipv6), (None, None) | (Some(true), Some(true)))
}

fn bind_one(ip: IpAddr, port: u16, dual: bool) -> Result<OwnedFd, Errno> {
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let bound = match ip {
        IpAddr::V4(v4) => socket::bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(v4, port)),
        ),
        IpAddr::V6(v6) => {
            let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(v6, port, 0, 0));
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &!dual)?;
            match socket::bind(fd.as_raw_fd(), &addr) {
                // The IPv4 side of the port is taken: IPv6 alone, as QEMU retries.
                Err(Errno::EADDRINUSE) if dual => {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                    socket::bind(fd.as_raw_fd(), &addr)
                }
                other => other,
            }
        }
    };
    bound?;
    socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// Binds `ep` as QEMU would: the first port of the range that binds, on the first address
/// that binds, or (`all`) on every address. Listeners are non-blocking and close-on-exec.
pub fn bind(ep: &Endpoint, all: bool) -> io::Result<Vec<TcpListener>> {
    let ips = candidates(ep)?;
    let last = ep.to.unwrap_or(ep.port).max(ep.port);
    let mut bound = Vec::new();
    let mut error = Errno::EADDRINUSE;
    for ip in ips {
        for port in ep.port..=last {
            match bind_one(ip, port, dual_stack(ep)) {
                Ok(fd) => {
                    bound.push(TcpListener::from(fd));
                    break;
                }
                Err(e) => error = e,
            }
        }
        if !all && !bound.is_empty() {
            break;
        }
    }
    if bound.is_empty() {
        return Err(io::Error::from(error));
    }
    Ok(bound)
}

/// Where a bound listener ended up, as `query-vnc` reports a listener's address.
pub fn local(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            to: None,
            ipv4: None,
            ipv6: None,
        }
    }

    #[test]
    fn splits_host_and_port_as_qemu() {
        let s = |h: &str, p: &str| Some((h.to_owned(), p.to_owned()));
        assert_eq!(split_host_port("127.0.0.1:5900"), s("127.0.0.1", "5900"));
        assert_eq!(split_host_port(":47"), s("", "47"));
        assert_eq!(split_host_port("[::1]:2"), s("::1", "2"));
        assert_eq!(split_host_port("localhost:4444"), s("localhost", "4444"));
        assert_eq!(split_host_port("5900"), None);
    }

    #[test]
    fn binds_loopback_then_refuses_the_taken_port_and_moves_up_a_range() {
        let first = bind(&ep("127.0.0.1", 0), false).unwrap();
        let port = local(&first[0]).unwrap().port();
        let again = bind(&ep("127.0.0.1", port), false).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EADDRINUSE));
        let mut ranged = ep("127.0.0.1", port);
        ranged.to = Some(port.saturating_add(20));
        let next = bind(&ranged, false).unwrap();
        let got = local(&next[0]).unwrap().port();
        assert!(got > port && got <= port + 20, "{got} after {port}");
    }

    #[test]
    fn families_follow_ipv4_and_ipv6_flags() {
        let mut e = ep("", 0);
        assert_eq!(candidates(&e).unwrap().len(), 2);
        assert!(dual_stack(&e));
        e.ipv4 = Some(true);
        assert_eq!(
            candidates(&e).unwrap(),
            [IpAddr::from(Ipv4Addr::UNSPECIFIED)]
        );
        e.ipv4 = None;
        e.ipv6 = Some(true);
        assert_eq!(
            candidates(&e).unwrap(),
            [IpAddr::from(Ipv6Addr::UNSPECIFIED)]
        );
        assert!(!dual_stack(&e));
    }
}
