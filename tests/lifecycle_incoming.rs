//! A VM that starts by loading its state: every form of `-incoming` gets its stream under the
//! shim exactly as it does on QEMU, and the guest resumes with its memory intact.
//!
//! - libvirt's restore (`virsh restore`, `managedsave` + `start`): `-incoming defer`, the save
//!   file inherited at a number no option names, `migrate-incoming fd:N`. Run under plain QEMU
//!   and under the shim, compared step by step; under the shim an upgrade asked while the state
//!   is loading is refused with the reason, and one after it works.
//! - `-incoming fd:N`, `exec:`, `unix:` and `tcp:` into a shim, the stream coming from a
//!   plain QEMU (a save file, or a live migration over loopback).
//! - A live migration out of a shim into a plain QEMU with the same argv.
//!
//! The heartbeat guest proves from inside that it kept counting where it stopped and that
//! every word of its RAM arrived (it checks a pattern over all of it, all the time).

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use qemu_liveupgrade_tests::lifecycle::{
    consecutive, free_port, holds_file, run_state, save, unlimited_bandwidth, wait_migration,
    wait_run_state, LcVm, Runner, Start,
};
use qemu_liveupgrade_tests::shim::{output_within, qemu_child, reports};
use qemu_liveupgrade_tests::{cli_bin, guest_argv, tempdir, wait_until};
use serde_json::{json, Value};

const VERSION: &str = "7.2.22";
const NEW: &str = "10.0.2";
/// Live migrations run on 10.0.2: QEMU 7.2 as a source under TCG loses guest writes once a
/// migration needs several dirty-bitmap passes (1 run in 6 here, plain QEMU as much as the
/// shim; 10.0.2 none in 16), which says nothing about the shim.
const LIVE: &str = NEW;
const MEM_MIB: u64 = 64;
/// Where libvirt's restore stream sits in the new process: a number no option names.
const STREAM_FD: i32 = 25;

fn step(what: &str) {
    eprintln!("lifecycle_incoming: {what}");
}

/// The guest's argv with a versioned machine type, as libvirt writes it: a save file
/// restores only into the machine type it was saved from.
fn argv() -> Vec<String> {
    guest_argv(MEM_MIB)
        .into_iter()
        .map(|a| if a == "pc" { "pc-i440fx-7.2".into() } else { a })
        .collect()
}

/// `qemu-liveupgrade upgrade --json PID` against a shim VM: its report, and whether the
/// command succeeded.
fn cli_upgrade(vm: &LcVm) -> (bool, Value) {
    cli(vm, "upgrade")
}

