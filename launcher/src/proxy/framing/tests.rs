use super::*;

fn pieces(scan: &mut JsonScan, mut buf: &[u8]) -> Vec<Piece> {
    let mut v = Vec::new();
    while let Some(p) = scan.next(buf) {
        let (Piece::Gap(n) | Piece::Value(n)) = p;
        buf = &buf[n..];
        v.push(p);
    }
    v
}

#[test]
fn json_values_end_at_the_closing_bracket_outside_strings() {
    let mut s = JsonScan::default();
    let got = pieces(&mut s, br#" {"a":"}\"{"} ['}',[1]]x"#);
    let want = [
        Piece::Gap(1),
        Piece::Value(12),
        Piece::Gap(1),
        Piece::Value(9),
        Piece::Gap(1),
    ];
    assert_eq!(got, want);
}

#[test]
fn json_values_split_across_reads() {
    let mut s = JsonScan::default();
    let whole = br#"{"execute":"x","arguments":{"s":"{"}}"#;
    let mut buf = whole[..10].to_vec();
    assert_eq!(s.next(&buf), None);
    buf.extend_from_slice(&whole[10..]);
    assert_eq!(s.next(&buf), Some(Piece::Value(whole.len())));
}

#[test]
fn hmp_lines_end_at_cr_or_lf() {
    let mut i = Inbound::new(Mode::Hmp);
    assert!(i.next(b"info st").is_none());
    assert_eq!(i.next(b"info status\r\n").map(|u| u.len), Some(12));
    assert_eq!(i.next(b"\n").map(|u| u.answered), Some(true));
}

#[test]
fn qmp_envelopes_are_read() {
    let mut i = Inbound::new(Mode::Qmp);
    let cmd = br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":7}"#;
    let unit = i.next(cmd).unwrap();
    assert_eq!((unit.len, unit.answered), (cmd.len(), true));
    assert!(unit.request.caps && !unit.request.oob);
    assert_eq!(unit.request.id, Some(Value::from(7)));
    let other = i.next(br#"{"exec-oob":"query-status","id":"x"}"#).unwrap();
    assert!(!other.request.caps && other.request.oob);
    let getfd = i.next(br#"{"execute":"getfd","arguments":{"fdname":"f"}}"#);
    assert!(getfd.unwrap().request.command.unwrap().takes_fd());
    let junk = i.next(b"[1]").unwrap();
    assert!(junk.answered && junk.request.command.is_none());
}

#[test]
fn hmp_lines_are_read_unless_edited() {
    let mut i = Inbound::new(Mode::Hmp);
    let getfd = i.next(b"getfd f\r\n").unwrap().request.command;
    assert!(getfd.unwrap().takes_fd());
    assert!(i.next(b"getfd g\x08f\n").unwrap().request.command.is_none());
}

#[test]
fn hidden_events_take_their_line_end() {
    let mut o = Outbound::new(Mode::Qmp, Greeting::Pass, Filter::Leaving);
    let mut rx = b"{\"event\":\"STOP\"}\r".to_vec();
    let mut out = Vec::new();
    o.process(&mut rx, &mut out);
    rx.extend_from_slice(b"\n{\"event\":\"X\"}\r\n{\"return\":{}}\r\n");
    let seen = o.process(&mut rx, &mut out);
    assert_eq!(out, b"{\"event\":\"X\"}\r\n{\"return\":{}}\r\n");
    assert!(matches!(
        &seen[..],
        [Seen::Answer {
            id: None,
            reply: Reply::Return(_)
        }]
    ));
    assert!(o.hidden_stop);
}

#[test]
fn hmp_banner_is_dropped_and_prompts_counted() {
    let mut o = Outbound::new(Mode::Hmp, Greeting::Drop, Filter::Arriving);
    let mut rx = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qe".to_vec();
    let mut out = Vec::new();
    assert!(o.process(&mut rx, &mut out).is_empty());
    rx.extend_from_slice(b"mu) info x\x1b[K\r\nok\r\n(qe");
    assert!(o.process(&mut rx, &mut out).is_empty());
    rx.extend_from_slice(b"mu) ");
    let seen = o.process(&mut rx, &mut out);
    assert!(
        matches!(&seen[..], [Seen::Answer { reply: Reply::Printed(p), .. }] if p == "ok\r\n"),
        "{seen:?}"
    );
    assert_eq!(out, b"info x\x1b[K\r\nok\r\n(qemu) ");
}

#[test]
fn query_chardev_replies_report_the_kept_pty() {
    crate::ptys::publish_filenames(vec![("serial0".into(), "pty:/dev/pts/7".into())]);
    let mut o = Outbound::new(Mode::Qmp, Greeting::Done, Filter::Live);
    let reply = br#"{"return": [{"frontend-open": true, "filename": "unix:", "label": "serial0"}, {"frontend-open": false, "filename": "null", "label": "n0"}], "id": 3}"#;
    let mut rx = reply.to_vec();
    rx.extend_from_slice(b"\r\n{\"return\": [{\"label\": \"serial0\"}]}\r\n");
    let mut out = Vec::new();
    let seen = o.process(&mut rx, &mut out);
    assert_eq!(seen.len(), 2);
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.split("\r\n");
    let first: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"return": [
            {"frontend-open": true, "filename": "pty:/dev/pts/7", "label": "serial0"},
            {"frontend-open": false, "filename": "null", "label": "n0"}], "id": 3})
    );
    // Another shape is another command's reply: untouched, byte for byte.
    assert_eq!(lines.next(), Some(r#"{"return": [{"label": "serial0"}]}"#));
}

#[test]
fn replies_that_may_be_rewritten_are_told_apart_unparsed() {
    hide_migration_state(true);
    let mut o = Outbound::new(Mode::Qmp, Greeting::Done, Filter::Live);
    let status =
        r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}"#;
    let migrate = r#"{"return": {"status": "completed", "downtime": 3}, "id": 2}"#;
    let mut rx = format!("{status}\r\n{migrate}\r\n").into_bytes();
    let mut out = Vec::new();
    assert_eq!(o.process(&mut rx, &mut out).len(), 2);
    hide_migration_state(false);
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.split("\r\n");
    assert_eq!(lines.next(), Some(status), "passed on byte for byte");
    let second: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(second, serde_json::json!({"return": {}, "id": 2}));
}

#[test]
fn resume_after_commit_is_hidden_once_unless_a_stop_came_first() {
    let mut o = Outbound::new(Mode::Qmp, Greeting::Done, Filter::Live);
    o.drop_resume = true;
    let mut out = Vec::new();
    o.process(
        &mut b"{\"event\":\"RESUME\"}\r\n{\"event\":\"RESUME\"}\r\n".to_vec(),
        &mut out,
    );
    assert_eq!(out, b"{\"event\":\"RESUME\"}\r\n");
    o.drop_resume = true;
    out.clear();
    o.process(
        &mut b"{\"event\":\"STOP\"}\r\n{\"event\":\"RESUME\"}\r\n".to_vec(),
        &mut out,
    );
    assert_eq!(out, b"{\"event\":\"STOP\"}\r\n{\"event\":\"RESUME\"}\r\n");
}

#[test]
fn the_upgrades_migration_is_hidden_from_query_migrate_only() {
    let finished = serde_json::json!({"status": "cancelled", "ram": {"total": 1}});
    let with_blockers = serde_json::json!({"status": "completed", "blocked-reasons": ["x"]});
    let query_status = serde_json::json!({"status": "running", "running": true});
    let query_dump = serde_json::json!({"status": "completed", "completed": 1, "total": 1});
    assert_eq!(migration_reply(&finished), Some(serde_json::json!({})));
    assert_eq!(
        migration_reply(&with_blockers),
        Some(serde_json::json!({"blocked-reasons": ["x"]}))
    );
    assert_eq!(migration_reply(&query_status), None);
    assert_eq!(migration_reply(&query_dump), None);
}
