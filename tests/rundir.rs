//! Control sockets of VMs that run as another user than root, as libvirt's packaged
//! configuration runs them (as `libvirt-qemu`, without `XDG_RUNTIME_DIR`): the launcher binds
//! in `/run/qemu-liveupgrade/<uid>/`, and root's `qemu-liveupgrade` lists, shows and upgrades
//! the VM. A directory someone else made first under that uid's name is refused: the VM runs
//! without a control socket and says so in one line, and the CLI skips the directory. The CLI
//! takes a socket for a VM only when the launcher it is named for answers on it.
//!
//! Root's CLI upgrade of such a VM also carries a vCPU thread's cgroup over: root moved the
//! old thread into a cgroup of its own (as libvirt does with `.../vcpu0`), the launcher may
//! not write that cgroup's files, and the placer service moves the new thread there.
//!
//! A placer slow to answer costs the upgrade its deadline, never the VM's console: the launcher
//! waits for each answer in its loop.
//!
//! Each test runs its VM as a uid of its own that no account has (the kernel needs none), so
//! tests running at once, and the real `libvirt-qemu` directory, are never touched.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::unistd::{chown, Gid, Pid, Uid};
use qemu_liveupgrade_tests::libvirt::{
    domain_dir, ensure_placer, install_emulator, reachable_copy,
};
use qemu_liveupgrade_tests::shim::{cli_json, output_within, reports, wait_qemu_child};
use qemu_liveupgrade_tests::{cli_bin, guest_argv, guest_elf, qemu_build, wait_until, TempDir, Vm};
use serde_json::Value;

const BASE: &str = "/run/qemu-liveupgrade";
const OLD: &str = "7.2.22";
const NEW: &str = "10.0.2";

/// A uid no account and no other test uses: `3_000_000 + 4 * (pid mod 1_000_000) + k`.
fn test_uid(k: u32) -> Uid {
    Uid::from_raw(3_000_000 + 4 * (std::process::id() % 1_000_000) + k)
}

/// The directory of `uid` under [`BASE`], removed before and after the test.
struct UidDir(PathBuf);

impl UidDir {
    fn new(uid: Uid) -> UidDir {
        let dir = UidDir(Path::new(BASE).join(uid.to_string()));
        let _ = fs::remove_dir_all(&dir.0);
        dir
    }
}

impl Drop for UidDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The heartbeat guest under the shim, run as `uid` with the environment libvirt gives an
/// emulator (no `XDG_RUNTIME_DIR`), its files in a directory that uid can reach.
fn start_as(uid: Uid) -> (TempDir, Vm) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run VMs as other users and look in {BASE}: run them as root"
    );
    let dir = domain_dir();
    let shim = install_emulator(dir.path(), None);
    let kernel = reachable_copy(dir.path(), &guest_elf());
    let mut argv = guest_argv(64);
    // Thread names, so that the test finds the vCPU thread as libvirt does not need to.
    argv.extend(["-name".into(), "guest=qlu-rundir,debug-threads=on".into()]);
    let at = argv.iter().position(|a| a == "-kernel").expect("-kernel") + 1;
    argv[at] = kernel.display().to_string();
    let mut cmd = Command::new(&shim);
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir.path())
        .env("QEMU_LIVEUPGRADE_BINARY", qemu_build(OLD))
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
        .args(argv)
        .uid(uid.as_raw())
        .gid(uid.as_raw());
    let vm = Vm::spawn(cmd);
    vm.wait_ready(Duration::from_secs(60));
    (dir, vm)
}

/// Runs root's `qemu-liveupgrade ARGS`, with the default directories.
fn cli(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(cli_bin());
    cmd.args(args).env_remove("QEMU_LIVEUPGRADE_RUNDIR");
    output_within(cmd, Duration::from_secs(120))
}

fn cli_ok(args: &[&str]) -> Value {
    let mut cmd = Command::new(cli_bin());
    cmd.args(args).env_remove("QEMU_LIVEUPGRADE_RUNDIR");
    cli_json(cmd, &args.join(" "))
}

/// A cgroup of the v1 `cpu` hierarchy made for one test, removed once empty.
struct Cgroup(PathBuf);

