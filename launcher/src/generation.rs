//! One QEMU generation: the argv and fds it gets, and the running process.
//!
//! Every generation is started from the same user command line, rewritten the same way:
//! `-daemonize` and `-pidfile` go (the launcher does both for itself), and a private QMP
//! monitor is added on a socketpair. The fds the command line refers to stay at their numbers;
//! the launcher's own fds are placed at numbers the command line does not use, chosen once in
//! a [`Layout`] so that every generation sees the same numbers.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::unistd::Pid;

use crate::child::{self, ChildError, ExecStatus, Exit, InheritedSignals};
use crate::cmdline::CmdLine;
use crate::installed::FileId;
use crate::listeners::{graphics, hostfwd};
use crate::memfd::{self, Region, Unshareable};
use crate::monitors::{self, ListenOn, Proxied};
use crate::ptys::{self, KeptPty};
use crate::qmp::Qmp;
use crate::relay::Relay;
use crate::resolve::Binary;
use crate::resources::{resources, Resources};
use crate::tapguard::TapGuard;
use crate::taps::{self, NamedTap};
use crate::verdict::Verdict;

/// Id of the chardev and monitor the launcher adds for itself.
pub const PRIVATE_MONITOR_ID: &str = "qemu-liveupgrade-qmp";

/// A failure starting a generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The private monitor's socketpair could not be made.
    #[error("cannot create private monitor socket")]
    Socket(#[source] std::io::Error),
    /// Fork or exec failed.
    #[error(transparent)]
    Spawn(#[from] ChildError),
}

/// Fd numbers fixed for the life of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Inherited fds the command line refers to, open when the launcher started, which every
    /// generation gets.
    pub keep: Vec<RawFd>,
    /// Inherited fds only the first generation gets, at their numbers: with `-incoming`, every
    /// inherited fd no other option names. libvirt's restore passes its stream so, unnamed
    /// (`-incoming defer`, then `migrate-incoming fd:N`), and a QEMU would have inherited it;
    /// later generations are started by the launcher with its own stream and never read it.
    pub first_only: Vec<RawFd>,
    /// Where each generation finds its end of the private monitor.
    pub private_monitor: RawFd,
    /// Where each generation finds the memfds of guest RAM, one per region.
    pub ram: Vec<RawFd>,
    /// Where each generation finds its listening socket for each proxied monitor or chardev.
    pub monitors: Vec<RawFd>,
    /// Where each generation finds the queues of the taps the launcher opened by name.
    pub taps: Vec<RawFd>,
    /// Where each generation finds its socket in place of each pty the launcher holds.
    pub ptys: Vec<RawFd>,
}

impl Layout {
    /// Chooses the layout for a command line with `ram_regions` launcher-owned RAM regions,
    /// `proxied` monitors, `tap_queues` tap fds and `ptys` kept ptys. `inherited` lists the fds
    /// above stderr that were open when the launcher started. Fds named on the command line
    /// but not open are not kept (QEMU reports them), listening fds the launcher serves itself
    /// are not passed on, and no launcher fd is ever placed at a number the command line names
    /// or, under `-incoming`, at any inherited number.
    pub fn new(
        resources: &Resources,
        ram_regions: usize,
        proxied: &[Proxied],
        tap_queues: usize,
        ptys: usize,
        inherited: &[RawFd],
    ) -> Layout {
        let mut named: Vec<RawFd> = resources.fds.iter().map(|f| f.fd).collect();
        named.sort_unstable();
        named.dedup();
        let mut taken = named.clone();
        if resources.incoming.is_some() {
            taken.extend(inherited);
        }
        let mut free = (3..).filter(|n| !taken.contains(n));
        let private_monitor = free.next().unwrap_or(3);
        let ram = free.by_ref().take(ram_regions).collect();
        let monitors = free.by_ref().take(proxied.len()).collect();
        let taps = free.by_ref().take(tap_queues).collect();
        let ptys = free.by_ref().take(ptys).collect();
        let served: Vec<RawFd> = proxied
            .iter()
            .filter_map(|p| match p.listen {
                ListenOn::Fd(fd) => Some(fd),
                ListenOn::Path(_) | ListenOn::Tcp(_) => None,
            })
            .collect();
        // An fd only `-incoming fd:N` names carries the first generation's stream alone.
        let incoming_only = |fd: RawFd| {
            resources
                .fds
                .iter()
                .filter(|f| f.fd == fd)
                .all(|f| f.option == "incoming")
        };
        let keep: Vec<RawFd> = named
            .into_iter()
            .filter(|fd| *fd > 2 && inherited.contains(fd) && !served.contains(fd))
            .filter(|fd| !incoming_only(*fd))
            .collect();
        let first_only = match resources.incoming.is_some() {
            true => inherited
                .iter()
                .copied()
                .filter(|fd| *fd > 2 && !served.contains(fd) && !keep.contains(fd))
                .collect(),
            false => Vec::new(),
        };
        Layout {
            keep,
            first_only,
            private_monitor,
            ram,
            monitors,
            taps,
            ptys,
        }
    }
}

