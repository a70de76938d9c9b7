//! Step 3 of a handover: the new binary, run in its check mode on the state, says whether it
//! takes the VM, before the old launcher commits to the exec. And the check mode itself, which
//! the new image's [`super::resume`] runs again on the real state.
//!
//! The check is a short-lived child with the state on its stdin (a sealed memfd: it cannot
//! change what it was given) and one JSON line expected on its stdout. The loop serves the VM
//! meanwhile; the answer's pipe wakes it. A binary that predates supervisor upgrades hands
//! [`super::CHECK_ARG`] to QEMU, which refuses it: no answer, no handover.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::Interest;
use nix::errno::Errno;
use serde_json::{json, Value};

use super::state::{State, FORMAT, OLDEST_READ, VERSION};
use super::{CHECK_ARG, ENV_CHECK};
use crate::child::{self, ChildError};
use crate::cmdline::CmdLine;
use crate::generation::Base;
use crate::json::JsonExt;
use crate::supervisor::Supervisor;
use crate::token::Token;

/// How long the new binary gets to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the check gets to be reaped once it answered (or was killed).
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest answer read.
const ANSWER_CAP: usize = 1 << 16;

/// Reads a state and checks that this build takes the VM it describes: the format, a schema
/// version this build reads, every fd named once, and the command line planned to the same
/// resources. Returns the state and the base planned again.
pub fn read(bytes: &[u8]) -> Result<(State, Base), String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the state is not JSON: {e}"))?;
    if value.at("/format") != FORMAT {
        return Err("not a qemu-liveupgrade handover state".into());
    }
    let version = value.at("/version").as_u64().unwrap_or(0);
    if version > u64::from(VERSION) {
        return Err(format!(
            "state version {version} is newer than this build reads ({VERSION} at most)"
        ));
    }
    if version < u64::from(OLDEST_READ) {
        return Err(format!(
            "state version {version} is older than this build reads ({OLDEST_READ} at least)"
        ));
    }
    let state: State = serde_json::from_value(value)
        .map_err(|e| format!("cannot read state version {version}: {e}"))?;
    super::fds::check_listed(&state).map_err(|e| e.to_string())?;
    let args: Vec<OsString> = state.vm.args.iter().map(|a| a.os()).collect();
    let cmd = CmdLine::parse(&args).map_err(|e| {
        format!(
            "cannot read the VM's command line: {}",
            crate::error_chain(&e)
        )
    })?;
    let base = Base::new(&cmd, &state.vm.inherited);
    let planned = super::plan(&base);
    if planned != state.vm.plan {
        return Err(format!(
            "this build plans the VM differently: {} where the running launcher has {}",
            json!(planned),
            json!(state.vm.plan)
        ));
    }
    Ok((state, base))
}

/// The check mode's answer for the state in `bytes`.
pub fn answer(bytes: &[u8]) -> Value {
    match read(bytes) {
        Ok((state, _)) => json!({
            "qemu-liveupgrade": "handover-check",
            "ok": true,
            "supervisor": crate::identity::describe(),
            "state_version": state.version,
            "reads": [OLDEST_READ, VERSION],
        }),
        Err(why) => refusal(&why),
    }
}

/// The check mode's answer when it does not take the state.
pub fn refusal(why: &str) -> Value {
    json!({
        "qemu-liveupgrade": "handover-check",
        "ok": false,
        "reason": why,
        "supervisor": crate::identity::describe(),
        "reads": [OLDEST_READ, VERSION],
    })
}