/// `qemu-liveupgrade COMMAND --json PID` (`upgrade`, `check`): the report, and whether the
/// command succeeded.
fn cli(vm: &LcVm, command: &str) -> (bool, Value) {
    let mut cmd = Command::new(cli_bin());
    cmd.args([command, "--json", &vm.vm.pid().to_string()])
        .env("QEMU_LIVEUPGRADE_RUNDIR", vm.rundir());
    let out = output_within(cmd, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{command}: not JSON ({e}): {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// What one run of save-then-restore looked like, for comparing plain QEMU with the shim.
#[derive(Debug, PartialEq)]
struct Restored {
    /// `query-status` of the new QEMU before `migrate-incoming`, after it loaded, after `cont`.
    states: [String; 3],
    /// The first heartbeat after the restore follows the last one before the save.
    resumed: bool,
}

/// Saves a running guest and restores it as libvirt does; for the shim, also what an upgrade
/// does while the state loads and right after.
fn save_and_restore(runner: Runner) -> Restored {
    let dir = tempdir();
    let state = dir.join("state");
    let src = LcVm::start(Start {
        runner,
        version: VERSION,
        argv: argv(),
        fds: Vec::new(),
    });
    src.vm.wait_ready(Duration::from_secs(60));
    src.assert_alive(20, "before the save");
    let mut qmp = src.qmp();
    let last = save(&src, &mut qmp, &state);
    drop(qmp);
    drop(src);
    step(&format!("{runner}: saved at heartbeat {}", last.counter));

    let file = File::open(&state).expect("open the saved state");
    let mut args = argv();
    args.extend(["-S", "-incoming", "defer"].map(String::from));
    let dst = LcVm::start(Start {
        runner,
        version: VERSION,
        argv: args,
        fds: vec![(&file, STREAM_FD)],
    });
    drop(file);
    let mut qmp = dst.qmp();
    let before = run_state(&mut qmp);
    if runner == Runner::Shim {
        let (ok, report) = cli_upgrade(&dst);
        assert!(!ok, "an upgrade while loading must be refused: {report}");
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("inmigrate") && reason.contains("incoming"),
            "the refusal names the reason: {report}"
        );
        let (ok, check) = cli(&dst, "check");
        assert!(
            !ok && check["verdict"].to_string().contains("inmigrate"),
            "check says a loading VM is not upgradable now: {check}"
        );
        assert_eq!(
            run_state(&mut qmp),
            "inmigrate",
            "the refusal changed nothing"
        );
        assert!(
            !holds_file(dst.vm.pid(), &state),
            "the shim keeps its copy of the restore stream"
        );
        let qemu = qemu_child(dst.vm.pid()).expect("the shim's QEMU");
        assert!(
            holds_file(qemu, &state),
            "QEMU did not inherit the stream at fd {STREAM_FD}"
        );
    }
    qmp.execute(
        "migrate-incoming",
        json!({ "uri": format!("fd:{STREAM_FD}") }),
    );
    wait_run_state(&mut qmp, "paused", Duration::from_secs(60));
    let loaded = run_state(&mut qmp);
    qmp.execute("cont", Value::Null);
    let after = run_state(&mut qmp);
    let beats = dst.assert_alive(20, &format!("{runner}: after the restore"));
    let first = dst.vm.heartbeats()[0];
    consecutive(&dst.vm.heartbeats(), &format!("{runner}: every beat since"));
    step(&format!(
        "{runner}: restored, heartbeat {} then {}",
        first.counter,
        beats.last().unwrap().counter
    ));
    if runner == Runner::Shim {
        assert!(!holds_file(dst.vm.pid(), &state), "the shim holds the file");
        dst.install(NEW);
        let (ok, report) = cli_upgrade(&dst);
        assert!(ok, "upgrade after the restore: {report}");
        assert_eq!(report["to"]["version"], NEW, "{report}");
        dst.assert_alive(20, "after the upgrade that followed the restore");
        assert_eq!(run_state(&mut qmp), "running");
        assert_eq!(reports(&dst.vm).len(), 2, "one refused, one done");
    }
    Restored {
        states: [before, loaded, after],
        resumed: first.counter > last.counter && first.counter <= last.counter + 2,
    }
}

#[test]
fn restore_from_a_file_like_libvirt_is_the_same_under_the_shim() {
    let plain = save_and_restore(Runner::Plain);
    let shim = save_and_restore(Runner::Shim);
    assert_eq!(
        plain.states,
        ["inmigrate", "paused", "running"].map(String::from),
        "plain QEMU"
    );
    assert!(plain.resumed, "plain: the guest went on where it stopped");
    assert_eq!(shim, plain, "the shim restores as plain QEMU does");
}

/// A running guest on plain QEMU `version`, with migration bandwidth unlimited.
fn plain_source(version: &str) -> (LcVm, qemu_liveupgrade_tests::Qmp) {
    let src = LcVm::start(Start {
        runner: Runner::Plain,
        version,
        argv: argv(),
        fds: Vec::new(),
    });
    src.vm.wait_ready(Duration::from_secs(60));
    src.assert_alive(10, "the plain source");
    let mut qmp = src.qmp();
    unlimited_bandwidth(&mut qmp);
    (src, qmp)
}

/// How a VM started with `-incoming` came out, for comparing plain QEMU with the shim.
#[derive(Debug, PartialEq)]
struct Loaded {
    /// The run state once the stream is in (the source's, carried in the stream).
    state: String,
    /// The guest went on counting from where the source left it, RAM intact.
    resumed: bool,
}

/// Waits for `dst` to leave `inmigrate`, runs the guest if the stream left it paused, and
/// checks it goes on where the source (last heartbeat `last_before`) stopped.
fn loaded(dst: &LcVm, last_before: u64, what: &str) -> Loaded {
    let mut qmp = dst.qmp();
    let mut state = String::new();
    wait_until(
        Duration::from_secs(60),
        &format!("{what}: the state loaded"),
        || {
            state = run_state(&mut qmp);
            state != "inmigrate"
        },
    );
    if state == "paused" {
        qmp.execute("cont", Value::Null);
    }
    let beats = dst.assert_alive(20, what);
    let first = dst.vm.heartbeats()[0].counter;
    consecutive(&dst.vm.heartbeats(), what);
    step(&format!(
        "{what}: {state} once loaded, heartbeat {last_before} then {first}..{}",
        beats.last().map_or(0, |b| b.counter)
    ));
    Loaded {
        state,
        resumed: first > last_before && first <= last_before + 2,
    }
}

/// The guest's argv plus `-incoming uri`.
fn incoming(uri: &str) -> Vec<String> {
    let mut args = argv();
    args.extend(["-incoming".into(), uri.to_owned()]);
    args
}

/// Each `-incoming` form, into plain QEMU and into a shim: from a save file (`fd:`, `exec:`)
/// or from a running plain QEMU (`unix:`, `tcp:`).
fn incoming_forms(runner: Runner, state: &std::path::Path, saved_at: u64) -> Vec<Loaded> {
    let mut out = Vec::new();

    let file = File::open(state).expect("open state");
    let dst = LcVm::start(Start {
        runner,
        version: VERSION,
        argv: incoming(&format!("fd:{STREAM_FD}")),
        fds: vec![(&file, STREAM_FD)],
    });
    drop(file);
    out.push(loaded(&dst, saved_at, &format!("{runner}: -incoming fd:N")));
    assert!(!holds_file(dst.vm.pid(), state), "{runner} holds the file");
    drop(dst);

    // `-incoming defer`, the stream passed on the monitor by `getfd` (SCM_RIGHTS), as
    // libvirt passes fds it opens after the start.
    let dst = LcVm::start(Start {
        runner,
        version: VERSION,
        argv: incoming("defer"),
        fds: Vec::new(),
    });
    let file = File::open(state).expect("open state");
    let mut qmp = dst.qmp();
    qmp.execute_with_fd("getfd", json!({"fdname": "restore"}), file.as_fd());
    drop(file);
    qmp.execute("migrate-incoming", json!({"uri": "fd:restore"}));
    // A QMP socket takes one client at a time.
    drop(qmp);
    out.push(loaded(
        &dst,
        saved_at,
        &format!("{runner}: -incoming defer, getfd"),
    ));
    assert!(!holds_file(dst.vm.pid(), state), "{runner} holds the file");
    drop(dst);

    let dst = LcVm::start(Start {
        runner,
        version: VERSION,
        argv: incoming(&format!("exec:cat {}", state.display())),
        fds: Vec::new(),
    });
    out.push(loaded(
        &dst,
        saved_at,
        &format!("{runner}: -incoming exec:"),
    ));
    drop(dst);

    for form in ["unix", "tcp"] {
        let listen_dir = tempdir();
        let uri = match form {
            "unix" => format!("unix:{}", listen_dir.join("mig.sock").display()),
            _ => format!("tcp:127.0.0.1:{}", free_port()),
        };
        let dst = LcVm::start(Start {
            runner,
            version: LIVE,
            argv: incoming(&uri),
            fds: Vec::new(),
        });
        let (src, mut qmp) = plain_source(LIVE);
        // The destination listens once its monitor answers.
        assert_eq!(run_state(&mut dst.qmp()), "inmigrate");
        qmp.execute("migrate", json!({ "uri": uri }));
        wait_migration(&mut qmp, &format!("migration to {uri}"));
        let last = src.vm.last_heartbeat().expect("source beats").counter;
        assert_eq!(run_state(&mut qmp), "postmigrate");
        out.push(loaded(&dst, last, &format!("{runner}: -incoming {form}")));
    }
    out
}

#[test]
fn every_incoming_form_feeds_a_shim_as_it_feeds_qemu() {
    // A save file from plain QEMU, for the fd: and exec: forms.
    let dir = tempdir();
    let state = dir.join("state");
    let (src, mut qmp) = plain_source(VERSION);
    let saved_at = save(&src, &mut qmp, &state).counter;
    drop(qmp);
    drop(src);

    let plain = incoming_forms(Runner::Plain, &state, saved_at);
    let shim = incoming_forms(Runner::Shim, &state, saved_at);
    let want = |state: &str| Loaded {
        state: state.into(),
        resumed: true,
    };
    // A saved guest was stopped first, as libvirt stops it; a live one ran.
    assert_eq!(
        plain,
        [
            want("paused"),
            want("paused"),
            want("paused"),
            want("running"),
            want("running")
        ],
        "plain QEMU"
    );
    assert_eq!(shim, plain, "the shim loads every form as plain QEMU does");
}

#[test]
fn a_shim_vm_migrates_out_to_plain_qemu_with_the_same_argv() {
    let src = LcVm::start(Start {
        runner: Runner::Shim,
        version: LIVE,
        argv: argv(),
        fds: Vec::new(),
    });
    src.vm.wait_ready(Duration::from_secs(60));
    src.assert_alive(10, "the shim source");
    let port = free_port();
    let mut args = argv();
    args.extend(["-incoming".into(), format!("tcp:127.0.0.1:{port}")]);
    let dst = LcVm::start(Start {
        runner: Runner::Plain,
        version: LIVE,
        argv: args,
        fds: Vec::new(),
    });
    let mut dqmp = dst.qmp();
    assert_eq!(run_state(&mut dqmp), "inmigrate");
    let mut qmp = src.qmp();
    unlimited_bandwidth(&mut qmp);
    qmp.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
    wait_migration(&mut qmp, "migration out of the shim");
    wait_run_state(&mut dqmp, "running", Duration::from_secs(60));
    let beats = dst.assert_alive(20, "on plain QEMU after migrating out of the shim");
    let last = src.vm.last_heartbeat().expect("source beats").counter;
    assert!(
        beats[0].counter > last.saturating_sub(2),
        "the guest started over on plain QEMU"
    );
    wait_until(Duration::from_secs(5), "the source to stay paused", || {
        run_state(&mut qmp) == "postmigrate"
    });
}
