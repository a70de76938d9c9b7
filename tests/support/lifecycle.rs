//! The same VM run two ways, plain QEMU and the shim in front of it, for tests that compare
//! what a lifecycle operation does to each: save and restore through a file, an incoming
//! migration in any of its forms, a live migration between the two.
//!
//! A VM's state is saved the way libvirt saves it (`virsh save`): guest stopped, the file
//! handed to QEMU with `getfd`, `migrate fd:NAME`. It is restored the way libvirt restores it:
//! a new QEMU started with `-incoming defer` and the file inherited at an fd number no option
//! names, then `migrate-incoming fd:N` (libvirt's `qemuProcessIncomingDefNew` and
//! `virCommandPassFD`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::shim::shim_command;
use crate::{qemu_build, tempdir, wait_until, Heartbeat, Qmp, TempDir, Vm};

/// How long a migration of a small test guest may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// The real QEMU, executed directly.
    Plain,
    /// The shim, running the real QEMU as its child.
    Shim,
}

impl std::fmt::Display for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runner::Plain => "plain QEMU",
            Runner::Shim => "shim",
        })
    }
}

/// A heartbeat VM run by `runner`, with a user QMP socket in its own directory.
pub struct LcVm {
    /// Who runs it.
    pub runner: Runner,
    /// Its directory: the QEMU symlink the shim resolves, the QMP socket, control sockets.
    pub dir: TempDir,
    /// The process libvirt or a script would track: QEMU itself, or the shim.
    pub vm: Vm,
}

/// How to start an [`LcVm`].
pub struct Start<'a> {
    /// Who runs it.
    pub runner: Runner,
    /// The QEMU build (`"7.2.22"`).
    pub version: &'a str,
    /// QEMU's arguments, without the QMP socket (added).
    pub argv: Vec<String>,
    /// Files the process inherits at the given fd numbers, named by no option unless
    /// `argv` names them (`-incoming fd:N`).
    pub fds: Vec<(&'a File, RawFd)>,
}

