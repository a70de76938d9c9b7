//! The per-VM control socket that `qemu-liveupgrade upgrade|status|list` talk to.
//!
//! One unix socket per VM, `<pid>.sock`, mode 0600, in the directory of the launcher's uid
//! under `/run/qemu-liveupgrade/` (see [`crate::rundir`] for why that directory can be
//! trusted): whoever may upgrade a VM may also kill it, so only that uid and root may connect,
//! and the launcher drops any other peer (`SO_PEERCRED`). The protocol is one JSON request
//! line per connection, `{"execute":"status"}`, `{"execute":"upgrade","to":PATH|null}`,
//! `{"execute":"check","to":PATH|null}` or `{"execute":"upgrade-supervisor","to":PATH|null}`,
//! answered by JSON lines: a status object, or progress lines `{"progress":STEP}` and then
//! the report.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use serde_json::{json, Value};

use crate::rundir::{self, RunDir, RunDirError};
use crate::token::Token;

/// The name of the control socket of the VM whose launcher has `pid`.
pub fn socket_name(pid: u32) -> String {
    format!("{pid}.sock")
}

/// The launcher `pid` in `dir`'s socket, connected, once `SO_PEERCRED` says the process
/// listening there is that pid and runs as the directory's owner: a socket left by a launcher
/// that died, whose name another process of that uid bound again, is not taken for that VM.
pub fn connect(dir: &RunDir, pid: u32) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(dir.reach(&socket_name(pid)))?;
    let (uid, peer_pid) = rundir::peer(&stream)?;
    if uid != dir.owner() || peer_pid != pid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by pid {peer_pid} (uid {uid}), not by launcher {pid} (uid {})",
                dir.shown(&socket_name(pid)).display(),
                dir.owner()
            ),
        ));
    }
    Ok(stream)
}

/// Why a VM has no control socket (it runs regardless; SIGUSR2 still upgrades it).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No directory it may trust.
    #[error("no directory for it")]
    Dir(#[source] RunDirError),
    /// Its directory was taken by someone else, and root's repair failed.
    #[error("no directory for it, and it could not be reclaimed ({why})")]
    Unreclaimed {
        /// Why the repair failed.
        why: String,
        /// What was wrong with the directory.
        #[source]
        source: RunDirError,
    },
    /// bind(2), chmod(2) or the registration failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A request read from a control client.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Upgrade, to this binary or the one resolution finds.
    Upgrade(Option<PathBuf>),
    /// Start the new QEMU as an upgrade would, confirm it takes the VM, end it.
    Check(Option<PathBuf>),
    /// Hand the launcher over to a new qemu-liveupgrade binary, in place
    /// ([`crate::handover`]): to this one, or to the executable the launcher started from.
    Handover(Option<PathBuf>),
}

impl Request {
    /// The request line a client sends for it (without the line end).
    pub fn to_json(&self) -> Value {
        let to = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        match self {
            Request::Status => json!({"execute": "status"}),
            Request::Upgrade(p) => json!({"execute": "upgrade", "to": to(p)}),
            Request::Check(p) => json!({"execute": "check", "to": to(p)}),
            Request::Handover(p) => json!({"execute": "upgrade-supervisor", "to": to(p)}),
        }
    }
}

/// Reads one request line (without its line end): `InvalidData` for anything but a request.
pub fn parse_request(line: &[u8]) -> io::Result<Request> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let req: Value = serde_json::from_slice(line).map_err(invalid)?;
    let to = || req.get("to").and_then(Value::as_str).map(PathBuf::from);
    match req.get("execute").and_then(Value::as_str) {
        Some("status") => Ok(Request::Status),
        Some("upgrade") => Ok(Request::Upgrade(to())),
        Some("check") => Ok(Request::Check(to())),
        Some("upgrade-supervisor") => Ok(Request::Handover(to())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unknown request",
        )),
    }
}

