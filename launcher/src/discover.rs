//! The VMs a `qemu-liveupgrade` command can reach: every launcher's control socket in the
//! directories [`rundir::for_cli`] trusts (as root, every uid's), answered by the launcher
//! the socket is named for ([`control::connect`]).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::control;
use crate::rundir::{self, RunDir};

/// One VM's control socket.
#[derive(Debug, Clone)]
pub struct Vm {
    dir: Arc<RunDir>,
    /// Its launcher's pid: the pid libvirt or the script tracks.
    pub pid: u32,
}

impl Vm {
    /// The socket's path, for messages.
    pub fn shown(&self) -> PathBuf {
        self.dir.shown(&control::socket_name(self.pid))
    }

    /// Connects, checking who answers ([`control::connect`]).
    pub fn connect(&self) -> io::Result<UnixStream> {
        control::connect(&self.dir, self.pid)
    }

    /// Sends `req` and calls `on_line` with every line of the answer
    /// ([`control::request`]); errors name the socket.
    pub fn request(&self, req: &Value, on_line: impl FnMut(&Value)) -> Result<(), String> {
        self.connect()
            .and_then(|stream| control::request(stream, req, on_line))
            .map_err(|e| format!("{}: {e}", self.shown().display()))
    }

    /// The launcher's status object.
    pub fn status(&self) -> Result<Value, String> {
        let mut status = None;
        self.request(&json!({"execute": "status"}), |v| status = Some(v.clone()))?;
        status.ok_or_else(|| format!("{}: no answer", self.shown().display()))
    }
}

/// What a scan found: the sockets, and the directories it did not trust, in words.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every `<pid>.sock` in a trusted directory, answering or not.
    pub sockets: Vec<Vm>,
    /// Directories refused, one line each.
    pub refused: Vec<String>,
}

/// Every control socket in the directories this user may trust.
pub fn scan() -> Scan {
    let (dirs, refused) = rundir::for_cli();
    let mut scan = Scan {
        refused: refused.iter().map(|e| crate::error_chain(e)).collect(),
        ..Scan::default()
    };
    for dir in dirs {
        let dir = Arc::new(dir);
        let names = match dir.names() {
            Ok(n) => n,
            Err(e) => {
                scan.refused
                    .push(format!("cannot list {}: {e}", dir.path().display()));
                continue;
            }
        };
        scan.sockets.extend(
            names
                .iter()
                .filter_map(|n| n.strip_suffix(".sock")?.parse().ok())
                .map(|pid| Vm {
                    dir: Arc::clone(&dir),
                    pid,
                }),
        );
    }
    scan.sockets.sort_by_key(|vm| vm.pid);
    scan
}

impl Scan {
    /// Every socket whose launcher answers, with its status.
    pub fn live(&self) -> Vec<(Vm, Value)> {
        self.sockets
            .iter()
            .filter_map(|vm| vm.status().ok().map(|s| (vm.clone(), s)))
            .collect()
    }

    /// The VM given by its launcher's pid or by its `-name` (`guest=`, as libvirt names it).
    pub fn find(&self, vm: &str) -> Result<Vm, String> {
        let found = match vm.parse::<u32>() {
            Ok(pid) => self.sockets.iter().find(|v| v.pid == pid).cloned(),
            Err(_) => self
                .live()
                .into_iter()
                .find(|(_, s)| s["name"].as_str() == Some(vm))
                .map(|(v, _)| v),
        };
        found.ok_or_else(|| {
            let what = match vm.parse::<u32>() {
                Ok(pid) => format!("no VM with pid {pid}"),
                Err(_) => format!("no VM named {vm}"),
            };
            let mut msg = format!("{what} under qemu-liveupgrade in {}", where_looked());
            for r in &self.refused {
                msg.push_str(&format!("; skipped {r}"));
            }
            msg
        })
    }
}

/// Where a scan looks, for messages.
fn where_looked() -> String {
    match std::env::var_os(rundir::ENV_RUNDIR).filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).display().to_string(),
        None if nix::unistd::geteuid().is_root() => format!("{}/*/", rundir::BASE),
        None => format!("{}/{}/", rundir::BASE, nix::unistd::geteuid()),
    }
}
