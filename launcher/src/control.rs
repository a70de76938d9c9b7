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
use mio::Interest;
use serde_json::{json, Value};

use crate::supervisor::{Supervisor, Token};

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

/// The listening control socket; removed when dropped.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Control {
    /// Binds `<run_dir>/<pid>.sock`, mode 0600, replacing a stale socket of a dead launcher
    /// that had the same pid.
    pub fn bind(dir: &Path, pid: u32) -> io::Result<Control> {
        std::fs::create_dir_all(dir)?;
        let path = socket_path(dir, pid);
        let _ = std::fs::remove_file(&path);
        // The umask decides the mode at bind time; tighten it right after, before anyone can
        // learn the path from a `list`.
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Control { listener, path })
    }

    /// The listening fd, for registration.
    pub fn raw_fd(&self) -> i32 {
        self.listener.as_raw_fd()
    }

    /// Accepts one pending client, if any.
    pub fn accept(&self) -> io::Result<Option<Client>> {
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

/// The supervisor's side: serving control clients from its loop.
impl Supervisor {
    /// Prints an upgrade report as one JSON line on stderr, which libvirt keeps in the
    /// domain's log, and keeps it for `status`.
    pub(crate) fn report(&mut self, report: Value) {
        eprintln!("{report}");
        for mut w in std::mem::take(&mut self.waiters) {
            let _ = w.send(&report);
        }
        self.last_upgrade = Some(report);
    }

    /// Tells control clients waiting on the upgrade which step it has reached.
    pub(crate) fn progress(&mut self, step: &str) {
        let line = progress(step);
        self.waiters.retain_mut(|w| w.send(&line).is_ok());
    }

    /// The VM's state, for `qemu-liveupgrade status` and `list`.
    pub fn status(&self) -> Value {
        let name = self
            .config
            .base
            .cmd
            .opts("name")
            .filter_map(|o| o.parse_arg())
            .filter_map(|a| a.get("guest"))
            .last();
        json!({
            "pid": std::process::id(),
            "name": name,
            "qemu_pid": self.current.pid.as_raw(),
            "version": self.current.version_string(),
            "binary": self.current.binary.path.to_string_lossy(),
            "generation": self.current.number,
            "machine": self.machine,
            "ram": if self.config.base.unshared.is_none() { "shared" } else { "streamed" },
            "uptime_s": self.started.elapsed().as_secs(),
            "generation_uptime_s": self.current.started.elapsed().as_secs(),
            "last_upgrade": self.last_upgrade,
        })
    }

    pub(crate) fn on_control(&mut self) {
        let Some(control) = self.control.as_ref() else {
            return;
        };
        while let Ok(Some(client)) = control.accept() {
            let slot = match self.control_clients.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.control_clients.push(None);
                    self.control_clients.len() - 1
                }
            };
            let fd = client.raw_fd();
            let token = Token::ControlClient(slot).to_mio();
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .is_ok()
            {
                self.control_clients[slot] = Some(client);
            }
        }
    }

    pub(crate) fn on_control_client(&mut self, slot: usize) {
        let Some(client) = self.control_clients.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let request = match client.on_readable() {
            Ok(None) => return,
            Ok(Some(r)) => Some(r),
            Err(_) => None,
        };
        let Some(mut client) = self.control_clients[slot].take() else {
            return;
        };
        let fd = client.raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        match request {
            Some(Request::Status) => {
                let _ = client.send(&self.status());
            }
            Some(Request::Upgrade(to)) => {
                if self.upgrading {
                    // An upgrade is under way: this request is coalesced into it.
                    self.upgrade_requests += 1;
                } else {
                    self.upgrade_requests = 1;
                    self.upgrade_to = to;
                }
                self.waiters.push(client);
            }
            // Run from the loop's top, like an upgrade, never from inside this handler.
            Some(Request::Check(to)) => self.check_requests.push((client, to)),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("qlu-control-{}", std::process::id()));
        let control = Control::bind(&dir, 4242).unwrap();
        let path = socket_path(&dir, 4242);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = std::thread::spawn(move || {
            let mut client = loop {
                if let Some(c) = control.accept().unwrap() {
                    break c;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            let req = loop {
                match client.on_readable() {
                    Ok(Some(r)) => break r,
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(req, Request::Upgrade(Some(PathBuf::from("/usr/bin/q"))));
            client.send(&progress("starting")).unwrap();
            client.send(&json!({"result": "ok"})).unwrap();
            control
        });
        let mut lines = Vec::new();
        request(
            &path,
            &json!({"execute": "upgrade", "to": "/usr/bin/q"}),
            |v| lines.push(v.clone()),
        )
        .unwrap();
        assert_eq!(
            lines,
            vec![json!({"progress": "starting"}), json!({"result": "ok"})]
        );
        drop(server.join().unwrap());
        assert!(!path.exists(), "socket removed on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