/// One connected control client.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Reads what has arrived; returns the request once its line is complete, `Err` when the
    /// client went away or sent garbage.
    pub fn on_readable(&mut self) -> io::Result<Option<Request>> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if self.buf.len() > 65536 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request too long",
                ));
            }
        }
        let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        parse_request(self.buf.get(..end).unwrap_or_default()).map(Some)
    }

    /// Sends one JSON line without waiting: the CLI reads as it goes, and a few lines fit
    /// in the socket's buffer many times over. A client whose buffer is full stopped
    /// reading: `Err`, and the caller drops it rather than let it stall the VM's supervisor.
    pub fn send(&mut self, value: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        let mut rest = line.as_slice();
        while !rest.is_empty() {
            let n = crate::fdio::retry_io(|| crate::fdio::send(self.stream.as_fd(), rest))?;
            rest = rest.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// The client's fd, for registration.
    pub fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Its part of a supervisor handover's state ([`crate::handover`]).
    pub(crate) fn export(&self) -> crate::handover::state::Client {
        crate::handover::state::Client {
            fd: crate::handover::state::Fd::of(&self.stream),
            buf: crate::handover::state::Bytes(self.buf.clone()),
        }
    }

    /// The client a handover brought, on `fd`.
    pub(crate) fn import(s: crate::handover::state::Client, fd: OwnedFd) -> io::Result<Client> {
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Client {
            stream,
            buf: s.buf.0,
        })
    }
}

/// The listening control socket and its connected clients; the socket is removed when
/// dropped. Registered in the supervisor's loop, it hands each client back with its request
/// once the request line is complete ([`Control::on_client`]).
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    dir: RunDir,
    name: String,
    /// Connected clients by slot; a slot's token is `Token::ControlClient(slot)`.
    clients: Vec<Option<Client>>,
}

impl Control {
    /// Binds this process's socket in the directory [`rundir::for_launcher`] gives (checked,
    /// made if missing) and registers it under `Token::Control`.
    ///
    /// A directory another uid made under this uid's name first (or a symlink in its place)
    /// is put aside by a step with root's rights: this process itself when it is root, the
    /// placer service otherwise. Returns, besides the socket, a line saying what was put
    /// aside, if anything was.
    pub fn open(registry: &Registry) -> Result<(Control, Option<String>), ControlError> {
        let (dir, note) = match rundir::for_launcher() {
            Err(taken) if rundir::is_taken(&taken) => {
                let me = nix::unistd::geteuid();
                let reclaimed = if me.is_root() {
                    rundir::base(true)
                        .and_then(|base| rundir::reclaim(&base, me))
                        .map_err(|e| crate::error_chain(&e))
                } else {
                    crate::placer::claim_rundir()
                };
                let moved =
                    reclaimed.map_err(|why| ControlError::Unreclaimed { why, source: taken })?;
                let dir = rundir::for_launcher().map_err(ControlError::Dir)?;
                let note = moved.map(|aside| {
                    format!(
                        "{} was not this uid's to use; it is now {}",
                        dir.path().display(),
                        dir.path().with_file_name(aside).display()
                    )
                });
                (dir, note)
            }
            other => (other.map_err(ControlError::Dir)?, None),
        };
        Ok((Control::bind(dir, std::process::id(), registry)?, note))
    }

    /// Binds `<dir>/<pid>.sock`, mode 0600, replacing a stale socket of a dead launcher that
    /// had the same pid, and registers it under `Token::Control`.
    pub fn bind(dir: RunDir, pid: u32, registry: &Registry) -> Result<Control, ControlError> {
        let name = socket_name(pid);
        let path = dir.shown(&name);
        let fail = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        dir.unlink(&name).map_err(fail)?;
        // The umask decides the mode at bind time; tighten it right after. Only this uid
        // reaches into the directory meanwhile.
        let listener = UnixListener::bind(dir.reach(&name)).map_err(fail)?;
        // From here a failure drops `control`, which removes the socket again.
        let control = Control {
            listener,
            dir,
            name,
            clients: Vec::new(),
        };
        let socket = control.dir.reach(&control.name);
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        control.listen(registry).map_err(fail)?;
        control.sweep();
        Ok(control)
    }

