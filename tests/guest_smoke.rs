//! The heartbeat guest itself, under the distribution's QEMU (no shim): it must
//! boot fast, beat about every millisecond, check its memory without false
//! alarms, and be able to fail. Every whole-process test relies on these.

use std::process::Command;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::{
    guest_argv, guest_argv_append, system_qemu, tempdir, wait_until, Qmp, Vm,
};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

fn spawn_guest(argv: Vec<String>) -> Vm {
    let mut cmd = Command::new(system_qemu());
    cmd.args(argv);
    Vm::spawn(cmd)
}

fn ready_mem(vm: &Vm) -> u64 {
    let text = vm.stdout_text();
    let rest = text.split("READY mem=").nth(1).expect("READY line");
    rest.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("READY mem=<bytes>")
}

#[test]
fn heartbeats_every_millisecond_with_clean_memory() {
    let vm = spawn_guest(guest_argv(256));
    vm.wait_ready(READY_TIMEOUT);
    assert_eq!(
        ready_mem(&vm),
        256 << 20,
        "mem= on the command line sets the tested size"
    );

    let start = Instant::now();
    let beats = vm.wait_heartbeats_after(start, 2000, Duration::from_secs(10));
    let (first, last) = (beats[0], beats[beats.len() - 1]);
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1].counter,
            pair[0].counter + 1,
            "heartbeat counter skipped"
        );
    }
    let secs = (last.at - first.at).as_secs_f64();
    let rate = (last.counter - first.counter) as f64 / secs;
    assert!(
        (500.0..1500.0).contains(&rate),
        "heartbeat rate {rate:.0}/s, want about 1000/s"
    );
    let gap = vm.max_gap_between(first.at, last.at);
    assert!(
        gap < Duration::from_millis(250),
        "heartbeats stalled for {gap:?}"
    );

    // A 256 MiB pass takes well under a second: the check really ran, many times.
    assert!(
        last.pass >= 3,
        "only {} passes over guest RAM in {secs:.1} s",
        last.pass
    );
    let errors = vm.errors();
    assert!(
        errors.is_clean(),
        "memory check failed without cause: {errors:?}"
    );
}

#[test]
fn reports_a_corrupted_word_and_keeps_going() {
    let vm = spawn_guest(guest_argv_append(64, "selftest-corrupt"));
    vm.wait_ready(READY_TIMEOUT);
    wait_until(
        Duration::from_secs(10),
        "the guest to report the corrupted word",
        || vm.errors().max_err > 0,
    );
    let errors = vm.errors();
    assert_eq!(errors.err_lines.len(), 1, "{errors:?}");
    // The guest damages the page-aligned word halfway through 2 MiB..64 MiB.
    assert!(
        errors.err_lines[0].starts_with("ERR addr=0x02100000 "),
        "{errors:?}"
    );

    // It goes on beating and checking; the word was rewritten, so no new errors.
    let now = Instant::now();
    let pass = vm.last_heartbeat().unwrap().pass;
    wait_until(Duration::from_secs(10), "two more passes", || {
        vm.last_heartbeat().unwrap().pass >= pass + 2
    });
    assert!(vm.wait_heartbeats_after(now, 1, Duration::from_secs(1))[0].err >= 1);
    assert_eq!(vm.errors().max_err, 1, "{:?}", vm.errors());
}

#[test]
fn multiboot_memory_size_is_used_without_mem_option() {
    let mut argv = guest_argv(128);
    let at = argv.iter().position(|a| a == "-append").expect("-append");
    argv.drain(at..at + 2);
    let vm = spawn_guest(argv);
    vm.wait_ready(READY_TIMEOUT);
    // QEMU's multiboot mem_upper stops short of the end of RAM by a little.
    let mem = ready_mem(&vm);
    assert!((127 << 20..=128 << 20).contains(&mem), "READY mem={mem}");
    vm.wait_heartbeats_after(Instant::now(), 100, Duration::from_secs(5));
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}

#[test]
fn heartbeats_stop_while_paused_and_resume() {
    let dir = tempdir();
    let sock = dir.join("qmp.sock");
    let mut argv = guest_argv(64);
    argv.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ]);
    let vm = spawn_guest(argv);
    let mut qmp = Qmp::connect_unix(&sock, Duration::from_secs(10));
    vm.wait_ready(READY_TIMEOUT);
    vm.wait_heartbeats_after(Instant::now(), 50, Duration::from_secs(5));

    let before = vm.last_heartbeat().unwrap();
    qmp.execute("stop", json!({}));
    let stopped = Instant::now();
    qmp.wait_event("STOP", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "paused");
    qmp.execute("cont", json!({}));
    qmp.wait_event("RESUME", Duration::from_secs(5));
    let resumed = Instant::now();

    let after = vm.wait_heartbeats_after(resumed, 50, Duration::from_secs(5));
    let gap = vm.max_gap_between(before.at, after[49].at);
    assert!(
        gap >= Duration::from_millis(250),
        "no pause seen: longest gap {gap:?}"
    );
    assert!(
        gap < resumed - before.at + Duration::from_millis(200),
        "gap {gap:?} longer than the pause"
    );
    // The counter lives in guest RAM: it continues where it stopped.
    let beats = vm.heartbeats();
    let i = beats.iter().position(|h| h.at > stopped).unwrap();
    for pair in beats[i.saturating_sub(1)..].windows(2) {
        assert_eq!(pair[1].counter, pair[0].counter + 1);
    }
    assert!(vm.errors().is_clean(), "{:?}", vm.errors());
}
