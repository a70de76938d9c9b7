//! What the launcher does with each signal sent to the VM's pid: what QEMU itself does with
//! it, measured by sending every signal to a bare QEMU 7.2.22 and 10.0.2 running a guest.
//!
//! QEMU ends on SIGTERM, SIGINT and SIGHUP with status 0 ("terminating on signal N",
//! `os-posix.c`), and the launcher forwards those (and SIGQUIT, which kills QEMU by its default
//! action) so QEMU ends its own way and the launcher mirrors its status. QEMU survives
//! SIGUSR1, SIGPIPE, SIGALRM, SIGIO, SIGURG, SIGWINCH, SIGCHLD and SIGCONT with the guest
//! running (it blocks or ignores them, or their default is to ignore), so the launcher
//! ignores them too. Every other signal kills QEMU by its default action, and kills the
//! launcher the same way, whose death takes QEMU with it (`PR_SET_PDEATHSIG`): the VM's pid
//! ends by the same signal. Two exceptions: SIGUSR2, which also kills a bare QEMU, is the
//! launcher's upgrade request; and SIGPROF, which kills a bare QEMU too, is ignored. A
//! SIGPROF is a profiler's timer (setitimer(2) `ITIMER_PROF`) that went to the wrong process,
//! never a request to end a VM, and no manager sends it to mean that: this is the one
//! signal on which the VM deliberately outlives what bare QEMU would. The job-control stops (SIGTSTP, SIGTTIN, SIGTTOU) stop QEMU only when its
//! process group is not orphaned; the launcher passes them on and stops itself exactly when
//! QEMU did stop, so the kernel's rule decides for both, and SIGCONT continues both.

use signal_hook::consts::signal::{
    SIGALRM, SIGCHLD, SIGCONT, SIGHUP, SIGINT, SIGIO, SIGPIPE, SIGQUIT, SIGTERM, SIGTSTP, SIGTTIN,
    SIGTTOU, SIGUSR1, SIGUSR2,
};

/// What the launcher does when a signal arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Passed on to the QEMU running the guest; during an upgrade, once the migration has
    /// finished or been cancelled (QEMU 7.2 can abort when SIGTERM meets a starting
    /// migration, see FACTS.md).
    Forward,
    /// Ignored, as QEMU survives it with no visible effect.
    Ignore,
    /// A job-control stop: passed on, and the launcher stops itself if QEMU stopped.
    JobStop,
    /// Passed on to QEMU, which a job-control stop may have stopped.
    Continue,
    /// An upgrade request.
    Upgrade,
    /// Children to reap.
    Reap,
    /// Left at its default action: it kills QEMU, and so it kills the launcher, and QEMU
    /// with it.
    Default,
}

/// Signals the launcher passes on to the running QEMU, as QEMU would have received them.
pub const FORWARDED: [i32; 4] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT];
/// Signals QEMU survives with no visible effect.
pub const IGNORED: [i32; 6] = [
    SIGUSR1,
    SIGPIPE,
    SIGALRM,
    SIGIO,
    libc::SIGURG,
    libc::SIGWINCH,
];
/// Signals that kill a bare QEMU by their default action, and that the launcher ignores all
/// the same: a stray profiling timer must not end a VM.
pub const SPARED: [i32; 1] = [libc::SIGPROF];
/// Job-control stops.
pub const JOB_STOPS: [i32; 3] = [SIGTSTP, SIGTTIN, SIGTTOU];

/// The launcher's reaction to `sig`.
pub fn reaction(sig: i32) -> Reaction {
    match sig {
        SIGCHLD => Reaction::Reap,
        SIGUSR2 => Reaction::Upgrade,
        SIGCONT => Reaction::Continue,
        s if FORWARDED.contains(&s) => Reaction::Forward,
        s if IGNORED.contains(&s) || SPARED.contains(&s) => Reaction::Ignore,
        s if JOB_STOPS.contains(&s) => Reaction::JobStop,
        _ => Reaction::Default,
    }
}

/// Signals the loop watches (every one with a reaction other than ignore and default).
pub fn watched() -> Vec<i32> {
    (1..32)
        .filter(|&s| !matches!(reaction(s), Reaction::Ignore | Reaction::Default))
        .collect()
}

/// Ignores the signals QEMU survives and those it is spared, and puts back the default action of SIGSEGV and SIGBUS,
/// whose handlers Rust's runtime installs to report stack overflows: such a handler returns
/// from a SIGSEGV sent by kill(2), and the launcher would survive what kills QEMU. Call once
/// the inherited signal state has been captured: QEMU gets the inherited dispositions back,
/// not these.
pub fn set_dispositions() -> std::io::Result<()> {
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: SIG_DFL is a valid disposition for both; no handler code runs.
        if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    for sig in IGNORED.into_iter().chain(SPARED) {
        // SAFETY: SIG_IGN is a valid disposition for every signal in IGNORED and SPARED,
        // none of which is SIGKILL or SIGSTOP; no handler code runs.
        let previous = unsafe { libc::signal(sig, libc::SIG_IGN) };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_standard_signal_has_one_reaction_matching_qemus_measured_behaviour() {
        let survives = [
            SIGUSR1,
            SIGPIPE,
            SIGALRM,
            SIGIO,
            SIGCHLD,
            SIGCONT,
            libc::SIGURG,
            libc::SIGWINCH,
        ];
        for sig in 1..32 {
            let r = reaction(sig);
            if survives.contains(&sig) {
                assert!(
                    matches!(r, Reaction::Ignore | Reaction::Reap | Reaction::Continue),
                    "QEMU survives {sig}: {r:?}"
                );
            }
            if r == Reaction::Default {
                assert!(!survives.contains(&sig), "{sig}");
            }
        }
        // Kills a bare QEMU, never the VM.
        assert_eq!(reaction(libc::SIGPROF), Reaction::Ignore);
        assert_eq!(reaction(libc::SIGVTALRM), Reaction::Default, "kills QEMU");
        assert_eq!(reaction(SIGTERM), Reaction::Forward);
        assert!(watched().contains(&SIGUSR2) && !watched().contains(&SIGUSR1));
    }
}