impl LcVm {
    /// Starts the VM; does not wait for the guest.
    pub fn start(start: Start<'_>) -> LcVm {
        let dir = tempdir();
        let qemu = dir.join("qemu");
        symlink(qemu_build(start.version), &qemu).expect("symlink qemu");
        std::fs::create_dir_all(dir.join("run")).expect("mkdir run");
        let mut cmd = match start.runner {
            Runner::Plain => Command::new(&qemu),
            Runner::Shim => shim_command(&qemu, &dir.join("run")),
        };
        cmd.args(&start.argv).arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ));
        let pairs: Vec<(RawFd, RawFd)> = start
            .fds
            .iter()
            .map(|(f, at)| (f.as_fd().as_raw_fd(), *at))
            .collect();
        // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which are
        // async-signal-safe, on fds the parent holds open (the borrowed files outlive spawn).
        unsafe {
            cmd.pre_exec(move || {
                for &(from, at) in &pairs {
                    if from == at {
                        // dup2 onto itself keeps close-on-exec; clear it instead.
                        if libc::fcntl(at, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(from, at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let vm = Vm::spawn(cmd);
        LcVm {
            runner: start.runner,
            dir,
            vm,
        }
    }

    /// The user's QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// A QMP connection on the user's socket.
    pub fn qmp(&self) -> Qmp {
        let mut qmp = Qmp::connect_unix(self.qmp_path(), Duration::from_secs(30));
        qmp.set_timeout(Duration::from_secs(30));
        qmp
    }

    /// The control socket directory (the shim's).
    pub fn rundir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Repoints the QEMU the shim resolves at build `version`, as a package upgrade would.
    pub fn install(&self, version: &str) {
        let tmp = self.dir.join("qemu.new");
        let _ = std::fs::remove_file(&tmp);
        symlink(qemu_build(version), &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("qemu")).expect("rename symlink");
    }

    /// Waits for `n` heartbeats after now; checks they are consecutive and the guest has seen
    /// no memory error. Returns them.
    pub fn assert_alive(&self, n: usize, what: &str) -> Vec<Heartbeat> {
        let beats = self
            .vm
            .wait_heartbeats_after(Instant::now(), n, Duration::from_secs(60));
        consecutive(&beats, what);
        let errors = self.vm.errors();
        assert!(
            errors.is_clean(),
            "{what} ({}): guest memory errors: {errors:?}",
            self.runner
        );
        beats
    }
}

/// Panics unless the counters go up by one.
pub fn consecutive(beats: &[Heartbeat], what: &str) {
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1].counter,
            pair[0].counter + 1,
            "{what}: heartbeats not consecutive"
        );
    }
}

/// `query-status`'s `status`: `running`, `paused`, `inmigrate`, `postmigrate`...
pub fn run_state(qmp: &mut Qmp) -> String {
    qmp.execute("query-status", Value::Null)["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until `query-status` says `state`.
pub fn wait_run_state(qmp: &mut Qmp, state: &str, timeout: Duration) {
    let mut last = String::new();
    wait_until(timeout, &format!("run state {state}"), || {
        last = run_state(qmp);
        last == state
    });
}

/// Polls `query-migrate` until the migration is over; returns its last reply. Panics when it
/// failed.
pub fn wait_migration(qmp: &mut Qmp, what: &str) -> Value {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", Value::Null);
        match info["status"].as_str() {
            Some("completed") => return info,
            Some("failed") | Some("cancelled") => panic!("{what}: migration ended: {info}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{what}: migration not over in {MIGRATION_TIMEOUT:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Saves the VM's state to `path` as `virsh save` does: guest stopped, file passed by
/// `getfd`, `migrate fd:`. Returns the last heartbeat seen before the stop.
pub fn save(vm: &LcVm, qmp: &mut Qmp, path: &Path) -> Heartbeat {
    qmp.execute("stop", Value::Null);
    let last = vm.vm.last_heartbeat().expect("a heartbeat before the save");
    let file = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    qmp.execute_with_fd("getfd", json!({"fdname": "migrate"}), file.as_fd());
    qmp.execute("migrate", json!({"uri": "fd:migrate"}));
    wait_migration(qmp, &format!("save by {}", vm.runner));
    last
}

/// Lets a migration use the whole loopback: QEMU 7.2's default cap is 32 MiB/s.
pub fn unlimited_bandwidth(qmp: &mut Qmp) {
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    );
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// Whether process `pid` holds an fd open on `path`.
pub fn holds_file(pid: nix::unistd::Pid, path: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| target == path)
}

/// The heartbeat guest with `mib` MiB as libvirt 9.0 starts a domain (see FACTS.md): `-S`,
/// a versioned machine type with its RAM in a `memory-backend-ram` object named `pc.ram`,
/// JSON `-object`/`-device`/`-blockdev`, the disk `disk` (qcow2) on a virtio-blk device, the
/// serial console on stdio, `-no-shutdown`, `-sandbox` and `-msg`. Both sides of a migration
/// get the same argv, as libvirt gives the destination the domain's.
pub fn libvirt_argv(mib: u64, disk: &Path) -> Vec<String> {
    let bytes = mib << 20;
    let blockdev_file = serde_json::json!({
        "driver": "file", "filename": disk.display().to_string(),
        "node-name": "libvirt-1-storage", "auto-read-only": true, "discard": "unmap",
    });
    [
        "-name",
        "guest=lc-migration,debug-threads=on",
        "-S",
        "-machine",
        "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel",
        "tcg",
        "-m",
        &mib.to_string(),
        "-object",
        &format!(r#"{{"qom-type":"memory-backend-ram","id":"pc.ram","size":{bytes}}}"#),
        "-overcommit",
        "mem-lock=off",
        "-smp",
        "1,sockets=1,cores=1,threads=1",
        "-no-user-config",
        "-nodefaults",
        "-rtc",
        "base=utc",
        "-no-shutdown",
        "-boot",
        "strict=on",
        "-kernel",
        &crate::guest_elf().display().to_string(),
        "-append",
        &format!("mem={mib}M"),
        "-device",
        r#"{"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"}"#,
        "-blockdev",
        &blockdev_file.to_string(),
        "-blockdev",
        r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage"}"#,
        "-device",
        r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
        "-chardev",
        "stdio,id=charserial0",
        "-device",
        r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg",
        "timestamp=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
