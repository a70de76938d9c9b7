//! Unit tests of the hot-plug journal.
use std::io::Read;
use std::os::fd::AsRawFd;

use super::*;

fn qmp(j: &mut Journal, name: &str, args: Value, ret: Value) {
    j.record(0, Command::qmp(name, args), Outcome::Return(ret), None);
}

fn ok(j: &mut Journal, name: &str, args: Value) {
    qmp(j, name, args, json!({}));
}

fn hmp(j: &mut Journal, line: &str, printed: &str, fd: Option<OwnedFd>) {
    let cmd = Command::hmp(line).unwrap();
    j.record(1, cmd, Outcome::Printed(printed.into()), fd);
}

fn commands(j: &Journal) -> Vec<(String, Value)> {
    let e = j.entries().iter();
    e.map(|e| (e.command.clone(), e.arguments.clone()))
        .collect()
}

fn names(j: &Journal) -> Vec<&str> {
    j.entries().iter().map(|e| e.command.as_str()).collect()
}

fn deleted(id: &str, seconds: u64) -> Value {
    json!({"event": "DEVICE_DELETED", "data": {"device": id, "path": format!("{PERIPHERAL}{id}")},
           "timestamp": {"seconds": seconds, "microseconds": 0}})
}

/// A pipe: the read end, and the write end for the journal. Reading gives EOF once every
/// copy of the write end is closed.
fn pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), w)
}

fn closed(r: &mut std::fs::File) -> bool {
    nix::fcntl::fcntl(
        r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    matches!(r.read(&mut [0u8; 1]), Ok(0))
}

#[test]
fn additions_undone_leave_nothing_and_removals_of_the_command_line_stay() {
    let mut j = Journal::default();
    ok(&mut j, "netdev_add", json!({"type": "user", "id": "n1"}));
    ok(
        &mut j,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "b1"}),
    );
    ok(
        &mut j,
        "chardev-add",
        json!({"id": "c1", "backend": {"type": "null", "data": {}}}),
    );
    ok(
        &mut j,
        "object-add",
        json!({"qom-type": "iothread", "id": "o1"}),
    );
    assert_eq!(
        names(&j),
        ["netdev_add", "blockdev-add", "chardev-add", "object-add"]
    );
    ok(&mut j, "blockdev-del", json!({"node-name": "b1"}));
    ok(&mut j, "netdev_del", json!({"id": "n1"}));
    ok(&mut j, "chardev-remove", json!({"id": "c1"}));
    ok(&mut j, "object-del", json!({"id": "o1"}));
    assert!(j.is_empty());
    // Made by the command line: the new generation has it, and must lose it too.
    ok(&mut j, "netdev_del", json!({"id": "hostnet0"}));
    assert_eq!(
        commands(&j),
        [("netdev_del".into(), json!({"id": "hostnet0"}))]
    );
}

#[test]
fn a_device_goes_with_its_device_deleted_event_once() {
    let mut j = Journal::default();
    ok(
        &mut j,
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "d1"}),
    );
    ok(&mut j, "set_link", json!({"name": "d1", "up": false}));
    ok(
        &mut j,
        "device_del",
        json!({"id": "/machine/peripheral/d1"}),
    );
    ok(&mut j, "device_del", json!({"id": "d1"}));
    assert_eq!(names(&j), ["device_add", "set_link", "device_del"]);
    let changes = j.changes();
    j.event(&json!({"event": "DEVICE_TRAY_MOVED", "data": {"id": "d1"}}));
    assert_eq!(j.changes(), changes);
    j.event(&deleted("d1", 10));
    assert!(j.is_empty());
    // Added again; another monitor's copy of the old event must not remove it.
    ok(
        &mut j,
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "d1"}),
    );
    j.event(&deleted("d1", 10));
    assert_eq!(names(&j), ["device_add"]);
    // Only the path, as for a device the event has no id for.
    let by_path = json!({"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/d1"}});
    j.event(&by_path);
    assert!(j.is_empty());
}

