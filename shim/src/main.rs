//! `qemu-liveupgrade-shim`: installed in place of `qemu-system-<arch>`.
//!
//! To whatever runs it, it is QEMU: invocations that start no VM are handed to the real binary
//! with `execv`, so pid, output and status are QEMU's own. Invocations that start a VM keep
//! this process as the VM's pid; the real QEMU runs as its child, and this process ends the way
//! QEMU ends.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use launcher::child::InheritedSignals;
use launcher::cmdline::CmdLine;
use launcher::config::Settings;
use launcher::daemonize::{self, Pidfile};
use launcher::error_chain;
use launcher::generation::Base;
use launcher::handover;
use launcher::memfd;
use launcher::resolve::{self, Binary};
use launcher::supervisor::{Config, Exit, Supervisor};

/// Counts the bytes the launcher holds, for `qemu-liveupgrade status` and `scripts/soak`.
#[global_allocator]
static ALLOC: launcher::heap::Counting = launcher::heap::Counting;

fn main() -> ExitCode {
    // A launcher handing its VM over executes this binary in place, or asks it first whether
    // it would take the VM: neither is a VM start, and the first starts with signals blocked.
    match handover::incoming() {
        handover::Incoming::Check => {
            return match handover::check_mode() {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(1),
            }
        }
        handover::Incoming::Resume(fd) => {
            return match handover::resume(fd) {
                Ok(exit) => end_like(exit),
                Err(message) => {
                    let argv0 = std::env::args_os().next().unwrap_or_default();
                    let prog = resolve::invoked_name(&argv0).to_string_lossy().into_owned();
                    last_words(&format!("{prog}: qemu-liveupgrade: {message}"));
                    ExitCode::from(1)
                }
            }
        }
        handover::Incoming::None => {}
    }
    // Before anything changes them: every QEMU gets the signal state this process was given.
    let signals = InheritedSignals::capture();
    let mut args = std::env::args_os();
    let argv0 = args
        .next()
        .unwrap_or_else(|| OsString::from("qemu-system-x86_64"));
    let rest: Vec<OsString> = args.collect();
    let prog = resolve::invoked_name(&argv0).to_string_lossy().into_owned();
    // Once daemonized, the foreground waits until this is dropped too: an error is printed
    // first, as QEMU prints its own before its foreground exits.
    let mut foreground = None;
    match launch(&argv0, rest, signals, &mut foreground) {
        Ok(exit) => end_like(exit),
        Err(message) => {
            last_words(&format!("{prog}: {message}"));
            drop(foreground);
            ExitCode::from(1)
        }
    }
}

/// Prints the error the launcher ends with, after what still waits for its stderr, as QEMU
/// prints its own on the way out. A stderr that is gone is no reason to panic, and one nobody
/// reads keeps the launcher (and a QEMU that dies with it) for a second at most.
fn last_words(line: &str) {
    launcher::stderr_line(line);
    launcher::stdio::drain(std::time::Instant::now() + std::time::Duration::from_secs(1));
}

/// Runs the VM described by `args`, or hands a query to QEMU. Errors are one line of text.
fn launch(
    argv0: &OsString,
    args: Vec<OsString>,
    signals: InheritedSignals,
    foreground: &mut Option<OwnedFd>,
) -> Result<Exit, String> {
    let cmd = match CmdLine::parse(&args) {
        Ok(cmd) => cmd,
        // Options the launcher cannot follow are refused here; anything else malformed is for
        // QEMU to judge, in its own words.
        Err(e) if e.is_refusal() => return Err(error_chain(&e)),
        Err(_) => return pass_through(argv0, &args),
    };
    if cmd.is_info_only() {
        return pass_through(argv0, &args);
    }
    let base = Base::for_this_process(&cmd);
    let settings =
        Settings::from_env(|name| std::env::var_os(name)).map_err(|e| error_chain(&e))?;
    let binary = resolve::resolve(argv0).map_err(|e| error_chain(&e))?;
    let daemon = if cmd.has("daemonize") {
        let daemon = daemonize::daemonize().map_err(|e| error_chain(&e))?;
        *foreground = daemon.guard();
        Some(daemon)
    } else {
        None
    };
    let mut signals = signals;
    if daemon.is_some() {
        // QEMU ignores job-control stops once daemonized; its child here never daemonizes, so
        // it inherits the same from us.
        signals.ignore_job_control();
    }
    let pidfile = match cmd.opts("pidfile").last().and_then(|o| o.arg.clone()) {
        Some(path) => match Pidfile::create(path.as_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                return Err(error_chain(&e));
            }
        },
        None => None,
    };
    let ram = match base
        .regions
        .iter()
        .map(memfd::create)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(ram) => ram,
        Err(e) => {
            return Err(error_chain(&e));
        }
    };
    // Taps given by name are opened here, once, as QEMU would open them at start.
    let mut taps = Vec::new();
    for tap in &base.taps {
        match launcher::taps::open(tap) {
            Ok(t) => taps.push(t),
            Err(e) => {
                taps.into_iter().for_each(launcher::taps::OpenTap::close);
                return Err(error_chain(&e));
            }
        }
    }
    // Ptys too, each announced on stdout as QEMU announces the one it opens.
    let mut ptys = Vec::new();
    for pty in &base.ptys {
        match launcher::ptys::open(pty) {
            Ok(p) => ptys.push(p),
            Err(e) => {
                taps.into_iter().for_each(launcher::taps::OpenTap::close);
                return Err(error_chain(&e));
            }
        }
    }
    // As QEMU's printf does, a stdout that cannot be written is no reason to stop.
    let mut stdout = std::io::stdout().lock();
    for pty in &ptys {
        let _ = writeln!(stdout, "{}", pty.announcement());
    }
    let _ = stdout.flush();
    drop(stdout);
    launcher::ptys::publish(&ptys);
    let config = Config {
        argv0: argv0.clone(),
        base,
        ram,
        taps,
        ptys,
        binary,
        signals,
        daemon,
        settings,
        pidfile,
    };
    // The pidfile goes with the supervisor, when the VM ends.
    Supervisor::start(config)
        .and_then(Supervisor::run)
        .map_err(|e| error_chain(&e))
}

/// Replaces this process with the real QEMU, argv untouched.
fn pass_through(argv0: &OsString, args: &[OsString]) -> Result<Exit, String> {
    let Binary { path, .. } = resolve::resolve(argv0).map_err(|e| error_chain(&e))?;
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| "argument contains a NUL byte".to_owned());
    let program = cstr(path.as_os_str().as_bytes())?;
    let mut argv = vec![cstr(argv0.as_bytes())?];
    for a in args {
        argv.push(cstr(a.as_bytes())?);
    }
    let err = nix::unistd::execv(&program, &argv).unwrap_err();
    Err(format!("cannot execute {}: {}", path.display(), err.desc()))
}

/// Ends this process the way QEMU ended: the same exit code, or death by the same signal.
fn end_like(exit: Exit) -> ExitCode {
    match exit {
        Exit::Code(code) => ExitCode::from(code as u8),
        Exit::Signal(sig) => {
            // Die of the signal itself, so a waiting parent sees WIFSIGNALED with QEMU's
            // signal. No core: it would be this process's, not QEMU's.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit and signal with valid arguments; raise delivers the signal to
            // this single-threaded process with the default action restored just before.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(sig as libc::c_int, libc::SIG_DFL);
            }
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(sig);
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(sig);
            ExitCode::from(128u8.wrapping_add(sig as u8))
        }
    }
}
