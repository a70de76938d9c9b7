use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use serde_json::json;

use super::*;

/// A listener at a path of its own, removed when dropped.
struct Listening(PathBuf, UnixListener);

impl Listening {
    fn new(name: &str) -> Listening {
        let path = std::env::temp_dir().join(format!("qlu-ask-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        Listening(path, listener)
    }

    fn ask(&self, req: &Value) -> Result<Asking, String> {
        Asking::start_at(&self.0, &self.0, req)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_request_goes_out_and_its_answer_comes_in_without_waiting() {
    let l = Listening::new("answer");
    let mut asking = l.ask(&json!({"execute": "snapshot"})).unwrap();
    // Nothing answered yet: a step returns at once, the request sent.
    assert!(asking.step().is_none());
    let (conn, _) = l.1.accept().unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    assert_eq!(line, "{\"execute\":\"snapshot\"}\n");
    (&conn).write_all(b"{\"recorded\":1,").unwrap();
    assert!(asking.step().is_none(), "half a line is no answer");
    (&conn).write_all(b"\"problems\":[]}\n").unwrap();
    let answer = asking.step().expect("answered").unwrap();
    assert_eq!(answer["recorded"], 1);

    let refused = l.ask(&json!({"execute": "apply"})).unwrap();
    let (conn, _) = l.1.accept().unwrap();
    (&conn)
        .write_all(b"{\"error\":\"nothing recorded\"}\n")
        .unwrap();
    let answer = refused.wait(Instant::now() + Duration::from_secs(5));
    assert_eq!(answer.unwrap_err(), "the placer says: nothing recorded");
}

#[test]
fn a_placer_that_never_answers_costs_the_deadline_only() {
    let l = Listening::new("silent");
    // Accepted by the kernel (the backlog), never read nor answered: a stopped placer.
    let asking = l.ask(&json!({"execute": "apply"})).unwrap();
    let started = Instant::now();
    let err = asking
        .wait(started + Duration::from_millis(200))
        .unwrap_err();
    assert!(err.contains("no answer within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_placer_gone_or_absent_is_an_error_not_a_wait() {
    let l = Listening::new("gone");
    let mut asking = l.ask(&json!({"execute": "apply"})).unwrap();
    let (conn, _) = l.1.accept().unwrap();
    drop(conn);
    let err = loop {
        if let Some(answer) = asking.step() {
            break answer.unwrap_err();
        }
    };
    assert!(err.contains("not JSON") || err.contains("placer"), "{err}");
    let path = l.0.clone();
    drop(l);
    let err = Asking::start_at(&path, &path, &json!({})).unwrap_err();
    assert!(err.starts_with("no placer service"), "{err}");
}