#[test]
fn a_device_from_the_command_line_keeps_its_device_del() {
    let mut j = Journal::default();
    ok(&mut j, "device_del", json!({"id": "net0"}));
    j.event(&deleted("net0", 1));
    assert_eq!(commands(&j), [("device_del".into(), json!({"id": "net0"}))]);
}

#[test]
fn failures_are_not_recorded() {
    let mut j = Journal::default();
    let cmd = Command::qmp("device_add", json!({"driver": "x", "id": "d"}));
    j.record(0, cmd, Outcome::Error, None);
    hmp(
        &mut j,
        "netdev_add user,id=n1",
        "Try \"help netdev_add\" for more information\r\n",
        None,
    );
    hmp(&mut j, "drive_del d1", "Device 'd1' not found\r\n", None);
    hmp(
        &mut j,
        "device_add foo,id=x",
        "Error: 'foo' is not a valid device model name\r\n",
        None,
    );
    let hmc = |line: &str| json!({ "command-line": line });
    qmp(
        &mut j,
        "human-monitor-command",
        hmc("object_add iothread,id=i"),
        json!("Error: no\r\n"),
    );
    assert!(j.is_empty());
    assert_eq!(j.changes(), 0);
    qmp(
        &mut j,
        "human-monitor-command",
        hmc("object_add iothread,id=i"),
        json!(""),
    );
    hmp(
        &mut j,
        "netdev_add user,id=n1",
        "warning: deprecated\r\n",
        None,
    );
    assert_eq!(
        names(&j),
        ["human-monitor-command", "human-monitor-command"]
    );
}

#[test]
fn hmp_commands_become_qmp_where_the_arguments_are_simple() {
    let mut j = Journal::default();
    let (_r, w) = pipe();
    hmp(&mut j, "  getfd tap0", "", Some(w));
    hmp(&mut j, "netdev_add tap,id=n1,fd=tap0", "", None);
    hmp(
        &mut j,
        "device_add virtio-net-pci,netdev=n1,id=nic1",
        "",
        None,
    );
    hmp(&mut j, "set_link nic1 off", "", None);
    hmp(
        &mut j,
        "object_add {\"qom-type\":\"iothread\",\"id\":\"io1\"}",
        "",
        None,
    );
    hmp(&mut j, "chardev-add null,id=c1", "", None);
    hmp(
        &mut j,
        "drive_add 0 if=none,id=dr1,file=/dev/null,format=raw",
        "OK\r\n",
        None,
    );
    hmp(
        &mut j,
        "drive_add -n 0 node-name=nn1,driver=null-co",
        "",
        None,
    );
    hmp(&mut j, "getfd spare", "", None);
    let hmc = |line: &str| {
        (
            "human-monitor-command".to_owned(),
            json!({ "command-line": line }),
        )
    };
    assert_eq!(
        commands(&j),
        [
            ("getfd".into(), json!({"fdname": "tap0"})),
            hmc("netdev_add tap,id=n1,fd=tap0"),
            hmc("device_add virtio-net-pci,netdev=n1,id=nic1"),
            ("set_link".into(), json!({"name": "nic1", "up": false})),
            hmc("object_add {\"qom-type\":\"iothread\",\"id\":\"io1\"}"),
            hmc("chardev-add null,id=c1"),
            hmc("drive_add 0 if=none,id=dr1,file=/dev/null,format=raw"),
            hmc("drive_add -n 0 node-name=nn1,driver=null-co"),
            ("getfd".into(), json!({"fdname": "spare"})),
        ]
    );
    assert_eq!(j.entries()[0].fds.len(), 1);
    assert_eq!(j.entries()[0].monitor, 1);
    hmp(&mut j, "closefd spare", "", None);
    hmp(&mut j, "drive_del dr1", "", None);
    hmp(&mut j, "drive_del nn1", "", None);
    hmp(&mut j, "chardev-remove c1", "", None);
    hmp(&mut j, "object_del io1", "", None);
    hmp(&mut j, "device_del \"nic1\"", "", None);
    assert_eq!(names(&j)[3..], ["set_link", "device_del"]);
    j.event(&deleted("nic1", 5));
    hmp(&mut j, "netdev_del n1", "", None);
    assert!(j.is_empty(), "{:?}", commands(&j));
}