    /// Removes the sockets of launchers that are gone (killed, so they could not remove
    /// their own): a socket nothing listens on refuses connections (ECONNREFUSED).
    fn sweep(&self) {
        let Ok(names) = self.dir.names() else {
            return;
        };
        for name in names {
            let is_socket = name
                .strip_suffix(".sock")
                .is_some_and(|pid| pid.parse::<u32>().is_ok());
            if !is_socket || name == self.name {
                continue;
            }
            let refused = std::os::unix::net::UnixStream::connect(self.dir.reach(&name))
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if refused {
                let _ = self.dir.unlink(&name);
            }
        }
    }

    /// Its part of a supervisor handover's state ([`crate::handover`]): the listener, its
    /// directory and every client by slot, with what each sent so far.
    pub(crate) fn export(&self) -> crate::handover::state::Control {
        crate::handover::state::Control {
            listener: crate::handover::state::Fd::of(&self.listener),
            dir: self.dir.export(),
            name: self.name.clone(),
            clients: self
                .clients
                .iter()
                .map(|c| c.as_ref().map(Client::export))
                .collect(),
        }
    }

    /// The control socket a handover brought, registered again, each client in its slot.
    /// A client whose fd cannot be taken or registered is dropped; it sees EOF and may ask
    /// again.
    pub(crate) fn import(
        s: crate::handover::state::Control,
        take: &mut crate::handover::fds::Take,
        registry: &Registry,
    ) -> Result<Control, crate::handover::ImportError> {
        use crate::handover::ImportError;
        let listener = UnixListener::from(take.owned(s.listener)?);
        let dir = RunDir::import(&s.dir, take.owned(s.dir.fd)?);
        let mut control = Control {
            listener,
            dir,
            name: s.name,
            clients: Vec::new(),
        };
        control
            .listen(registry)
            .map_err(ImportError::io("the control socket"))?;
        for (slot, client) in s.clients.into_iter().enumerate() {
            let client = match client {
                Some(c) => {
                    let fd = take.owned(c.fd)?;
                    Client::import(c, fd).ok()
                }
                None => None,
            };
            let client = client.filter(|c| {
                let token = Token::ControlClient(slot).to_mio();
                registry
                    .register(&mut SourceFd(&c.raw_fd()), token, Interest::READABLE)
                    .is_ok()
            });
            control.clients.push(client);
        }
        Ok(control)
    }

    /// Makes the listener non-blocking and registers it under `Token::Control`.
    fn listen(&self, registry: &Registry) -> io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let fd = self.listener.as_raw_fd();
        registry.register(
            &mut SourceFd(&fd),
            Token::Control.to_mio(),
            Interest::READABLE,
        )
    }

    /// The socket's path, for messages.
    pub fn path(&self) -> PathBuf {
        self.dir.shown(&self.name)
    }

    /// Accepts every pending client and registers it.
    pub fn accept(&mut self, registry: &Registry) {
        while let Ok(Some(client)) = self.accept_one() {
            let slot = match self.clients.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.clients.push(None);
                    self.clients.len() - 1
                }
            };
            let fd = client.raw_fd();
            let token = Token::ControlClient(slot).to_mio();
            if registry
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .is_ok()
            {
                if let Some(s) = self.clients.get_mut(slot) {
                    *s = Some(client);
                }
            }
        }
    }

    /// Reads what client `slot` sent. Once its request is complete, the client leaves the
    /// loop and comes back with it, for the supervisor to answer; a client that went away or
    /// sent garbage is dropped.
    pub fn on_client(&mut self, registry: &Registry, slot: usize) -> Option<(Client, Request)> {
        let entry = self.clients.get_mut(slot)?;
        let request = match entry.as_mut()?.on_readable() {
            Ok(None) => return None,
            Ok(Some(r)) => Some(r),
            Err(_) => None,
        };
        let client = entry.take()?;
        let _ = registry.deregister(&mut SourceFd(&client.raw_fd()));
        Some((client, request?))
    }

    /// Accepts one pending client, if any. A peer that is neither root nor this process's
    /// uid is hung up on: the socket's mode should have kept it out, and whoever may upgrade
    /// a VM may also kill it.
    fn accept_one(&self) -> io::Result<Option<Client>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                let me = nix::unistd::geteuid();
                match rundir::peer(&stream) {
                    Ok((uid, _)) if uid.is_root() || uid == me => {}
                    _ => return Ok(None),
                }
                stream.set_nonblocking(true)?;
                Ok(Some(Client {
                    stream,
                    buf: Vec::new(),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.dir.unlink(&self.name);
    }
}

/// Sends one request on a VM's control socket ([`connect`]) and calls `on_line` for every
/// JSON line of the answer until the launcher closes the connection.
pub fn request(
    mut stream: UnixStream,
    req: &Value,
    mut on_line: impl FnMut(&Value),
) -> io::Result<()> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = io::BufReader::new(stream);
    let mut text = String::new();
    loop {
        text.clear();
        if io::BufRead::read_line(&mut reader, &mut text)? == 0 {
            return Ok(());
        }
        let value: Value = serde_json::from_str(text.trim_end())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        on_line(&value);
    }
}