/// The command line and fd layout every generation starts from, derived once from the
/// user's command line.
#[derive(Debug, Clone)]
pub struct Base {
    /// The user's command line with guest RAM rewritten onto the launcher's memfds.
    pub cmd: CmdLine,
    /// The fixed fd layout.
    pub layout: Layout,
    /// The RAM regions the launcher owns, in layout order.
    pub regions: Vec<Region>,
    /// Why RAM is not shared, when it is not.
    pub unshared: Option<String>,
    /// The socket servers the launcher serves, in layout order.
    pub proxied: Vec<Proxied>,
    /// The taps the launcher opens by name, in layout order.
    pub taps: Vec<NamedTap>,
    /// The ptys the launcher holds, in layout order.
    pub ptys: Vec<KeptPty>,
    /// What in the user's command line stops an upgrade, judged once, on the argv as given.
    pub verdict: Verdict,
    /// The VNC and SPICE displays whose ports the launcher holds.
    pub displays: Vec<graphics::Display>,
    /// The fds above stderr that were open at start, which the layout was planned from: a
    /// supervisor handover plans the same base again from them ([`crate::handover`]).
    pub inherited: Vec<RawFd>,
}

impl Base {
    /// Plans the base for `user`; `inherited` lists the fds above stderr open at start.
    pub fn new(user: &CmdLine, inherited: &[RawFd]) -> Base {
        let (regions, unshared) = match memfd::regions(user) {
            Ok(r) => (r, None),
            Err(Unshareable(why)) => (Vec::new(), Some(why)),
        };
        let proxied = monitors::find(user);
        let taps = taps::find(user);
        let queues = taps.iter().map(|t| t.queues).sum();
        let kept = ptys::find(user);
        let layout = Layout::new(
            &resources(user),
            regions.len(),
            &proxied,
            queues,
            kept.len(),
            inherited,
        );
        let verdict = crate::verdict::of_cmdline(user);
        let cmd = memfd::rewrite(user, &regions, &layout.ram);
        let cmd = taps::rewrite(&cmd, &taps, &layout.taps);
        let cmd = ptys::rewrite(&cmd, &kept, &layout.ptys);
        Base {
            cmd,
            layout,
            regions,
            unshared,
            proxied,
            taps,
            ptys: kept,
            verdict,
            displays: graphics::find(user),
            inherited: inherited.to_vec(),
        }
    }

    /// [`Base::new`] for the fds actually open in this process. Call before the process
    /// opens any fd of its own, while its fd table holds only what the caller passed.
    pub fn for_this_process(user: &CmdLine) -> Base {
        Base::new(user, &inherited_fds(user))
    }

    /// [`Base::new`] assuming every fd the command line names is passed open, and no other.
    pub fn assuming_named_open(user: &CmdLine) -> Base {
        Base::new(user, &resources(user).fd_numbers())
    }
}

/// The fds above stderr open in this process: every entry of `/proc/self/fd` but the one
/// reading it, or, without `/proc`, those the command line names that are open.
fn inherited_fds(user: &CmdLine) -> Vec<RawFd> {
    let is_open = |fd: RawFd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok();
    let listed: Option<Vec<RawFd>> = std::fs::read_dir("/proc/self/fd").ok().map(|dir| {
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    });
    // The directory's own fd was among the entries and is closed now.
    let mut fds: Vec<RawFd> = match listed {
        Some(listed) => listed
            .into_iter()
            .filter(|fd| *fd > 2 && is_open(*fd))
            .collect(),
        None => resources(user)
            .fd_numbers()
            .into_iter()
            .filter(|fd| *fd > 2 && is_open(*fd))
            .collect(),
    };
    fds.sort_unstable();
    fds
}