#[test]
fn set_link_keeps_the_latest_per_device() {
    let mut j = Journal::default();
    ok(&mut j, "set_link", json!({"name": "net0", "up": false}));
    ok(&mut j, "set_link", json!({"name": "net1", "up": false}));
    ok(&mut j, "set_link", json!({"name": "net0", "up": true}));
    assert_eq!(
        commands(&j),
        [
            ("set_link".into(), json!({"name": "net1", "up": false})),
            ("set_link".into(), json!({"name": "net0", "up": true})),
        ]
    );
}

#[test]
fn a_getfd_fd_is_kept_while_its_netdev_exists() {
    let mut j = Journal::default();
    let (mut r, w) = pipe();
    let ino = nix::sys::stat::fstat(w.as_raw_fd()).unwrap().st_ino;
    let cmd = Command::qmp("getfd", json!({"fdname": "fd-net1"}));
    assert!(cmd.takes_fd());
    j.record(0, cmd, Outcome::Return(json!({})), Some(w));
    let args = json!({"type": "tap", "id": "net1", "fd": "fd-net1"});
    ok(&mut j, "netdev_add", args);
    // The same name on another monitor is another fd.
    j.record(
        1,
        Command::qmp("closefd", json!({"fdname": "fd-net1"})),
        Outcome::Return(json!({})),
        None,
    );
    assert_eq!(names(&j), ["getfd", "netdev_add"]);
    let kept = &j.entries()[0].fds[0];
    assert_eq!(nix::sys::stat::fstat(kept.as_raw_fd()).unwrap().st_ino, ino);
    assert!(!closed(&mut r));
    ok(&mut j, "netdev_del", json!({"id": "net1"}));
    assert!(j.is_empty());
    assert!(closed(&mut r));
}

#[test]
fn a_getfd_fd_used_by_something_unjournaled_or_closed_is_dropped() {
    let mut j = Journal::default();
    let (mut r, w) = pipe();
    j.record(
        0,
        Command::qmp("getfd", json!({"fdname": "migrate"})),
        Outcome::Return(json!({})),
        Some(w),
    );
    ok(&mut j, "query-status", json!({}));
    assert_eq!(names(&j), ["getfd"]);
    ok(&mut j, "migrate", json!({"uri": "fd:migrate"}));
    assert!(j.is_empty());
    // libvirt's `virsh save` reads the other end until EOF.
    assert!(closed(&mut r));
    let (mut r, w) = pipe();
    j.record(
        0,
        Command::qmp("getfd", json!({"fdname": "x"})),
        Outcome::Return(json!({})),
        Some(w),
    );
    let (_r2, w2) = pipe();
    j.record(
        0,
        Command::qmp("getfd", json!({"fdname": "x"})),
        Outcome::Return(json!({})),
        Some(w2),
    );
    assert_eq!(names(&j), ["getfd"]);
    assert!(closed(&mut r), "a name given again replaces its fd");
    ok(&mut j, "closefd", json!({"fdname": "x"}));
    assert!(j.is_empty());
}

#[test]
fn add_fd_names_its_set_and_remove_fd_takes_it_out() {
    let mut j = Journal::default();
    let (_r, w) = pipe();
    let cmd = Command::qmp("add-fd", json!({"opaque": "log"}));
    assert!(cmd.takes_fd());
    j.record(
        0,
        cmd,
        Outcome::Return(json!({"fdset-id": 3, "fd": 25})),
        Some(w),
    );
    assert_eq!(
        commands(&j),
        [("add-fd".into(), json!({"opaque": "log", "fdset-id": 3}))]
    );
    assert_eq!(j.entries()[0].fds.len(), 1);
    ok(&mut j, "remove-fd", json!({"fdset-id": 3, "fd": 26}));
    assert_eq!(
        names(&j),
        ["add-fd", "remove-fd"],
        "not this fd: the command line's"
    );
    ok(&mut j, "remove-fd", json!({"fdset-id": 3, "fd": 25}));
    assert_eq!(names(&j), ["remove-fd"]);
}