/// The `{"progress": step}` line sent to waiting clients.
pub fn progress(step: &str) -> Value {
    json!({ "progress": step })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_come_back_with_their_client_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("qlu-control-{}", std::process::id()));
        let mut poll = mio::Poll::new().unwrap();
        let me = std::process::id();
        let mut control =
            Control::bind(rundir::at(&dir, true).unwrap(), me, poll.registry()).unwrap();
        let path = control.path();
        assert_eq!(path, dir.join(format!("{me}.sock")));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let found = rundir::at(&dir, false).unwrap();
        let stream = connect(&found, me).unwrap();
        let err = connect(&found, me + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let client = {
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                request(
                    stream,
                    &json!({"execute": "upgrade", "to": "/usr/bin/q"}),
                    |v| lines.push(v.clone()),
                )
                .unwrap();
                lines
            })
        };
        let mut events = mio::Events::with_capacity(8);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut client_end, req) = 'served: loop {
            assert!(std::time::Instant::now() < deadline, "no request");
            poll.poll(&mut events, Some(std::time::Duration::from_millis(100)))
                .unwrap();
            for ev in events.iter() {
                match Token::from_mio(ev.token()) {
                    Token::Control => control.accept(poll.registry()),
                    Token::ControlClient(slot) => {
                        if let Some(done) = control.on_client(poll.registry(), slot) {
                            break 'served done;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        assert_eq!(req, Request::Upgrade(Some(PathBuf::from("/usr/bin/q"))));
        client_end.send(&progress("starting")).unwrap();
        client_end.send(&json!({"result": "ok"})).unwrap();
        drop(client_end);
        assert_eq!(
            client.join().unwrap(),
            vec![json!({"progress": "starting"}), json!({"result": "ok"})]
        );
        drop(control);
        assert!(!path.exists(), "socket removed on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sockets_of_dead_launchers_are_swept_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("qlu-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = rundir::at(&dir, true).unwrap();
        // A launcher killed before it could remove its socket leaves the file behind.
        let dead = UnixListener::bind(dir.join("999999.sock")).unwrap();
        drop(dead);
        let alive = UnixListener::bind(dir.join("999998.sock")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a socket").unwrap();
        let poll = mio::Poll::new().unwrap();
        let control = Control::bind(run, std::process::id(), poll.registry()).unwrap();
        let mut names = rundir::at(&dir, false).unwrap().names().unwrap();
        names.sort();
        let mut want = vec![
            "999998.sock".to_owned(),
            socket_name(std::process::id()),
            "notes.txt".into(),
        ];
        want.sort();
        assert_eq!(names, want);
        drop((control, alive));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_that_stops_reading_is_refused_not_waited_for() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut client = Client {
            stream: ours,
            buf: Vec::new(),
        };
        let line = json!({"progress": "x".repeat(4096)});
        let refused = (0..10_000).map(|_| client.send(&line)).find(Result::is_err);
        let err = refused.expect("a full buffer refuses").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