/// What differs between generations.
#[derive(Debug, Clone, Default)]
pub struct GenArgs {
    /// The versioned machine type the first generation resolved its alias to.
    pub machine: Option<String>,
    /// Start waiting for an incoming migration (`-incoming defer`), without `-S`.
    pub incoming: bool,
    /// What the binary accepts, when it was asked: the argv is translated for it
    /// ([`crate::translate`]). The first generation is never translated.
    pub target: Option<crate::translate::Capabilities>,
    /// The generation's own display sockets, in the launcher's private directory.
    pub displays: graphics::Sockets,
    /// The block graph as block jobs and snapshots left it, when a command line must carry
    /// it ([`crate::journal::BlockArgv`]).
    pub block: Option<crate::journal::BlockArgv>,
}

/// The command line a generation runs: the launcher's base command line (the user's, with RAM
/// rewritten), its socket servers and displays pointed at the generation's own sockets, minus
/// what the launcher does itself, plus the private monitor.
pub fn generation_cmdline(base: &Base, args: &GenArgs) -> CmdLine {
    let layout = &base.layout;
    let cmd = monitors::rewrite(&base.cmd, &base.proxied, &layout.monitors, !args.incoming);
    let mut cmd = graphics::rewrite(&cmd, &base.displays, &args.displays);
    cmd.remove_all("daemonize");
    cmd.remove_all("pidfile");
    if let Some(machine) = &args.machine {
        crate::memfd::set_machine_key(&mut cmd, "type", machine);
    }
    if args.incoming {
        monitors::append_to_files(&mut cmd);
        // The old QEMU holds the forwards' ports; this one gets them once it has exited.
        hostfwd::strip(&mut cmd);
        cmd.remove_all("incoming");
        // A snapshot loaded at start would be written into the guest RAM the running QEMU
        // shares; the incoming state replaces it anyway.
        cmd.remove_all("loadvm");
        cmd.push("incoming", Some("defer"));
        // Without -S the incoming guest ends in the run state the old QEMU sent with it
        // (`process_incoming_migration_bh`: running, paused, prelaunch, suspended), at once:
        // a -S destination stays paused and waits for `cont`, a monitor round trip inside
        // the guest's pause.
        cmd.remove_all("S");
    }
    if let Some(block) = &args.block {
        block.apply(&mut cmd);
    }
    cmd.push(
        "chardev",
        Some(&format!(
            "socket,id={PRIVATE_MONITOR_ID},fd={}",
            layout.private_monitor
        )),
    );
    cmd.push(
        "mon",
        Some(&format!("chardev={PRIVATE_MONITOR_ID},mode=control")),
    );
    // Options the binary lacks become their equivalents; what has none was refused before.
    match args
        .target
        .as_ref()
        .map(|caps| crate::translate::translate(&cmd, caps))
    {
        Some(Ok(translated)) => translated.cmd,
        _ => cmd,
    }
}

/// Where a generation's stdio goes.
#[derive(Debug, Default)]
pub struct Stdio<'a> {
    /// Replacements for fds 0, 1 and 2; `None` inherits the launcher's.
    pub fds: [Option<BorrowedFd<'a>>; 3],
}

/// The fds a generation gets besides those it inherits at their own numbers.
#[derive(Debug)]
pub struct Fds<'a> {
    /// Where everything goes.
    pub layout: &'a Layout,
    /// Its stdio.
    pub stdio: Stdio<'a>,
    /// Launcher fds (guest RAM) put at their layout numbers: `(fd, number)`.
    pub place: Vec<(BorrowedFd<'a>, RawFd)>,
    /// Start under the tap guard's seccomp filter ([`crate::tapguard`]).
    pub tap_guard: Option<&'a [libc::sock_filter]>,
    /// A signal the child sends itself just before exec (test fault hook).
    pub before_exec: Option<nix::sys::signal::Signal>,
}