#[test]
fn an_fd_set_in_use_stays_until_its_user_goes() {
    let mut j = Journal::default();
    let (mut r, w) = pipe();
    j.record(
        0,
        Command::qmp("add-fd", json!({"fdset-id": 1})),
        Outcome::Return(json!({"fdset-id": 1, "fd": 30})),
        Some(w),
    );
    let file = json!({"driver": "file", "filename": "/dev/fdset/1", "node-name": "f1"});
    ok(&mut j, "blockdev-add", file);
    ok(
        &mut j,
        "blockdev-add",
        json!({"driver": "raw", "file": "f1", "node-name": "fmt1"}),
    );
    ok(&mut j, "remove-fd", json!({"fdset-id": 1}));
    assert_eq!(
        names(&j),
        ["add-fd", "blockdev-add", "blockdev-add", "remove-fd"]
    );
    ok(&mut j, "blockdev-del", json!({"node-name": "fmt1"}));
    assert!(!closed(&mut r));
    ok(&mut j, "blockdev-del", json!({"node-name": "f1"}));
    assert!(j.is_empty(), "{:?}", commands(&j));
    assert!(closed(&mut r));
    // Not removed by the client: the fd stays in its set after its user goes.
    let (_r, w) = pipe();
    j.record(
        0,
        Command::qmp("add-fd", json!({})),
        Outcome::Return(json!({"fdset-id": 0, "fd": 31})),
        Some(w),
    );
    ok(
        &mut j,
        "blockdev-add",
        json!({"driver": "file", "filename": "/dev/fdset/0", "node-name": "f0"}),
    );
    ok(&mut j, "blockdev-del", json!({"node-name": "f0"}));
    assert_eq!(names(&j), ["add-fd"]);
    ok(&mut j, "remove-fd", json!({"fdset-id": 0}));
    assert!(j.is_empty());
}

#[test]
fn replayed_hmp_text_is_judged_like_the_original() {
    let mut j = Journal::default();
    let hmc = |line: &str| json!({ "command-line": line });
    qmp(
        &mut j,
        "human-monitor-command",
        hmc("drive_add 0 if=none,id=d"),
        json!("OK\r\n"),
    );
    ok(&mut j, "netdev_add", json!({"type": "user", "id": "n"}));
    let e = j.entries();
    assert!(e[0].succeeded(&json!("OK\r\n")));
    assert!(!e[0].succeeded(&json!("Could not open 'x'\r\n")));
    assert!(e[1].succeeded(&json!({})));
}

