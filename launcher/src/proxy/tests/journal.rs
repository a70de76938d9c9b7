//! Fds passed by clients, and the hot-plug journal, through the proxy and fake QEMU monitors.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use serde_json::{json, Value};

use super::{send, send_fd, H};
use crate::proxy::Mode;

fn ino(fd: &impl AsRawFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

fn commands(h: &H) -> Vec<(String, Value)> {
    let e = h.proxy.journal().entries().iter();
    e.map(|e| (e.command.clone(), e.arguments.clone()))
        .collect()
}

fn kept_inos(h: &H) -> Vec<u64> {
    let e = h.proxy.journal().entries().iter();
    e.flat_map(|e| e.fds.iter().map(ino)).collect()
}

fn deleted(id: &str) -> String {
    let ev = json!({"event": "DEVICE_DELETED", "data": {"device": id, "path": format!("/machine/peripheral/{id}")},
                    "timestamp": {"seconds": 1700000000, "microseconds": 1}});
    format!("{ev}\r\n")
}

#[test]
fn an_fd_passed_with_getfd_reaches_qemu_and_is_kept_in_the_journal() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let (_r, w) = pipe();
    let getfd = r#"{"execute":"getfd","arguments":{"fdname":"fd-net1"},"id":"g"}"#;
    send_fd(&mut c[0], getfd, w.as_fd());
    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": "g"}));
    assert_eq!(h.fake(1, 0).fds(), [("getfd".to_owned(), ino(&w))]);
    let add = r#"{"execute":"netdev_add","arguments":{"type":"tap","id":"net1","fd":"fd-net1"}}"#;
    assert_eq!(h.cmd(&mut c[0], add), json!({"return": {}}));
    assert_eq!(
        commands(&h),
        [
            ("getfd".into(), json!({"fdname": "fd-net1"})),
            (
                "netdev_add".into(),
                json!({"type": "tap", "id": "net1", "fd": "fd-net1"})
            ),
        ]
    );
    assert_eq!(kept_inos(&h), [ino(&w)]);
    assert_eq!(h.proxy.journal().entries()[0].monitor, 0);
}

#[test]
fn an_fd_sent_ahead_of_its_command_still_goes_with_it() {
    // The qemu.qmp Python library passes the fd with a lone blank, then sends the command.
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let (_r, w) = pipe();
    send_fd(&mut c[0], " ", w.as_fd());
    h.idle(std::time::Duration::from_millis(20));
    let cmd = r#"{"execute":"add-fd","arguments":{"fdset-id":2,"opaque":"disk"},"id":1}"#;
    let r = h.cmd(&mut c[0], cmd);
    assert_eq!(r, json!({"return": {"fdset-id": 2, "fd": 40}, "id": 1}));
    assert_eq!(h.fake(1, 0).fds(), [("add-fd".to_owned(), ino(&w))]);
    assert_eq!(
        commands(&h),
        [("add-fd".into(), json!({"fdset-id": 2, "opaque": "disk"}))]
    );
    assert_eq!(kept_inos(&h), [ino(&w)]);
}

#[test]
fn each_fd_goes_with_its_own_command_when_several_arrive_in_one_read() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let (_r1, w1) = pipe();
    let (_r2, w2) = pipe();
    // Both arrive before the proxy reads: one read returns the first message only.
    send(&mut c[0], r#"{"execute":"query-status","id":0}"#);
    send_fd(
        &mut c[0],
        r#"{"execute":"getfd","arguments":{"fdname":"a"},"id":1}"#,
        w1.as_fd(),
    );
    send_fd(
        &mut c[0],
        r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":2}"#,
        w2.as_fd(),
    );
    for id in 0..3 {
        assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": id}));
    }
    let want = [("getfd".to_owned(), ino(&w1)), ("getfd".into(), ino(&w2))];
    assert_eq!(h.fake(1, 0).fds(), want);
    assert_eq!(kept_inos(&h), [ino(&w1), ino(&w2)]);
}

#[test]
fn failed_commands_and_getfd_without_an_fd_are_not_journaled() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let r = h.cmd(
        &mut c[0],
        r#"{"execute":"getfd","arguments":{"fdname":"x"},"id":1}"#,
    );
    assert!(r.get("error").is_some());
    let fail = r#"{"execute":"device_add","arguments":{"driver":"e1000","id":"d","fail":true}}"#;
    assert!(h.cmd(&mut c[0], fail).get("error").is_some());
    assert!(h.proxy.journal().is_empty());
    assert_eq!(h.proxy.journal().changes(), 0);
}