impl Supervisor {
    /// Runs `target` in its check mode on `state` and returns its answer if it takes the
    /// VM; else why not, in its words when it gave any.
    pub(crate) fn check_new(&mut self, target: &Path, state: &State) -> Result<Value, String> {
        let bytes =
            serde_json::to_vec(state).map_err(|e| format!("cannot write the state: {e}"))?;
        let input = super::exec::sealed_memfd(&bytes)
            .map_err(|e| format!("cannot hold the state for the check: {e}"))?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot make a pipe for the check: {e}"))?;
        set_nonblocking(&out_r).map_err(|e| format!("cannot make a pipe for the check: {e}"))?;
        // The child inherits the environment at fork: the variable is there for that moment
        // only (the launcher is single-threaded).
        std::env::set_var(ENV_CHECK, "1");
        let spawned = child::spawn(&child::Spec {
            program: target,
            argv: vec![self.config.argv0.clone(), CHECK_ARG.into()],
            keep: Vec::new(),
            place: Vec::new(),
            stdio: [Some(input.as_fd()), Some(out_w.as_fd()), None],
            signals: &self.config.signals,
            seccomp: None,
            before_exec: None,
        });
        std::env::remove_var(ENV_CHECK);
        let mut started = spawned.map_err(|e| format!("cannot start {}: {e}", target.display()))?;
        drop(out_w);
        drop(input);
        let pidfd = crate::translate::probe::pidfd_open(started.pid);
        let fd = out_r.as_raw_fd();
        let token = Token::Handover.to_mio();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
            .map_err(|e| format!("cannot wait for the check: {e}"))?;
        let mut out = Vec::new();
        let mut eof = false;
        let deadline = Instant::now() + CHECK_TIMEOUT;
        let waited = self.wait_until(None, "the new supervisor's check", deadline, |_, _| {
            eof = read_some(&out_r, &mut out);
            eof
        });
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        // Whatever it is doing now, it is done, and gone before the handover goes on: the
        // launcher leaves no process behind, and the new image inherits no zombie.
        if let Some(pidfd) = &pidfd {
            crate::translate::probe::pidfd_send_signal(pidfd, libc::SIGKILL);
        }
        let pid = started.pid;
        let gone = Instant::now() + REAP_TIMEOUT;
        let _ = self.wait_until(None, "the check to end", gone, |_, _| reaped(pid));
        if let Some(Err(ChildError::Exec { source, .. })) = started.exec.poll() {
            return Err(format!(
                "cannot execute {}: {}",
                target.display(),
                source.desc()
            ));
        }
        if waited.is_err() && !eof {
            return Err(format!(
                "{} did not answer the state check within {}s",
                target.display(),
                CHECK_TIMEOUT.as_secs()
            ));
        }
        let text = String::from_utf8_lossy(&out);
        let line = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        match serde_json::from_str::<Value>(line) {
            Ok(answer) if answer.at("/qemu-liveupgrade") == "handover-check" => {
                if answer.at("/ok") == true {
                    Ok(answer)
                } else {
                    Err(format!(
                        "{} refuses the state: {}",
                        target.display(),
                        answer.at("/reason").as_str().unwrap_or("no reason given")
                    ))
                }
            }
            _ => Err(format!(
                "{} gave no answer to the state check: a release from before supervisor upgrades, or not qemu-liveupgrade",
                target.display()
            )),
        }
    }
}

/// Whether the child `pid` is reaped now: by this call, or by the loop's SIGCHLD handling
/// before it (which reaps every child it does not know, and then the pid is no child).
fn reaped(pid: nix::unistd::Pid) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => true,
        Ok(_) => false,
    }
}

/// Reads what the pipe has; returns whether it reached its end (or the cap, or failed).
fn read_some(fd: &OwnedFd, out: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut chunk) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return false,
            Err(_) => return true,
        }
        if out.len() > ANSWER_CAP {
            return true;
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Errno> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_of_another_format_or_version_are_refused_with_the_reason() {
        let refused = |text: &str| {
            answer(text.as_bytes())["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(refused("{}").contains("not a qemu-liveupgrade handover state"));
        let newer = format!(r#"{{"format":"{FORMAT}","version":{}}}"#, VERSION + 1);
        assert!(
            refused(&newer).contains("is newer than this build reads"),
            "{}",
            refused(&newer)
        );
        assert!(refused("x").contains("not JSON"));
        let broken = format!(r#"{{"format":"{FORMAT}","version":{VERSION}}}"#);
        assert!(refused(&broken).starts_with(&format!("cannot read state version {VERSION}")));
    }
}
