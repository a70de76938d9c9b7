//! The sockets clients connect to, of either family: a monitor or display may listen on a
//! unix path or fd, or on a TCP port.
//!
//! The proxy reads and writes clients through their fds (`recvmsg`, `send`), which work the
//! same on both; only accepting and registering with the loop differ.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// A listening socket.
#[derive(Debug)]
pub(super) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// An accepted client.
#[derive(Debug)]
pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Accepts one client, non-blocking and close-on-exec. A TCP client gets `TCP_NODELAY`:
    /// the proxy writes whole messages, and a monitor round trip must not wait for a delayed
    /// acknowledgement.
    pub(super) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Sockets as a supervisor handover writes and reads them ([`crate::handover`]): the fd and
/// its family, which decides how the loop registers it.
impl Listener {
    pub(super) fn export(&self) -> (crate::handover::state::Fd, crate::handover::state::Family) {
        use crate::handover::state::{Family, Fd};
        match self {
            Listener::Unix(l) => (Fd::of(l), Family::Unix),
            Listener::Tcp(l) => (Fd::of(l), Family::Tcp),
        }
    }

    pub(super) fn import(
        fd: OwnedFd,
        family: crate::handover::state::Family,
    ) -> io::Result<Listener> {
        use crate::handover::state::Family;
        Ok(match family {
            Family::Unix => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l))
            }
            Family::Tcp => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l))
            }
        })
    }
}

impl Stream {
    pub(super) fn export(&self) -> (crate::handover::state::Fd, crate::handover::state::Family) {
        use crate::handover::state::{Family, Fd};
        match self {
            Stream::Unix(s) => (Fd::of(s), Family::Unix),
            Stream::Tcp(s) => (Fd::of(s), Family::Tcp),
        }
    }

    pub(super) fn import(
        fd: OwnedFd,
        family: crate::handover::state::Family,
    ) -> io::Result<Stream> {
        use crate::handover::state::Family;
        Ok(match family {
            Family::Unix => {
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(true)?;
                Stream::Unix(UnixStream::from_std(s))
            }
            Family::Tcp => {
                let s = std::net::TcpStream::from(fd);
                s.set_nonblocking(true)?;
                Stream::Tcp(TcpStream::from_std(s))
            }
        })
    }
}

impl From<Stream> for OwnedFd {
    fn from(s: Stream) -> OwnedFd {
        match s {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

macro_rules! delegate_source {
    ($ty:ident) => {
        impl Source for $ty {
            fn register(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                match self {
                    $ty::Unix(s) => s.register(registry, token, interests),
                    $ty::Tcp(s) => s.register(registry, token, interests),
                }
            }

            fn reregister(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                match self {
                    $ty::Unix(s) => s.reregister(registry, token, interests),
                    $ty::Tcp(s) => s.reregister(registry, token, interests),
                }
            }

            fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
                match self {
                    $ty::Unix(s) => s.deregister(registry),
                    $ty::Tcp(s) => s.deregister(registry),
                }
            }
        }
    };
}

delegate_source!(Listener);
delegate_source!(Stream);