#[test]
fn options_are_read_as_qemu_reads_them() {
    assert_eq!(
        option("virtio-blk,id=a,,b,serial=x", "id").as_deref(),
        Some("a,b")
    );
    assert_eq!(option("driver=x,serial=id=y", "id"), None);
    assert_eq!(hmp_args(r#" "a b\"c"  d "#), ["a b\"c", "d"]);
    assert!(Command::hmp(" \r").is_none());
    let cmd = Command::qmp(
        "netdev_add",
        json!({"type": "tap", "id": "n", "fds": "a:b"}),
    );
    assert!(cmd.mentions("b") && !cmd.mentions("n2"));
    let cmd = Command::qmp(
        "blockdev-add",
        json!({"filename": "/dev/fdset/12", "node-name": "x"}),
    );
    assert!(cmd.mentions_fdset(12) && !cmd.mentions_fdset(1));
}

#[test]
fn display_passwords_keep_the_latest_per_protocol_and_display() {
    let mut j = Journal::default();
    let vnc = json!({"protocol": "vnc", "password": "one", "connected": "keep"});
    ok(&mut j, "set_password", vnc);
    ok(
        &mut j,
        "expire_password",
        json!({"protocol": "vnc", "time": "never"}),
    );
    ok(
        &mut j,
        "set_password",
        json!({"protocol": "spice", "password": "s"}),
    );
    ok(
        &mut j,
        "set_password",
        json!({"protocol": "vnc", "password": "two"}),
    );
    hmp(&mut j, "set_password spice s2 keep", "", None);
    hmp(
        &mut j,
        "set_password spice",
        "Error: missing argument",
        None,
    );
    assert_eq!(
        commands(&j),
        [
            (
                "expire_password".into(),
                json!({"protocol": "vnc", "time": "never"})
            ),
            (
                "set_password".into(),
                json!({"protocol": "vnc", "password": "two"})
            ),
            (
                "human-monitor-command".into(),
                json!({"command-line": "set_password spice s2 keep"})
            ),
        ]
    );
}

fn job_completed(id: &str) -> Value {
    json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": id, "type": "mirror", "len": 1, "offset": 1, "speed": 0}})
}

/// libvirt's `blockcopy --pivot`, `snapshot-create-as --disk-only` and `blockcommit --active
/// --pivot`, as it sends them (seen with libvirt 9.0): the device ends on the copy.
#[test]
fn a_pivot_puts_the_block_graph_on_the_command_line() {
    let mut j = Journal::default();
    let add = |j: &mut Journal, args: Value| ok(j, "blockdev-add", args);
    add(
        &mut j,
        json!({"driver": "file", "filename": "/d/copy.qcow2", "node-name": "libvirt-2-storage"}),
    );
    add(
        &mut j,
        json!({"node-name": "libvirt-2-format", "driver": "qcow2", "file": "libvirt-2-storage", "backing": null}),
    );
    assert_eq!(j.block_argv(), Ok(None), "no pivot yet: QMP replays it all");
    let mirror = json!({"job-id": "copy-vda", "device": "libvirt-1-format", "target": "libvirt-2-format", "sync": "full"});
    ok(&mut j, "blockdev-mirror", mirror);
    // A cancelled mirror moves nothing; a completed one does, once, whatever the number of
    // monitors the event arrives on.
    // The event may be read (from the launcher's own monitor) before the reply to
    // job-complete (on libvirt's).
    j.event(&job_completed("copy-vda"));
    ok(&mut j, "job-complete", json!({"id": "copy-vda"}));
    j.event(&job_completed("copy-vda"));
    ok(&mut j, "job-dismiss", json!({"id": "copy-vda"}));
    ok(
        &mut j,
        "blockdev-del",
        json!({"node-name": "libvirt-1-format"}),
    );
    ok(
        &mut j,
        "blockdev-del",
        json!({"node-name": "libvirt-1-storage"}),
    );

    add(
        &mut j,
        json!({"driver": "file", "filename": "/d/overlay.qcow2", "node-name": "libvirt-3-storage"}),
    );
    add(
        &mut j,
        json!({"node-name": "libvirt-3-format", "driver": "qcow2", "file": "libvirt-3-storage", "backing": null}),
    );
    let snap = json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "libvirt-2-format", "name": "b"}},
        {"type": "blockdev-snapshot", "data": {"node": "libvirt-2-format", "overlay": "libvirt-3-format"}}]});
    ok(&mut j, "transaction", snap);
    let graph = j.block_argv().unwrap().unwrap();
    assert_eq!(graph.follow("libvirt-1-format"), "libvirt-3-format");
    assert_eq!(
        graph.blockdevs[3]["backing"], "libvirt-2-format",
        "the overlay's backing"
    );

    let commit = json!({"device": "libvirt-3-format", "job-id": "commit-vda", "top-node": "libvirt-3-format", "base-node": "libvirt-2-format"});
    ok(&mut j, "block-commit", commit);
    ok(&mut j, "job-complete", json!({"id": "commit-vda"}));
    j.event(&job_completed("commit-vda"));
    ok(
        &mut j,
        "blockdev-del",
        json!({"node-name": "libvirt-3-format"}),
    );
    ok(
        &mut j,
        "blockdev-del",
        json!({"node-name": "libvirt-3-storage"}),
    );

    let graph = j.block_argv().unwrap().unwrap();
    assert_eq!(graph.follow("libvirt-1-format"), "libvirt-2-format");
    let nodes: Vec<&str> = graph
        .blockdevs
        .iter()
        .filter_map(|b| b["node-name"].as_str())
        .collect();
    assert_eq!(nodes, ["libvirt-2-storage", "libvirt-2-format"]);
    // Through QMP only the removals of the command line's nodes, now unused.
    let replayed: Vec<(String, Value)> = j
        .entries()
        .iter()
        .filter(|e| j.replays(e))
        .map(|e| (e.command.clone(), e.arguments.clone()))
        .collect();
    assert_eq!(
        replayed,
        [
            (
                "blockdev-del".to_owned(),
                json!({"node-name": "libvirt-1-format"})
            ),
            (
                "blockdev-del".to_owned(),
                json!({"node-name": "libvirt-1-storage"})
            ),
        ]
    );

    let mut cmd = crate::cmdline::CmdLine::parse(&crate::cmdline::fixtures::args(&[
        "-blockdev",
        r#"{"node-name":"libvirt-1-format","driver":"qcow2","file":"libvirt-1-storage"}"#,
        "-device",
        r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
    ]))
    .unwrap();
    graph.apply(&mut cmd);
    let argv: Vec<String> = cmd
        .to_args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(
        argv[3].contains(r#""drive":"libvirt-2-format""#),
        "{argv:?}"
    );
    assert_eq!(argv.len(), 8, "two nodes appended: {argv:?}");
}

