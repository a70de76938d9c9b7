//! A VM under the shim whose QEMU can be swapped the way a package upgrade swaps it.
//!
//! The shim is told the real QEMU is `<dir>/qemu`, a symlink. Repointing that symlink to
//! another build is what `apt` does to `/usr/bin/qemu-system-x86_64`: the next generation the
//! shim starts runs whatever the path names by then.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::shim::{reports, shim_command};
use crate::{guest_argv, qemu_build, tempdir, wait_until, Qmp, TempDir, Vm};

/// How long a test waits for one upgrade report. Generous: CI machines are shared.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(90);

/// A heartbeat VM under the shim, with a user QMP socket and a swappable QEMU.
pub struct UpgradeVm {
    /// The test's directory: the QEMU symlink, sockets, control sockets.
    pub dir: TempDir,
    /// The running shim.
    pub vm: Vm,
}

impl UpgradeVm {
    /// Starts the heartbeat guest with `mem_mib` MiB on QEMU `version` under the shim, plus
    /// `extra` QEMU arguments, and waits for READY unless `-S` is among them.
    pub fn start(version: &str, mem_mib: u64, extra: &[&str]) -> UpgradeVm {
        Self::start_with(version, guest_argv(mem_mib), extra, &[])
    }

    /// [`UpgradeVm::start`] with the guest argv given and extra environment.
    pub fn start_with(
        version: &str,
        argv: Vec<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> UpgradeVm {
        let dir = tempdir();
        symlink(qemu_build(version), dir.join("qemu")).expect("symlink qemu");
        fs::create_dir_all(dir.join("run")).expect("mkdir run");
        let mut cmd = shim_command(&dir.join("qemu"), &dir.join("run"));
        cmd.args(argv)
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let vm = Vm::spawn(cmd);
        if !extra.contains(&"-S") {
            vm.wait_ready(Duration::from_secs(60));
        }
        UpgradeVm { dir, vm }
    }

    /// The user's QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Connects a QMP client the way a user or libvirt does.
    pub fn connect(&self) -> Qmp {
        let mut qmp = Qmp::connect_unix(self.qmp_path(), Duration::from_secs(10));
        qmp.set_timeout(Duration::from_secs(30));
        qmp
    }

    /// The control socket directory, for `qemu-liveupgrade`.
    pub fn rundir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Repoints the QEMU path at build `version`, atomically, as a package upgrade would.
    pub fn install(&self, version: &str) {
        self.install_path(&qemu_build(version));
    }

    /// Repoints the QEMU path at any file.
    pub fn install_path(&self, target: &Path) {
        let tmp = self.dir.join("qemu.new");
        let _ = fs::remove_file(&tmp);
        symlink(target, &tmp).expect("symlink");
        fs::rename(&tmp, self.dir.join("qemu")).expect("rename symlink");
    }

    /// Sends SIGUSR2 and returns the report of the upgrade it started.
    pub fn upgrade(&self) -> Value {
        let before = reports(&self.vm).len();
        self.vm.signal(Signal::SIGUSR2);
        self.wait_report(before)
    }

    /// Waits for report number `index` (0-based) on the shim's stderr.
    pub fn wait_report(&self, index: usize) -> Value {
        wait_until(UPGRADE_TIMEOUT, "the upgrade report", || {
            reports(&self.vm).len() > index
        });
        reports(&self.vm)[index].clone()
    }

    /// Asserts the guest is alive and its memory intact: at least `n` heartbeats after now,
    /// counters consecutive, no memory error ever.
    pub fn assert_guest_healthy(&self, n: usize) {
        let now = Instant::now();
        let beats = self
            .vm
            .wait_heartbeats_after(now, n, Duration::from_secs(60));
        for pair in beats.windows(2) {
            assert_eq!(
                pair[1].counter,
                pair[0].counter + 1,
                "heartbeats lost or repeated"
            );
        }
        let errors = self.vm.errors();
        assert!(errors.is_clean(), "guest memory errors: {errors:?}");
    }
}

/// Migration capabilities as a QMP client sees them: `{name: state}`.
pub fn capabilities(qmp: &mut Qmp) -> Value {
    let caps = qmp.execute("query-migrate-capabilities", json!({}));
    let mut map = serde_json::Map::new();
    for c in caps.as_array().expect("capability list") {
        map.insert(
            c["capability"].as_str().unwrap().to_owned(),
            c["state"].clone(),
        );
    }
    Value::Object(map)
}

/// `"7.2.22"` from a `query-version` reply.
pub fn version(reply: &Value) -> String {
    let q = &reply["qemu"];
    format!("{}.{}.{}", q["major"], q["minor"], q["micro"])
}

/// Checks the report's `pause` timeline against the order a swap goes through: the old QEMU
/// stops the guest after `migrate`, the new one runs it (by itself, or after the `cont` a
/// destination started with -S needs: `cont` true), the launcher learns of it, and only then
/// are consoles and monitor clients switched over and the old QEMU killed. The old QEMU may
/// report the stream's end after all that, or not before it is killed. QEMU's moments come
/// from its events' wall-clock stamps, so those are compared with a margin for reading the
/// two clocks at slightly different moments.
pub fn assert_pause_in_order(report: &Value, cont: bool) {
    let p = &report["pause"];
    let at = |k: &str| {
        p[format!("{k}_us")]
            .as_i64()
            .unwrap_or_else(|| panic!("pause has no {k}_us: {p}"))
    };
    const MARGIN: i64 = 1000;
    assert!(p["migrate_monotonic_us"].as_i64().is_some(), "{p}");
    let (stop, resume, seen) = (at("old_stop"), at("resume"), at("seen"));
    assert!(stop > -MARGIN, "STOP before migrate: {p}");
    assert!(resume > stop, "RESUME before STOP: {p}");
    if let Some(end) = p["stream_end_us"].as_i64() {
        assert!(end >= stop, "stream ended before STOP: {p}");
    }
    assert_eq!(p["cont_us"].is_i64(), cont, "cont: {p}");
    if cont {
        assert!(at("cont") >= seen && resume > at("cont") - MARGIN, "{p}");
    } else {
        assert!(seen > resume - MARGIN, "completion seen before RESUME: {p}");
    }
    let switched = at("switched");
    assert!(
        switched >= seen.max(p["cont_us"].as_i64().unwrap_or(seen)),
        "{p}"
    );
    assert!(
        at("old_killed") >= switched,
        "old QEMU killed before the switch: {p}"
    );
    assert_eq!(
        p["guest_stopped_us"].as_i64(),
        Some(resume - stop),
        "guest_stopped_us: {p}"
    );
}