/// Closes the launcher's copies of the fds only the first generation gets, once it holds its
/// own: an incoming stream's reader or file, which QEMU alone consumes and closes. Kept open
/// here, a restored save file would stay open for the life of the VM.
fn release_first_only(layout: &Layout) {
    for &fd in &layout.first_only {
        // SAFETY: the fd was inherited and nothing in this process wraps it: the layout kept
        // every launcher-made fd off the inherited numbers, and only the first spawn reads
        // these numbers, which happens once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// A QEMU generation: a child process from fork to reaping, and what the launcher holds of
/// it. Dropping one that was never reaped kills it: no QEMU outlives the value that stands
/// for it.
#[derive(Debug)]
pub struct Generation {
    /// 1 for the first QEMU, counting up with every upgrade.
    pub number: u32,
    /// QEMU's pid, a child of the launcher.
    pub pid: Pid,
    /// The binary it runs.
    pub binary: Binary,
    /// The file that binary's path named when it was started, to tell a replaced one.
    pub started_from: Option<FileId>,
    /// The launcher's end of its private monitor.
    pub qmp: Qmp,
    /// When it was started.
    pub started: Instant,
    /// Its `query-version` reply, once known.
    pub version: Option<serde_json::Value>,
    /// Answers its tap ioctls, for generations started while another runs the guest; set
    /// once it executed QEMU.
    pub tap_guard: Option<TapGuard>,
    /// Its exec status while it is still to come.
    pub exec: Option<ExecStatus>,
    /// Its stderr, when it goes through the launcher (every generation after the first).
    pub stderr: Option<Relay>,
    /// How it ended, once reaped.
    pub exit: Option<Exit>,
}

impl Generation {
    /// Starts generation `number` of `cmd` (already rewritten by [`generation_cmdline`]), with
    /// the launcher's fds in `place` put at their layout numbers. Returns once forked: whether
    /// it executed QEMU comes later, through [`Generation::exec`].
    pub fn spawn(
        number: u32,
        binary: Binary,
        argv0: &OsString,
        cmd: &CmdLine,
        fds: &Fds<'_>,
        signals: &InheritedSignals,
    ) -> Result<Generation, GenerationError> {
        let (ours, theirs) = UnixStream::pair().map_err(GenerationError::Socket)?;
        let theirs = OwnedFd::from(theirs);
        let qmp = Qmp::new(ours).map_err(GenerationError::Socket)?;
        let mut argv = vec![argv0.clone()];
        argv.extend(cmd.to_args());
        let mut keep = fds.layout.keep.clone();
        if number == 1 {
            keep.extend(&fds.layout.first_only);
        }
        let spec = child::Spec {
            program: &binary.path,
            argv,
            keep,
            place: [(theirs.as_fd(), fds.layout.private_monitor)]
                .into_iter()
                .chain(fds.place.iter().copied())
                .collect(),
            stdio: fds.stdio.fds,
            signals,
            seccomp: fds.tap_guard,
            before_exec: fds.before_exec,
        };
        let started_from = FileId::of(&binary.path);
        let started = child::spawn(&spec)?;
        drop(theirs);
        // The child has its copies from the fork on.
        if number == 1 {
            release_first_only(fds.layout);
        }
        Ok(Generation {
            number,
            pid: started.pid,
            binary,
            started_from,
            qmp,
            started: Instant::now(),
            version: None,
            tap_guard: None,
            exec: Some(started.exec),
            stderr: None,
            exit: None,
        })
    }

    /// Takes the exec status once its pipe is readable: `None` while still to come (or
    /// already taken), else whether QEMU was executed. On success the tap guard's listener,
    /// if the child installed one, is kept.
    pub fn on_exec_status(&mut self) -> Option<Result<(), ChildError>> {
        let done = self.exec.as_mut()?.poll()?;
        self.exec = None;
        Some(done.map(|executed| {
            self.tap_guard = executed.listener.map(TapGuard::new);
        }))
    }

    /// `"7.2.22"` from the `query-version` reply, once known.
    pub fn version_string(&self) -> Option<String> {
        let q = self.version.as_ref()?.get("qemu")?;
        Some(format!(
            "{}.{}.{}",
            q.get("major")?,
            q.get("minor")?,
            q.get("micro")?
        ))
    }
}

/// The running generation as a supervisor handover writes it ([`crate::handover`]).
impl Generation {
    /// Its part of the handed-over state. Only a generation that executed QEMU and was not
    /// reaped is handed over: the current one, between upgrades.
    pub(crate) fn export(&self) -> crate::handover::state::Generation {
        crate::handover::state::Generation {
            number: self.number,
            pid: self.pid.as_raw(),
            binary: self.binary.export(),
            qmp: self.qmp.export(),
            uptime_ms: crate::handover::millis(self.started.elapsed()),
            version: self.version.clone(),
            tap_guard: self.tap_guard.as_ref().map(TapGuard::export),
            stderr: self.stderr.as_ref().map(Relay::export),
            started_from: self.started_from.as_ref().map(FileId::export),
        }
    }

    /// The generation a handover brought: QEMU still runs as this process's child.
    pub(crate) fn import(
        s: crate::handover::state::Generation,
        take: &mut crate::handover::fds::Take,
    ) -> Result<Generation, crate::handover::ImportError> {
        use crate::handover::ImportError;
        let stream = UnixStream::from(take.owned(s.qmp.fd)?);
        let qmp = Qmp::import(s.qmp, stream).map_err(ImportError::io("the private monitor"))?;
        let tap_guard = match &s.tap_guard {
            Some(g) => Some(TapGuard::import(g, take.owned(g.fd)?)),
            None => None,
        };
        let stderr = match s.stderr {
            Some(r) => {
                let fd = take.owned(r.fd)?;
                Some(Relay::import(r, fd))
            }
            None => None,
        };
        Ok(Generation {
            number: s.number,
            pid: Pid::from_raw(s.pid),
            binary: Binary::import(&s.binary),
            qmp,
            started: crate::handover::since(s.uptime_ms),
            version: s.version,
            tap_guard,
            exec: None,
            stderr,
            exit: None,
            started_from: s.started_from.as_ref().map(FileId::import),
        })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Not reaped yet, so the pid is still this child's and cannot name another process.
        if self.exit.is_none() {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::fixtures::args;

    fn base(argv: &[&str], inherited: &[RawFd]) -> Base {
        Base::new(&CmdLine::parse(&args(argv)).unwrap(), inherited)
    }

    /// libvirt's restore: `-incoming defer`, the stream passed unnamed at fd 25 for a later
    /// `migrate-incoming fd:25`, the monitor's listening socket at 28 and a log at 27.
    const RESTORE: &[&str] = &[
        "-chardev",
        "socket,id=charmonitor,fd=28,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-add-fd",
        "set=0,fd=27,opaque=serial0-log",
        "-incoming",
        "defer",
    ];

    #[test]
    fn under_incoming_the_first_generation_inherits_the_unnamed_stream() {
        let b = base(RESTORE, &[3, 25, 27, 28]);
        assert_eq!(b.layout.keep, vec![27]);
        assert_eq!(
            b.layout.first_only,
            vec![3, 25],
            "every inherited fd but those served"
        );
        let launcher_fds: Vec<RawFd> = [b.layout.private_monitor]
            .iter()
            .chain(&b.layout.ram)
            .chain(&b.layout.monitors)
            .copied()
            .collect();
        for fd in [3, 25, 27, 28] {
            assert!(!launcher_fds.contains(&fd), "{fd} in {launcher_fds:?}");
        }
        // The first generation keeps the user's -incoming; later ones get the launcher's.
        let first = generation_cmdline(&b, &GenArgs::default()).to_args();
        assert!(first.windows(2).any(|w| w == args(&["-incoming", "defer"])));
        let later = GenArgs {
            incoming: true,
            ..GenArgs::default()
        };
        let later = generation_cmdline(&b, &later).to_args();
        assert_eq!(later.iter().filter(|a| *a == "-incoming").count(), 1);
    }

    #[test]
    fn later_generations_start_without_s_to_run_the_guest_as_it_ran() {
        let b = base(&["-S", "-m", "256"], &[]);
        let first = generation_cmdline(&b, &GenArgs::default()).to_args();
        assert!(first.contains(&"-S".into()), "{first:?}");
        let later = GenArgs {
            incoming: true,
            ..GenArgs::default()
        };
        let later = generation_cmdline(&b, &later).to_args();
        assert!(!later.contains(&"-S".into()), "{later:?}");
    }

    #[test]
    fn an_fd_only_incoming_names_goes_to_the_first_generation_alone() {
        let b = base(&["-incoming", "fd:4", "-add-fd", "set=0,fd=5"], &[4, 5, 9]);
        assert_eq!(b.layout.keep, vec![5]);
        assert_eq!(b.layout.first_only, vec![4, 9]);
    }

    #[test]
    fn without_incoming_unnamed_fds_stay_with_the_launcher() {
        let b = base(&["-add-fd", "set=0,fd=5"], &[3, 5, 25]);
        assert_eq!(b.layout.keep, vec![5]);
        assert!(b.layout.first_only.is_empty());
        assert_eq!(
            b.layout.private_monitor, 3,
            "only named numbers are avoided"
        );
    }

    #[test]
    fn the_launcher_closes_its_copies_once_the_first_generation_runs() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let layout = Layout {
            keep: Vec::new(),
            first_only: vec![std::os::fd::IntoRawFd::into_raw_fd(r)],
            private_monitor: 0,
            ram: Vec::new(),
            monitors: Vec::new(),
            taps: Vec::new(),
            ptys: Vec::new(),
        };
        release_first_only(&layout);
        // The read end is gone everywhere: the write end now fails with EPIPE.
        let err = nix::unistd::write(&w, b"x").unwrap_err();
        assert_eq!(err, nix::errno::Errno::EPIPE);
    }
}