#[test]
fn a_mirror_cancelled_or_failed_moves_nothing() {
    let mut j = Journal::default();
    let mirror = json!({"job-id": "j", "device": "a", "target": "b", "sync": "full"});
    ok(&mut j, "blockdev-mirror", mirror.clone());
    ok(&mut j, "block-job-cancel", json!({"device": "j"}));
    j.event(&job_completed("j"));
    ok(&mut j, "job-dismiss", json!({"id": "j"}));
    ok(&mut j, "blockdev-mirror", mirror);
    ok(&mut j, "job-complete", json!({"id": "j"}));
    let mut failed = job_completed("j");
    failed["data"]["error"] = "Input/output error".into();
    j.event(&failed);
    assert_eq!(j.block_argv(), Ok(None));
    // A commit below the active layer changes backing links, not the device: not followed.
    let commit = json!({"device": "top", "job-id": "c", "top-node": "mid", "base-node": "base"});
    ok(&mut j, "block-commit", commit);
    ok(&mut j, "job-complete", json!({"id": "c"}));
    j.event(&job_completed("c"));
    assert_eq!(j.block_argv(), Ok(None));
}

#[test]
fn pivots_and_jobs_under_way_cross_a_supervisor_handover() {
    let mut j = Journal::default();
    ok(
        &mut j,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "b"}),
    );
    let mirror = json!({"job-id": "m", "device": "a", "target": "b", "sync": "full"});
    ok(&mut j, "blockdev-mirror", mirror);
    ok(&mut j, "job-complete", json!({"id": "m"}));
    j.event(&job_completed("m"));
    let commit = json!({"device": "b", "job-id": "c", "top-node": "b", "base-node": "a"});
    ok(&mut j, "block-commit", commit);
    ok(&mut j, "job-complete", json!({"id": "c"}));
    let state = j.export();
    let text = serde_json::to_string(&state).unwrap();
    let read: crate::handover::state::Journal = serde_json::from_str(&text).unwrap();
    let mut take = crate::handover::fds::Take::for_fds(&[]);
    let mut back = Journal::import(read, &mut take).unwrap();
    assert_eq!(back.block_argv(), j.block_argv());
    // The commit under way completes after the handover: its pivot is still recorded.
    back.event(&job_completed("c"));
    assert_eq!(back.block_argv().unwrap().unwrap().follow("a"), "a");
    // A document from before version 2 has neither: both default to none.
    let old: crate::handover::state::Journal =
        serde_json::from_str(r#"{"entries": [], "changes": 0, "deleted": []}"#).unwrap();
    assert!(Journal::import(old, &mut take)
        .unwrap()
        .block_argv()
        .unwrap()
        .is_none());
}