impl Cgroup {
    /// `test` names it apart from the cgroups of the other tests running at once.
    fn new(test: &str) -> Cgroup {
        let path = PathBuf::from(format!(
            "/sys/fs/cgroup/cpu/qlu-rundir-{}-{test}",
            std::process::id()
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup(path)
    }

    /// The path in `/proc/TID/cgroup` terms.
    fn name(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_string_lossy())
    }

    fn add(&self, tid: Pid) {
        fs::write(self.0.join("tasks"), tid.to_string())
            .unwrap_or_else(|e| panic!("moving thread {tid} into {}: {e}", self.0.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The VM's processes are killed by now; rmdir(2) fails while they are still exiting.
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The thread of vCPU 0 of the QEMU the shim `shim` runs (named by `debug-threads=on`).
fn vcpu0(shim: Pid) -> Pid {
    let qemu = wait_qemu_child(shim, Duration::from_secs(10));
    let mut found = None;
    wait_until(Duration::from_secs(10), "QEMU's CPU 0/TCG thread", || {
        found = fs::read_dir(format!("/proc/{qemu}/task"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .find(|t| {
                fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "CPU 0/TCG")
            })
            .and_then(|t| t.file_name().to_str()?.parse().ok())
            .map(Pid::from_raw);
        found.is_some()
    });
    found.expect("checked by wait_until")
}

/// Thread `tid`'s cgroup in the v1 `cpu` hierarchy.
fn cpu_cgroup(tid: Pid) -> String {
    fs::read_to_string(format!("/proc/{tid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpu")
                .then(|| path.to_owned())
        })
        .unwrap_or_default()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn root_lists_shows_and_upgrades_a_vm_of_another_user() {
    ensure_placer();
    let uid = test_uid(0);
    let uid_dir = UidDir::new(uid);
    let cgroup = Cgroup::new("root-lists");
    let (_dir, vm) = start_as(uid);
    let pid = vm.pid().as_raw() as u32;
    let socket = uid_dir.0.join(format!("{pid}.sock"));
    wait_until(Duration::from_secs(10), "the control socket", || {
        socket.exists()
    });

    // The layout: root's sticky base, the uid's own private directory, a private socket.
    let base = fs::metadata(BASE).unwrap();
    assert_eq!(base.uid(), 0, "{BASE} is root's");
    assert_eq!(mode(Path::new(BASE)), 0o1733, "{BASE}'s mode");
    let own = fs::symlink_metadata(&uid_dir.0).unwrap();
    assert!(own.is_dir());
    assert_eq!(
        own.uid(),
        uid.as_raw(),
        "{} is the VM user's",
        uid_dir.0.display()
    );
    assert_eq!(mode(&uid_dir.0), 0o700);
    assert_eq!(fs::metadata(&socket).unwrap().uid(), uid.as_raw());
    assert_eq!(mode(&socket), 0o600);

    let listed = cli(&["list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let statuses: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("a JSON array");
    assert!(
        statuses.iter().any(|s| s["pid"] == pid),
        "root's list does not show pid {pid}: {statuses:?}"
    );
    let status = cli_ok(&["status", "--json", &pid.to_string()]);
    assert_eq!(status["pid"], pid);
    assert_eq!(status["version"], OLD);

    // Root places the vCPU thread, as libvirt does right after QEMU starts.
    let old_vcpu = vcpu0(vm.pid());
    cgroup.add(old_vcpu);
    assert_eq!(cpu_cgroup(old_vcpu), cgroup.name());

    let to = qemu_build(NEW).display().to_string();
    let upgraded = cli(&["upgrade", "--json", &pid.to_string(), "--to", &to]);
    let report: Value = serde_json::from_slice(&upgraded.stdout).unwrap_or_else(|e| {
        panic!(
            "upgrade printed no report ({e}): {}",
            String::from_utf8_lossy(&upgraded.stderr)
        )
    });
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["to"]["version"], NEW, "{report}");
    assert_eq!(report["threads"]["by"], "placer", "{report}");
    assert_eq!(
        report["threads"]["problems"],
        serde_json::json!([]),
        "{report}"
    );
    let new_vcpu = vcpu0(vm.pid());
    assert_ne!(new_vcpu, old_vcpu, "a new QEMU has new threads");
    assert_eq!(
        cpu_cgroup(new_vcpu),
        cgroup.name(),
        "the new vCPU thread is not in the old one's cgroup"
    );
    vm.wait_heartbeats_after(std::time::Instant::now(), 200, Duration::from_secs(30));
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());

    // The same socket under another launcher's name: the CLI asks who answers.
    let other = pid + 1;
    let alias = uid_dir.0.join(format!("{other}.sock"));
    fs::hard_link(&socket, &alias).expect("link the socket under another name");
    let out = cli(&["status", "--json", &other.to_string()]);
    assert!(
        !out.status.success(),
        "status of pid {other} answered by {pid}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("served by pid {pid}")),
        "qemu-liveupgrade status {other}: {err}"
    );
    fs::remove_file(&alias).unwrap();
}

#[test]
fn a_directory_someone_else_made_for_that_uid_is_put_aside_by_the_placer() {
    ensure_placer();
    let uid = test_uid(1);
    let intruder = test_uid(2);
    let uid_dir = UidDir::new(uid);
    // Root's base, as any root command leaves it; then the intruder's directory under the
    // VM user's name, open to all, with something planted in it.
    assert!(cli(&["list"]).status.success());
    fs::create_dir(&uid_dir.0).unwrap();
    fs::write(uid_dir.0.join("planted"), b"x").unwrap();
    for entry in [uid_dir.0.join("planted"), uid_dir.0.clone()] {
        chown(
            &entry,
            Some(intruder),
            Some(Gid::from_raw(intruder.as_raw())),
        )
        .unwrap();
    }
    fs::set_permissions(&uid_dir.0, fs::Permissions::from_mode(0o777)).unwrap();

    let (_dir, vm) = start_as(uid);
    let pid = vm.pid();
    vm.wait_stderr_contains("was not this uid's to use", Duration::from_secs(10));
    let line = vm
        .stderr_text()
        .lines()
        .find(|l| l.contains("was not this uid's to use"))
        .unwrap_or_default()
        .to_owned();
    let aside = line
        .rsplit_once("it is now ")
        .map(|(_, p)| PathBuf::from(p))
        .unwrap_or_default();
    // Whatever the assertions below say, the intruder's directory goes with the test.
    struct Aside(PathBuf);
    impl Drop for Aside {
        fn drop(&mut self) {
            if self.0.starts_with(BASE) && self.0 != Path::new(BASE) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
    }
    let aside = Aside(aside);
    assert!(
        line.starts_with(&format!(
            "qemu-system-x86_64: qemu-liveupgrade: {} was not this uid's to use; it is now {BASE}/.taken-{uid}-",
            uid_dir.0.display()
        )),
        "the diagnostic: {line}"
    );
    // Kept as the intruder left it, where nothing reads it; the VM's own directory is new.
    let meta = fs::symlink_metadata(&aside.0).unwrap();
    assert_eq!(
        nix::unistd::Uid::from_raw(std::os::unix::fs::MetadataExt::uid(&meta)),
        intruder
    );
    assert!(aside.0.join("planted").exists());
    assert_eq!(mode(&uid_dir.0), 0o700);
    let owner = std::os::unix::fs::MetadataExt::uid(&fs::metadata(&uid_dir.0).unwrap());
    assert_eq!(owner, uid.as_raw(), "the VM user's own directory");
    assert!(!uid_dir.0.join("planted").exists());

    // Root's CLI reaches the VM there, and nothing is skipped.
    let status = cli_ok(&["status", "--json", &pid.to_string()]);
    assert_eq!(status["pid"], pid.as_raw(), "{status}");
    let listed = cli(&["list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let err = String::from_utf8_lossy(&listed.stderr);
    assert!(!err.contains("skipped"), "list skipped something: {err}");
    vm.wait_heartbeats_after(std::time::Instant::now(), 200, Duration::from_secs(30));
}

/// A placer that is slow to answer (stopped, stuck in the kernel, busy) must cost the upgrade
/// at most its deadline, never the VM: the launcher waits for each answer while its loop relays
/// the guest's console. The launcher runs as a uid of its own in a mount namespace where
/// `/run/qemu-liveupgrade` is a directory of the test's, so that the placer it asks is the
/// test's own (the machine's real one, shared with other test runs, is not touched). That
/// placer answers each request only once the test has seen the guest's console go on while the
/// request waits: a launcher whose loop waited for the placer would relay nothing meanwhile,
/// give up after 2 s, and report the vCPU thread not moved.
#[test]
fn a_slow_placer_stalls_nothing() {
    use qemu_liveupgrade_tests::linux::Console;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs its VM as another user in a mount namespace: run it as root"
    );
    let uid = test_uid(3);
    let cgroup = Cgroup::new("slow-placer");
    // The test's own /run/qemu-liveupgrade, root's and sticky as the real one, with a placer.
    let base = qemu_liveupgrade_tests::tempdir();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o1733)).unwrap();
    let listener = UnixListener::bind(base.path().join("placer.sock")).unwrap();
    fs::set_permissions(
        base.path().join("placer.sock"),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    // The real one is the mount point only; it is made as any root command makes it.
    if !Path::new(BASE).exists() {
        assert!(cli(&["list"]).status.success());
    }
    let (requests, asked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            if requests.send((line, conn)).is_err() {
                return;
            }
        }
    });

    let dir = domain_dir();
    let shim = install_emulator(dir.path(), None);
    let kernel = reachable_copy(dir.path(), &guest_elf());
    let qemu = dir.path().join("qemu");
    std::os::unix::fs::symlink(qemu_build(OLD), &qemu).unwrap();
    // The console, a socket the launcher serves, in a directory the VM's user may write.
    let socks = dir.path().join("socks");
    fs::create_dir(&socks).unwrap();
    chown(&socks, Some(uid), Some(Gid::from_raw(uid.as_raw()))).unwrap();
    let console_path = socks.join("console.sock");
    let mut argv = guest_argv(64);
    let at = argv.iter().position(|a| a == "-kernel").expect("-kernel") + 1;
    argv[at] = kernel.display().to_string();
    qemu_liveupgrade_tests::serial_on_socket(&mut argv, &console_path);
    argv.extend(["-name".into(), "guest=qlu-placer,debug-threads=on".into()]);
    let mut cmd = Command::new("unshare");
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir.path())
        .env("QEMU_LIVEUPGRADE_BINARY", &qemu)
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$0\" {BASE} && exec setpriv --reuid={uid} --regid={uid} --clear-groups -- \"$@\""
        ))
        .arg(base.path())
        .arg(&shim)
        .args(&argv);
    let vm = Vm::spawn(cmd);
    let console = Console::connect("console", &console_path, Duration::from_secs(60));
    let heartbeats = |c: &Console| c.lines().iter().filter(|l| l.starts_with("HB ")).count();
    let beating = |what: &str, more: usize| {
        let before = heartbeats(&console);
        console.wait_for(what, Duration::from_secs(30), |lines| {
            lines.iter().filter(|l| l.starts_with("HB ")).count() >= before + more
        });
    };
    beating("heartbeats at start", 50);
    // Placed by root, as libvirt places vCPU threads: the new one must follow, by the placer.
    let old_vcpu = vcpu0(vm.pid());
    cgroup.add(old_vcpu);

    let tmp = dir.path().join("qemu.new");
    std::os::unix::fs::symlink(qemu_build(NEW), &tmp).unwrap();
    fs::rename(&tmp, &qemu).unwrap();
    vm.signal(nix::sys::signal::Signal::SIGUSR2);
    for (execute, answer) in [
        ("snapshot", "{\"recorded\":1,\"problems\":[]}\n"),
        ("apply", "{\"placed\":1,\"problems\":[]}\n"),
    ] {
        let (line, conn) = asked
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {execute} request; stderr: {}", vm.stderr_text()));
        let req: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(req["execute"], execute, "{req}");
        // The launcher's loop goes on while it waits for the answer.
        beating(&format!("heartbeats while the {execute} request waits"), 3);
        conn.set_nonblocking(true).unwrap();
        let mut rest = [0u8; 16];
        match std::io::Read::read(&mut &conn, &mut rest) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the launcher gave up on its {execute} request: {other:?}"),
        }
        let _ = (&conn).write_all(answer.as_bytes());
    }
    wait_until(Duration::from_secs(60), "the upgrade's report", || {
        !reports(&vm).is_empty()
    });
    let report = reports(&vm).remove(0);
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["threads"]["by"], "placer", "{report}");
    assert_eq!(
        report["threads"]["problems"],
        serde_json::json!([]),
        "both answers were taken: {report}"
    );
    beating("heartbeats after the upgrade", 50);
}