#[test]
fn replies_are_matched_by_id_when_exec_oob_overtakes() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    // The fake answers the deferred device_add only after the next command.
    let add = r#"{"execute":"device_add","arguments":{"driver":"e1000","id":"d1","defer":true},"id":"a"}"#;
    send(&mut c[0], add);
    let oob = r#"{"exec-oob":"x-oob","arguments":{"fail":true},"id":"b"}"#;
    send(&mut c[0], oob);
    let first = h.msg(&mut c[0]);
    assert_eq!(first["id"], "b");
    assert!(first.get("error").is_some());
    assert_eq!(h.msg(&mut c[0])["id"], "a");
    let names: Vec<_> = commands(&h).into_iter().map(|(c, _)| c).collect();
    assert_eq!(names, ["device_add"]);
}

#[test]
fn a_device_del_ends_with_device_deleted_on_any_monitor() {
    let (mut h, mut c) = H::started(&[Mode::Qmp, Mode::Qmp]);
    let add = r#"{"execute":"device_add","arguments":{"driver":"e1000","id":"nic1"}}"#;
    h.cmd(&mut c[0], add);
    h.cmd(
        &mut c[0],
        r#"{"execute":"device_del","arguments":{"id":"nic1"}}"#,
    );
    assert_eq!(h.proxy.journal().len(), 2);
    // QEMU sends every QMP monitor the event; both copies count once.
    h.fake(1, 1).emit(deleted("nic1").as_bytes());
    h.msg(&mut c[1]);
    assert!(h.proxy.journal().is_empty());
    h.cmd(&mut c[0], add);
    h.fake(1, 0).emit(deleted("nic1").as_bytes());
    h.msg(&mut c[0]);
    assert_eq!(h.proxy.journal().len(), 1);
}

#[test]
fn hmp_commands_and_their_fds_are_journaled() {
    let (mut h, mut c) = H::started(&[Mode::Hmp]);
    h.upto(&mut c[0], "(qemu) ");
    let (_r, w) = pipe();
    send_fd(&mut c[0], "getfd tap1", w.as_fd());
    assert_eq!(h.upto(&mut c[0], "(qemu) "), "getfd tap1\r\n(qemu) ");
    send(&mut c[0], "netdev_add tap,id=n1,fd=tap1");
    send(&mut c[0], "device_add e1000,id=nic1,netdev=n1,fail=1");
    send(&mut c[0], "set_link n1 off");
    for _ in 0..3 {
        h.upto(&mut c[0], "(qemu) ");
    }
    let hmc = |line: &str| {
        (
            "human-monitor-command".to_owned(),
            json!({ "command-line": line }),
        )
    };
    assert_eq!(
        commands(&h),
        [
            ("getfd".into(), json!({"fdname": "tap1"})),
            hmc("netdev_add tap,id=n1,fd=tap1"),
            ("set_link".into(), json!({"name": "n1", "up": false})),
        ]
    );
    assert_eq!(h.fake(1, 0).fds(), [("getfd".to_owned(), ino(&w))]);
    assert_eq!(kept_inos(&h), [ino(&w)]);
    send(&mut c[0], "netdev_del n1");
    h.upto(&mut c[0], "(qemu) ");
    assert!(h.proxy.journal().is_empty());
}

#[test]
fn commands_held_during_a_swap_are_journaled_from_the_new_generation() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    let (_r, w) = pipe();
    let getfd = r#"{"execute":"getfd","arguments":{"fdname":"f"},"id":1}"#;
    send_fd(&mut c[0], getfd, w.as_fd());
    let add = r#"{"execute":"netdev_add","arguments":{"type":"tap","id":"n","fd":"f"},"id":2}"#;
    send(&mut c[0], add);
    h.quiet(&mut c[0]);
    h.prepare(2).unwrap();
    assert!(h.proxy.journal().is_empty());
    h.proxy.commit(h.poll.registry(), 2);
    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": 1}));
    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": 2}));
    assert!(h.fake(1, 0).fds().is_empty());
    assert_eq!(h.fake(2, 0).fds(), [("getfd".to_owned(), ino(&w))]);
    assert_eq!(h.proxy.journal().len(), 2);
    assert_eq!(kept_inos(&h), [ino(&w)]);
}

#[test]
fn events_read_elsewhere_complete_removals() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let add = r#"{"execute":"device_add","arguments":{"driver":"e1000","id":"d"}}"#;
    h.cmd(&mut c[0], add);
    h.cmd(
        &mut c[0],
        r#"{"execute":"device_del","arguments":{"id":"d"}}"#,
    );
    let ev: Value = serde_json::from_str(deleted("d").trim()).unwrap();
    h.proxy.note_event(&ev);
    assert!(h.proxy.journal().is_empty());
}
