//! Steps 4 to 6 of a handover: signals blocked, the state written as it is at this instant,
//! and `execve` in place; and the way back to the old binary for a new image that cannot read
//! the state after all.
//!
//! Signals: `execve(2)` resets caught signals to their default action (SIGTERM's would kill
//! the launcher, and QEMU with it) but keeps the signal mask and pending signals. So the
//! launcher's signals are blocked first, those signal-hook already caught are acted on, and
//! whatever arrives from then on stays pending across the exec until the new image has its
//! handlers in place and restores the mask the state carries.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use serde_json::Value;

use super::state::{self, Fd};
use super::{fds, ENV_CHECK, ENV_FALLBACK, ENV_STATE};
use crate::control::Client;
use crate::json::JsonExt;
use crate::supervisor::{Supervisor, FORWARDED};

/// The launcher's signal mask now.
pub(super) fn current_mask() -> SigSet {
    SigSet::thread_get_mask().unwrap_or_else(|_| SigSet::empty())
}

/// A memfd holding `bytes`, sealed against any change (memfd_create(2), `F_SEAL_*`), so that
/// whoever is given it reads exactly what was written. Close-on-exec; the offset is at 0.
pub(super) fn sealed_memfd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let name = CString::new("qemu-liveupgrade-state").unwrap_or_default();
    let fd = memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    std::io::Seek::rewind(&mut file)?;
    Ok(OwnedFd::from(file))
}

/// The signals the launcher handles, which must not be delivered while no handler is there.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in FORWARDED
        .iter()
        .copied()
        .chain([libc::SIGCHLD, libc::SIGUSR2])
    {
        if let Ok(sig) = Signal::try_from(sig) {
            set.add(sig);
        }
    }
    set
}

/// Blocks the launcher's signals, writes the state and executes `target` on it. Returns only
/// if that failed, with everything put back, saying why.
pub(super) fn exec(
    sup: &mut Supervisor,
    target: &Path,
    clients: &[Client],
    handover: state::Handover,
) -> String {
    // The old binary, for a new image that cannot read the state after all.
    let fallback = open_exe();
    let mut old_mask = SigSet::empty();
    let blocked = nix::sys::signal::pthread_sigmask(
        SigmaskHow::SIG_BLOCK,
        Some(&handled()),
        Some(&mut old_mask),
    );
    if let Err(e) = blocked {
        return format!("cannot block signals: {}", e.desc());
    }
    let unblock = |mask: &SigSet| {
        let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
    };
    // 4. What was caught before the mask went up is acted on here, by this image.
    sup.take_caught_signals();
    if sup.has_exited() {
        unblock(&old_mask);
        return "QEMU exited during the handover".into();
    }
    // 5. The state as it is now: nothing runs between here and the exec.
    let extra = crate::supervisor::handover::Extra {
        mask: &old_mask,
        clients,
        fallback: fallback.as_ref().map(Fd::of),
        handover: Some(handover),
    };
    let state = match sup.export_state(&extra) {
        Ok(s) => s,
        Err(why) => {
            unblock(&old_mask);
            return format!("not now: {why}");
        }
    };
    let why = match serde_json::to_vec(&state) {
        Ok(bytes) => exec_with(target, &bytes, &state.fds, None),
        Err(e) => format!("cannot write the state: {e}"),
    };
    // 6. Still here: the exec failed, and the launcher carries on as it was.
    unblock(&old_mask);
    why
}

/// Executes `target` (or `exe_fd`, the old binary, by `fexecve`) on the state `bytes`, with
/// `inherit` kept open across the exec. Returns only on failure, with close-on-exec set on
/// them again.
fn exec_with(target: &Path, bytes: &[u8], inherit: &[Fd], exe_fd: Option<RawFd>) -> String {
    let memfd = match sealed_memfd(bytes) {
        Ok(fd) => fd,
        Err(e) => return format!("cannot hold the state: {e}"),
    };
    let mut keep = inherit.to_vec();
    keep.push(Fd::of(&memfd));
    if let Err(e) = fds::inherit(&keep) {
        return format!("cannot keep the fds open across the exec: {e}");
    }
    let fallback_why = match exe_fd {
        Some(_) => std::env::var_os(ENV_FALLBACK),
        None => None,
    };
    let result: Result<(), Errno> =
        cstrings(memfd.as_raw_fd(), fallback_why).and_then(|(argv, env)| {
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            let err = match exe_fd {
                Some(fd) => nix::unistd::fexecve(fd, &argv, &env).err(),
                None => {
                    let path =
                        CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
                    nix::unistd::execve(&path, &argv, &env).err()
                }
            };
            Err(err.unwrap_or(Errno::EINVAL))
        });
    fds::close_on_exec(&keep);
    let errno = result.err().unwrap_or(Errno::EINVAL);
    format!("cannot execute {}: {}", target.display(), errno.desc())
}

/// This process's argv, and its environment with `ENV_STATE` naming `memfd` (and the
/// fallback's reason, when going back).
fn cstrings(
    memfd: RawFd,
    fallback_why: Option<OsString>,
) -> Result<(Vec<CString>, Vec<CString>), Errno> {
    let cstr = |bytes: &[u8]| CString::new(bytes).map_err(|_| Errno::EINVAL);
    let argv = std::env::args_os()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if [ENV_STATE, ENV_CHECK, ENV_FALLBACK].iter().any(|n| k == *n) {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(cstr(&kv)?);
    }
    env.push(cstr(format!("{ENV_STATE}={memfd}").as_bytes())?);
    if let Some(why) = fallback_why {
        let mut kv = format!("{ENV_FALLBACK}=").into_bytes();
        kv.extend_from_slice(why.as_bytes());
        env.push(cstr(&kv)?);
    }
    Ok((argv, env))
}

/// The executable this process runs, opened read-only (close-on-exec; the handover clears
/// that for the exec).
fn open_exe() -> Option<OwnedFd> {
    let fd = nix::fcntl::open(
        "/proc/self/exe",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()?;
    // SAFETY: open(2) just returned this fd and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new image that cannot read the state after all goes back to the old binary, kept open
/// across the exec for this, on the same state: the VM stays whole on the old launcher, which
/// reports the handover failed with `why`. Returns only if that is impossible, saying so.
pub(super) fn go_back(bytes: &[u8], why: &str) -> String {
    let fallback = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.at("/fallback_exe").as_i64())
        .and_then(|fd| RawFd::try_from(fd).ok());
    let Some(exe) = fallback else {
        return format!(
            "cannot read the handed-over state ({why}), and the old binary was not kept"
        );
    };
    std::env::set_var(ENV_FALLBACK, why);
    let failed = exec_with(
        Path::new("the old qemu-liveupgrade binary"),
        bytes,
        &[],
        Some(exe),
    );
    format!("cannot read the handed-over state ({why}), and {failed}")
}
