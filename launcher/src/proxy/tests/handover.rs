//! The proxy written out and taken up again mid-conversation, as a supervisor handover does
//! across its exec: the old value is forgotten (its fds stay open, as an exec leaves them),
//! the state crosses as JSON, and the new proxy registers everything in a loop of its own.

use std::time::Duration;

use mio::Poll;
use serde_json::json;

use super::{send, version, Mode, H};
use crate::handover::fds::Take;
use crate::handover::state::{self, Fd};
use crate::proxy::Proxy;

/// The proxy as a new image would have it: exported, through JSON, imported into a new loop.
fn hand_over(h: &mut H) {
    let exported = h.proxy.export().expect("at rest");
    let text = serde_json::to_string(&exported).unwrap();
    let read: state::Proxy = serde_json::from_str(&text).unwrap();
    // Every number may be taken: the test has no state list of them, and each is taken once.
    let listed: Vec<Fd> = (0..4096).map(Fd).collect();
    let mut take = Take::for_fds(&listed);
    h.poll = Poll::new().unwrap();
    let new = Proxy::import(read, &mut take, h.poll.registry(), 100).unwrap();
    std::mem::forget(std::mem::replace(&mut h.proxy, new));
}

#[test]
fn commands_in_flight_and_half_sent_cross_a_handover() {
    let (mut h, mut c) = H::started(&[Mode::Qmp, Mode::Raw]);
    // QEMU is busy with the first command; the second waits behind it in its socket; the
    // client has sent half of a third; the console's QEMU reads nothing for now.
    send(&mut c[0], r#"{"execute":"slow","id":1}"#);
    send(&mut c[0], r#"{"execute":"query-version","id":2}"#);
    let plug = r#"{"execute":"device_add","arguments":{"driver":"usb-kbd","id":"k1"},"id":"p"}"#;
    send(&mut c[0], plug);
    std::io::Write::write_all(&mut c[0].s, br#"{"execute":"query-ver"#).unwrap();
    h.fake(1, 1).pause(true);
    send(&mut c[1], "typed during the handover");
    h.idle(Duration::from_millis(50));

    hand_over(&mut h);

    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": 1}));
    let second = h.msg(&mut c[0]);
    assert_eq!((second["id"].clone(), version(&second)), (json!(2), 1));
    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": "p"}));
    // Answered after the handover, journaled by the new proxy: it knew what it answered.
    let journaled: Vec<&str> = h
        .proxy
        .journal()
        .entries()
        .iter()
        .map(|e| e.command.as_str())
        .collect();
    assert_eq!(journaled, ["device_add"]);
    send(&mut c[0], r#"sion","id":3}"#);
    let third = h.msg(&mut c[0]);
    assert_eq!((third["id"].clone(), version(&third)), (json!(3), 1));
    h.fake(1, 1).pause(false);
    assert_eq!(h.upto(&mut c[1], "\n"), "g1:typed during the handover\n");
    assert_eq!(h.fake(1, 0).accepted(), 1, "the same connection to QEMU");
}

#[test]
fn a_proxy_handed_over_still_swaps_to_a_new_generation() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    hand_over(&mut h);
    hand_over(&mut h);
    h.swap(2);
    let r = h.cmd(&mut c[0], r#"{"execute":"query-version","id":"v"}"#);
    assert_eq!(version(&r), 2);
    // A client that connects now is served by the new generation.
    let mut late = h.connect(0);
    drop(c);
    assert!(h.msg(&mut late).get("QMP").is_some());
}
