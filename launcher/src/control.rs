//! The per-VM control socket that `qemu-liveupgrade upgrade|status|list` talk to.
//!
//! One unix socket per VM, `<pid>.sock` in `/run/qemu-liveupgrade/` for root or
//! `$XDG_RUNTIME_DIR/qemu-liveupgrade/` otherwise (`QEMU_LIVEUPGRADE_RUNDIR` overrides both),
//! mode 0600: whoever may upgrade a VM may also kill it. The protocol is one JSON request line
//! per connection, `{"execute":"status"}` or `{"execute":"upgrade","to":PATH|null}`, answered
//! by JSON lines: a status object, or progress lines `{"progress":STEP}` and then the upgrade
//! report.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use serde_json::{json, Value};

use crate::token::Token;

/// Environment variable overriding the control socket directory.
pub const ENV_RUNDIR: &str = "QEMU_LIVEUPGRADE_RUNDIR";

/// The directory holding every VM's control socket for this user.
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENV_RUNDIR).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/qemu-liveupgrade");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("qemu-liveupgrade"),
        None => std::env::temp_dir().join(format!("qemu-liveupgrade-{}", nix::unistd::getuid())),
    }
}

/// The control socket of the VM whose launcher has `pid`.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
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
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
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
        let req: Value = serde_json::from_slice(&self.buf[..end])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match req["execute"].as_str() {
            Some("status") => Ok(Some(Request::Status)),
            Some("upgrade") => Ok(Some(Request::Upgrade(
                req["to"].as_str().map(PathBuf::from),
            ))),
            Some("check") => Ok(Some(Request::Check(req["to"].as_str().map(PathBuf::from)))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown request",
            )),
        }
    }

    /// Sends one JSON line. Blocking with a short timeout: the CLI reads as it goes, and a
    /// client that stops reading must not stall the VM's supervisor for long.
    pub fn send(&mut self, value: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.stream.set_nonblocking(false)?;
        self.stream
            .set_write_timeout(Some(std::time::Duration::from_millis(200)))?;
        let res = self.stream.write_all(&line);
        self.stream.set_nonblocking(true)?;
        res
    }

    /// The client's fd, for registration.
    pub fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }
}

/// The listening control socket and its connected clients; the socket is removed when
/// dropped. Registered in the supervisor's loop, it hands each client back with its request
/// once the request line is complete ([`Control::on_client`]).
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    /// Connected clients by slot; a slot's token is `Token::ControlClient(slot)`.
    clients: Vec<Option<Client>>,
}

impl Control {
    /// Binds `<run_dir>/<pid>.sock`, mode 0600, replacing a stale socket of a dead launcher
    /// that had the same pid, and registers it under `Token::Control`.
    pub fn bind(dir: &Path, pid: u32, registry: &Registry) -> io::Result<Control> {
        std::fs::create_dir_all(dir)?;
        let path = socket_path(dir, pid);
        let _ = std::fs::remove_file(&path);
        // The umask decides the mode at bind time; tighten it right after, before anyone can
        // learn the path from a `list`.
        let listener = UnixListener::bind(&path)?;
        let control = Control {
            listener,
            path,
            clients: Vec::new(),
        };
        std::fs::set_permissions(&control.path, std::fs::Permissions::from_mode(0o600))?;
        control.listener.set_nonblocking(true)?;
        let fd = control.listener.as_raw_fd();
        registry.register(
            &mut SourceFd(&fd),
            Token::Control.to_mio(),
            Interest::READABLE,
        )?;
        Ok(control)
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

    /// Accepts one pending client, if any.
    fn accept_one(&self) -> io::Result<Option<Client>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
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
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to a VM's control socket and calls `on_line` for every JSON line of the
/// answer until the launcher closes the connection.
pub fn request(path: &Path, req: &Value, mut on_line: impl FnMut(&Value)) -> io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
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
        let mut control = Control::bind(&dir, 4242, poll.registry()).unwrap();
        let path = socket_path(&dir, 4242);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                request(
                    &path,
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
}
