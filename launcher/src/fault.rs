//! A fault injected at one exact phase of the first upgrade, for the fault-injection tests.
//!
//! Every fault is a real signal to a real process (the new QEMU, the old one, or the launcher
//! itself); only its moment is chosen here. A test cannot choose it from outside: the phases
//! last milliseconds (the new QEMU holds the stream's read end a few milliseconds before the
//! old one gets the write end), and "between fork and exec" cannot be reached from outside at
//! all. So the launcher sends the signal itself when it reaches the phase, once, and the
//! tests check what follows. Set `QEMU_LIVEUPGRADE_TEST_FAULT=PHASE:TARGET:SIGNAL`, e.g.
//! `stream-in:new:SIGSTOP`. Nothing happens without it.

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Environment variable holding the fault.
pub const ENV_FAULT: &str = "QEMU_LIVEUPGRADE_TEST_FAULT";

/// Where in the upgrade the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The new generation's child, forked and not yet executing QEMU: it signals itself.
    BeforeExec,
    /// The new QEMU has just been executed.
    Exec,
    /// The new QEMU holds the stream's read end (`getfd` answered).
    StreamIn,
    /// The old QEMU holds the stream's write end (`getfd` answered), `migrate` not sent.
    StreamOut,
    /// `migrate` was accepted: the migration is under way.
    Migrating,
}

/// Who gets the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The QEMU the upgrade starts.
    New,
    /// The QEMU running the guest.
    Old,
    /// The launcher itself.
    Launcher,
}

/// One fault: a signal to a process at a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// When.
    pub phase: Phase,
    /// To whom.
    pub target: Target,
    /// What.
    pub signal: Signal,
}

/// A malformed fault.
#[derive(Debug, thiserror::Error)]
#[error("{ENV_FAULT}={value}: expected PHASE:TARGET:SIGNAL (PHASE before-exec, exec, stream-in, stream-out or migrating; TARGET new, old or launcher; SIGNAL such as SIGKILL)")]
pub struct FaultError {
    /// What the variable held.
    pub value: String,
}

impl Fault {
    /// Parses `PHASE:TARGET:SIGNAL`.
    pub fn parse(value: &str) -> Result<Fault, FaultError> {
        let err = || FaultError {
            value: value.to_owned(),
        };
        let mut parts = value.split(':');
        let (Some(phase), Some(target), Some(signal), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        let phase = match phase {
            "before-exec" => Phase::BeforeExec,
            "exec" => Phase::Exec,
            "stream-in" => Phase::StreamIn,
            "stream-out" => Phase::StreamOut,
            "migrating" => Phase::Migrating,
            _ => return Err(err()),
        };
        let target = match target {
            "new" => Target::New,
            "old" => Target::Old,
            "launcher" => Target::Launcher,
            _ => return Err(err()),
        };
        let signal: Signal = signal.parse().map_err(|_| err())?;
        // Before exec only the child itself can act.
        if phase == Phase::BeforeExec && target != Target::New {
            return Err(err());
        }
        Ok(Fault {
            phase,
            target,
            signal,
        })
    }

    /// Sends the signal if this fault strikes at `phase`; `new` and `old` are the QEMUs.
    /// Returns whether it struck.
    pub fn strike(&self, phase: Phase, new: Option<Pid>, old: Pid) -> bool {
        if phase != self.phase {
            return false;
        }
        let pid = match self.target {
            Target::New => new,
            Target::Old => Some(old),
            Target::Launcher => Some(nix::unistd::getpid()),
        };
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, self.signal);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_refuse_what_cannot_be_done() {
        let f = Fault::parse("stream-in:new:SIGSTOP").unwrap();
        assert_eq!(
            f,
            Fault {
                phase: Phase::StreamIn,
                target: Target::New,
                signal: Signal::SIGSTOP
            }
        );
        for bad in [
            "",
            "stream-in:new",
            "stream-in:new:SIGSTOP:x",
            "later:new:SIGKILL",
            "exec:other:SIGKILL",
            "exec:new:SIGNOPE",
            "before-exec:old:SIGKILL",
        ] {
            let err = Fault::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(ENV_FAULT), "{err}");
        }
    }

    #[test]
    fn a_fault_strikes_only_at_its_phase() {
        let f = Fault::parse("exec:new:SIGCONT").unwrap();
        let me = nix::unistd::getpid();
        assert!(!f.strike(Phase::StreamIn, Some(me), me));
        assert!(f.strike(Phase::Exec, Some(me), me));
    }
}
