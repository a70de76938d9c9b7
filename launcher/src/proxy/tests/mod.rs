//! The proxy driven by a real `mio::Poll`, with real sockets and fake QEMU monitors.

mod fake;
mod handover;
mod journal;
mod real;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use serde_json::{json, Value};

use super::{Listen, Mode, Proxy, ProxyError};
use fake::{Fake, Script};

const WAIT: Duration = Duration::from_secs(5);

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
    eof: bool,
}

struct H {
    // Dropped in this order: the proxy before the fakes, the directory last.
    proxy: Proxy,
    fakes: Vec<(u32, Vec<Fake>)>,
    poll: Poll,
    events: Events,
    modes: Vec<Mode>,
    dir: PathBuf,
}

impl Drop for H {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("qlu-proxy-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl H {
    fn new(modes: &[Mode]) -> H {
        let dir = temp_dir();
        let poll = Poll::new().unwrap();
        let mut proxy = Proxy::new(100);
        proxy.set_backend_dir(&dir);
        for (i, &mode) in modes.iter().enumerate() {
            let listen = Listen::Path(dir.join(format!("mon{i}.sock")));
            assert_eq!(proxy.add(poll.registry(), listen, mode).unwrap(), i);
        }
        H {
            proxy,
            fakes: Vec::new(),
            poll,
            events: Events::with_capacity(64),
            modes: modes.to_vec(),
            dir,
        }
    }

    /// Starts generation `gen`'s fake QEMU on the proxy's backends.
    fn spawn(&mut self, gen: u32, refuse_caps: bool) {
        self.spawn_with(gen, |s| s.refuse_caps = refuse_caps);
    }

    fn spawn_with(&mut self, gen: u32, tweak: impl Fn(&mut Script)) {
        let fds = self.proxy.backends_for(gen).unwrap();
        let fakes = fds
            .into_iter()
            .zip(&self.modes)
            .map(|(fd, &mode)| {
                let mut script = Script {
                    gen,
                    mode,
                    refuse_caps: false,
                    caps_delay: Duration::ZERO,
                };
                tweak(&mut script);
                Fake::spawn(fd, script)
            })
            .collect();
        self.fakes.push((gen, fakes));
    }

    /// Generation 1 with one client per monitor, QMP ones past capability negotiation.
    fn started(modes: &[Mode]) -> (H, Vec<Client>) {
        let mut h = H::new(modes);
        h.spawn(1, false);
        h.proxy.activate_first(h.poll.registry(), 1).unwrap();
        let mut clients = Vec::new();
        for (i, &mode) in modes.iter().enumerate() {
            let mut c = h.connect(i);
            if mode == Mode::Qmp {
                assert!(h.msg(&mut c).get("QMP").is_some());
                let r = h.cmd(
                    &mut c,
                    r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"caps"}"#,
                );
                assert_eq!(r, json!({"return": {}, "id": "caps"}));
            }
            clients.push(c);
        }
        (h, clients)
    }

    fn fake(&self, gen: u32, index: usize) -> &Fake {
        &self.fakes.iter().find(|(g, _)| *g == gen).unwrap().1[index]
    }

    fn turn(&mut self, timeout: Duration) {
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        for ev in self.events.iter() {
            assert!(self.proxy.owns(ev.token()));
            self.proxy.handle(self.poll.registry(), ev);
        }
    }

    fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.turn(Duration::from_millis(5));
        }
    }

    fn until(&mut self, what: &str, mut cond: impl FnMut(&mut H) -> bool) {
        let end = Instant::now() + WAIT;
        while !cond(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            self.turn(Duration::from_millis(5));
        }
    }

    fn connect(&mut self, index: usize) -> Client {
        let s = UnixStream::connect(self.dir.join(format!("mon{index}.sock"))).unwrap();
        s.set_nonblocking(true).unwrap();
        Client {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }

    fn fill(&mut self, c: &mut Client) {
        let mut chunk = [0u8; 4096];
        loop {
            match c.s.read(&mut chunk) {
                Ok(0) => {
                    c.eof = true;
                    return;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("client read: {e}"),
            }
        }
    }

    /// Reads until `text` arrived and returns everything up to and including it.
    fn upto(&mut self, c: &mut Client, text: &str) -> String {
        let end = Instant::now() + WAIT;
        loop {
            self.fill(c);
            if let Some(i) = c.buf.windows(text.len()).position(|w| w == text.as_bytes()) {
                let got: Vec<u8> = c.buf.drain(..i + text.len()).collect();
                return String::from_utf8(got).unwrap();
            }
            assert!(!c.eof, "client got EOF waiting for {text:?}");
            assert!(
                Instant::now() < end,
                "timed out waiting for {text:?}, have {:?}",
                c.buf
            );
            self.turn(Duration::from_millis(5));
        }
    }

    fn msg(&mut self, c: &mut Client) -> Value {
        serde_json::from_str(&self.upto(c, "\r\n")).unwrap()
    }

    fn cmd(&mut self, c: &mut Client, text: &str) -> Value {
        send(c, text);
        self.msg(c)
    }

    /// Asserts the client gets nothing for a while.
    fn quiet(&mut self, c: &mut Client) {
        self.idle(Duration::from_millis(100));
        self.fill(c);
        assert!(
            c.buf.is_empty(),
            "unexpected {:?}",
            String::from_utf8_lossy(&c.buf)
        );
    }

    /// Prepares the swap to `gen` and turns the loop until every client is ready.
    fn prepare(&mut self, gen: u32) -> Result<(), ProxyError> {
        self.proxy.prepare(self.poll.registry(), gen)?;
        let end = Instant::now() + WAIT;
        while !self.proxy.prepared(self.poll.registry())? {
            assert!(Instant::now() < end, "timed out preparing generation {gen}");
            self.turn(Duration::from_millis(5));
        }
        Ok(())
    }

    fn swap(&mut self, gen: u32) {
        self.spawn(gen, false);
        self.proxy.hold(self.poll.registry());
        self.prepare(gen).unwrap();
        self.until("drained", |h| h.proxy.drained());
        self.proxy.commit(self.poll.registry(), gen);
    }
}

fn send(c: &mut Client, text: &str) {
    c.s.write_all(format!("{text}\n").as_bytes()).unwrap();
}

/// Sends `text` with `fd` passed along by SCM_RIGHTS, as libvirt sends `getfd`.
fn send_fd(c: &mut Client, text: &str, fd: std::os::fd::BorrowedFd<'_>) {
    let fd = fd.try_clone_to_owned().unwrap();
    let line = format!("{text}\n");
    let n =
        super::sockets::send_fds(std::os::fd::AsFd::as_fd(&c.s), line.as_bytes(), &[fd]).unwrap();
    c.s.write_all(&line.as_bytes()[n..]).unwrap();
}

fn version(reply: &Value) -> u64 {
    reply["return"]["qemu"]["micro"].as_u64().unwrap()
}

const CAPS: &str = r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"caps"}"#;

#[test]
fn the_first_reply_and_chardev_byte_after_a_swap_are_timed() {
    let (mut h, mut c) = H::started(&[Mode::Qmp, Mode::Raw]);
    h.cmd(&mut c[0], r#"{"execute":"query-version","id":1}"#);
    let before = Instant::now();
    h.swap(2);
    // The replayed negotiation's answer is the proxy's own, not relayed.
    assert_eq!(h.proxy.first_relayed(), (None, None));
    let r = h.cmd(&mut c[0], r#"{"execute":"query-version","id":2}"#);
    assert_eq!(version(&r), 2);
    let (console, monitor) = h.proxy.first_relayed();
    let monitor = monitor.expect("the new generation's first reply timed");
    assert!(monitor >= before && console.is_none());
    send(&mut c[1], "x");
    assert_eq!(h.upto(&mut c[1], "\n"), "g2:x\n");
    let (console, again) = h.proxy.first_relayed();
    assert!(console.expect("the chardev's first byte timed") >= monitor);
    assert_eq!(again, Some(monitor), "the first stays the first");
}

#[test]
fn qmp_client_continues_on_the_new_generation() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let r = h.cmd(&mut c[0], r#"{"execute":"query-version","id":1}"#);
    assert_eq!((version(&r), &r["id"]), (1, &json!(1)));

    h.swap(2);
    let r = h.cmd(&mut c[0], r#"{"execute":"query-version","id":2}"#);
    assert_eq!((version(&r), &r["id"]), (2, &json!(2)));
    // The capabilities were replayed byte for byte, and nothing else went to generation 2
    // before the client's own command.
    assert_eq!(
        h.fake(2, 0).got(),
        vec![
            CAPS.to_owned(),
            r#"{"execute":"query-version","id":2}"#.into()
        ]
    );
    assert_eq!(h.fake(1, 0).got().len(), 2);
    h.until("old connection closed", |h| !h.fake(1, 0).connected());
    h.quiet(&mut c[0]);
}

#[test]
fn commands_held_during_a_swap_reach_the_new_generation_in_order() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    for id in 10..13 {
        send(
            &mut c[0],
            &format!(r#"{{"execute":"query-version","id":{id}}}"#),
        );
    }
    // Half a command: it must not be split between generations.
    c[0].s.write_all(br#"{"execute":"query-"#).unwrap();
    h.quiet(&mut c[0]);
    assert_eq!(h.fake(1, 0).got().len(), 1);
    h.prepare(2).unwrap();
    assert!(h.proxy.drained());
    h.proxy.commit(h.poll.registry(), 2);
    c[0].s.write_all(br#"version","id":13}"#).unwrap();
    for id in 10..14 {
        let r = h.msg(&mut c[0]);
        assert_eq!((version(&r), r["id"].as_u64()), (2, Some(id)));
    }
    assert_eq!(h.fake(1, 0).got().len(), 1);
}

#[test]
fn drained_waits_for_answers_owed_by_the_old_generation() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    send(&mut c[0], r#"{"execute":"slow","id":"s"}"#);
    h.until("slow received", |h| h.fake(1, 0).got().len() == 2);
    h.proxy.hold(h.poll.registry());
    assert!(!h.proxy.drained());
    h.until("drained", |h| h.proxy.drained());
    assert_eq!(h.msg(&mut c[0]), json!({"return": {}, "id": "s"}));
    h.spawn(2, false);
    h.prepare(2).unwrap();
    h.proxy.commit(h.poll.registry(), 2);
    assert_eq!(
        version(&h.cmd(&mut c[0], r#"{"execute":"query-version"}"#)),
        2
    );
}

#[test]
fn events_caused_by_the_swap_are_hidden() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.proxy.set_swap_running(true);
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    for ev in [
        "STOP",
        "MIGRATION",
        "BLOCK_JOB_READY",
        "MIGRATION_PASS",
        "SHUTDOWN",
        "MARK1",
    ] {
        h.fake(1, 0).event(ev);
    }
    let names = |h: &mut H, c: &mut Client, until: &str| {
        let mut seen = Vec::new();
        loop {
            let m = h.msg(c);
            let name = m["event"].as_str().unwrap().to_owned();
            seen.push(name.clone());
            if name == until {
                return seen;
            }
        }
    };
    assert_eq!(
        names(&mut h, &mut c[0], "MARK1"),
        ["BLOCK_JOB_READY", "MARK1"]
    );
    h.prepare(2).unwrap();
    for ev in ["RESUME", "MIGRATION", "NIC_RX_FILTER_CHANGED"] {
        h.fake(2, 0).event(ev);
    }
    // The new generation's words wait for commit.
    h.quiet(&mut c[0]);
    h.proxy.commit(h.poll.registry(), 2);
    for ev in ["RESUME", "MARK2", "STOP", "RESUME", "MARK3"] {
        h.fake(2, 0).event(ev);
    }
    let seen = names(&mut h, &mut c[0], "MARK3");
    assert_eq!(
        seen,
        ["NIC_RX_FILTER_CHANGED", "MARK2", "STOP", "RESUME", "MARK3"]
    );
}

#[test]
fn client_arriving_during_a_swap_is_served_after_commit() {
    let mut h = H::new(&[Mode::Qmp]);
    h.spawn(1, false);
    h.proxy.activate_first(h.poll.registry(), 1).unwrap();
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    let mut c = h.connect(0);
    h.quiet(&mut c);
    h.prepare(2).unwrap();
    h.proxy.commit(h.poll.registry(), 2);
    assert!(h.msg(&mut c).get("QMP").is_some());
    assert_eq!(h.cmd(&mut c, CAPS), json!({"return": {}, "id": "caps"}));
    assert_eq!(version(&h.cmd(&mut c, r#"{"execute":"query-version"}"#)), 2);
    assert_eq!(h.fake(1, 0).accepted(), 0);
}

#[test]
fn capabilities_still_unanswered_at_prepare_are_awaited_and_replayed() {
    let mut h = H::new(&[Mode::Qmp]);
    h.spawn_with(1, |s| s.caps_delay = Duration::from_millis(200));
    h.proxy.activate_first(h.poll.registry(), 1).unwrap();
    let mut c = h.connect(0);
    assert!(h.msg(&mut c).get("QMP").is_some());
    send(&mut c, CAPS);
    h.until("caps forwarded", |h| h.fake(1, 0).got().len() == 1);
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    assert!(!h.proxy.drained());
    h.prepare(2).unwrap();
    assert!(h.proxy.drained());
    h.proxy.commit(h.poll.registry(), 2);
    assert_eq!(h.msg(&mut c), json!({"return": {}, "id": "caps"}));
    assert_eq!(h.fake(2, 0).got(), [CAPS]);
    assert_eq!(version(&h.cmd(&mut c, r#"{"execute":"query-version"}"#)), 2);
}

#[test]
fn client_end_of_input_reaches_qemu_and_its_answer_the_client() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    send(&mut c[0], r#"{"execute":"query-version","id":"last"}"#);
    c[0].s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(h.msg(&mut c[0])["id"], "last");
    h.until("client closed", |h| {
        h.fill(&mut c[0]);
        c[0].eof
    });
    // QEMU accepts the next client.
    let mut next = h.connect(0);
    assert!(h.msg(&mut next).get("QMP").is_some());
}

#[test]
fn clients_are_served_one_at_a_time() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    let mut second = h.connect(0);
    h.quiet(&mut second);
    drop(c.remove(0));
    assert!(h.msg(&mut second).get("QMP").is_some());
    assert_eq!(h.fake(1, 0).accepted(), 2);
}

#[test]
fn abort_returns_every_client_to_the_old_generation() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    send(&mut c[0], r#"{"execute":"query-version","id":"held"}"#);
    h.prepare(2).unwrap();
    h.proxy.abort(h.poll.registry());
    let r = h.msg(&mut c[0]);
    assert_eq!((version(&r), &r["id"]), (1, &json!("held")));
    assert_eq!(
        version(&h.cmd(&mut c[0], r#"{"execute":"query-version"}"#)),
        1
    );
    assert_eq!(h.fake(2, 0).got(), vec![CAPS.to_owned()]);
    h.until("prepared connection closed", |h| !h.fake(2, 0).connected());
}

#[test]
fn refused_capabilities_fail_prepare() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.spawn(2, true);
    h.proxy.hold(h.poll.registry());
    let err = h.prepare(2).unwrap_err();
    assert!(
        matches!(
            err,
            ProxyError::Capabilities {
                index: 0,
                gen: 2,
                ..
            }
        ),
        "{err:?}"
    );
    h.proxy.abort(h.poll.registry());
    assert_eq!(
        version(&h.cmd(&mut c[0], r#"{"execute":"query-version"}"#)),
        1
    );
}

#[test]
fn raw_bytes_cross_a_swap_both_ways() {
    let (mut h, mut c) = H::started(&[Mode::Raw]);
    send(&mut c[0], "hello");
    assert_eq!(h.upto(&mut c[0], "\n"), "g1:hello\n");
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    send(&mut c[0], "during");
    h.fake(1, 0).emit(b"out1\n");
    assert_eq!(h.upto(&mut c[0], "\n"), "out1\n");
    h.prepare(2).unwrap();
    h.until("gen 2 connected", |h| h.fake(2, 0).connected());
    h.fake(2, 0).emit(b"out2\n");
    h.quiet(&mut c[0]);
    h.proxy.commit(h.poll.registry(), 2);
    assert_eq!(h.upto(&mut c[0], "\n"), "out2\n");
    assert_eq!(h.upto(&mut c[0], "\n"), "g2:during\n");
    send(&mut c[0], "after");
    assert_eq!(h.upto(&mut c[0], "\n"), "g2:after\n");
    assert_eq!(h.fake(1, 0).got(), ["hello"]);
}

#[test]
fn output_a_client_is_slow_to_take_reaches_it_whole() {
    let (mut h, mut c) = H::started(&[Mode::Raw]);
    h.until("gen 1 connected", |h| h.fake(1, 0).connected());
    // More than the proxy keeps for a client and both sockets' buffers hold, so that the
    // proxy must wait for room to write and stop reading QEMU meanwhile.
    let big: Vec<u8> = (0..4usize << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let writer = h.fake(1, 0).emit_in_background(big.clone());
    h.idle(Duration::from_millis(200));
    h.until("all of it", |h| {
        h.fill(&mut c[0]);
        c[0].buf.len() >= big.len()
    });
    assert!(c[0].buf == big, "output reordered or changed");
    writer.join().unwrap();
}

#[test]
fn input_qemu_is_slow_to_take_reaches_it_whole() {
    let (mut h, mut c) = H::started(&[Mode::Raw]);
    h.until("gen 1 connected", |h| h.fake(1, 0).connected());
    // More than the sockets hold, sent while QEMU does not read: the proxy must wait for
    // room to forward it, with no other event to wake it once the client is done.
    h.fake(1, 0).pause(true);
    let mut line: Vec<u8> = (0..3usize << 19).map(|i| b'a' + (i % 26) as u8).collect();
    line.push(b'\n');
    let sent = line.len();
    let mut s = c[0].s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut at = 0;
        while at < line.len() {
            match s.write(&line[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("client write: {e}"),
            }
        }
    });
    h.idle(Duration::from_millis(300));
    h.fake(1, 0).pause(false);
    let echo = h.upto(&mut c[0], "\n");
    assert_eq!(echo.len(), "g1:".len() + sent);
    assert!(echo.starts_with("g1:abc"), "{}", &echo[..16]);
    writer.join().unwrap();
}

#[test]
fn hmp_banner_of_the_new_generation_is_swallowed() {
    let (mut h, mut c) = H::started(&[Mode::Hmp]);
    let banner = h.upto(&mut c[0], "(qemu) ");
    assert!(banner.starts_with("QEMU 7.2.1 monitor"), "{banner}");
    send(&mut c[0], "info version");
    assert_eq!(
        h.upto(&mut c[0], "(qemu) "),
        "info version\r\n7.2.1\r\n(qemu) "
    );
    h.spawn(2, false);
    h.proxy.hold(h.poll.registry());
    send(&mut c[0], "info version");
    h.prepare(2).unwrap();
    h.proxy.commit(h.poll.registry(), 2);
    assert_eq!(
        h.upto(&mut c[0], "(qemu) "),
        "info version\r\n7.2.2\r\n(qemu) "
    );
    h.quiet(&mut c[0]);
}

#[test]
fn qemu_exit_closes_the_client() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.fakes.clear();
    h.until("client closed", |h| {
        h.fill(&mut c[0]);
        c[0].eof
    });
}

#[test]
fn flush_delivers_what_an_exited_qemu_said_last() {
    let (mut h, mut c) = H::started(&[Mode::Qmp]);
    h.fake(1, 0).event("SHUTDOWN");
    h.fakes.clear();
    // No turn of the loop: flush alone reads QEMU's last words and writes them out.
    h.proxy.flush(Instant::now() + WAIT);
    c[0].s.set_nonblocking(false).unwrap();
    c[0].s.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8];
        assert_eq!(c[0].s.read(&mut b).unwrap(), 1);
        line.push(b[0]);
    }
    let ev: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(ev["event"], "SHUTDOWN");
}

#[test]
fn listen_path_replaces_a_stale_socket_and_is_unlinked_on_drop() {
    let dir = temp_dir();
    let path = dir.join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    let poll = Poll::new().unwrap();
    let mut proxy = Proxy::new(0);
    proxy.set_backend_dir(&dir);
    proxy
        .add(poll.registry(), Listen::Path(path.clone()), Mode::Qmp)
        .unwrap();
    let inherited = UnixListener::bind(dir.join("inherited.sock")).unwrap();
    proxy
        .add(poll.registry(), Listen::Fd(inherited.into()), Mode::Raw)
        .unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    proxy.backends_for(1).unwrap();
    assert_eq!(proxy.len(), 2);
    drop(proxy);
    assert!(!path.exists());
    // Only the inherited socket's path (not the proxy's to remove) and nothing of the
    // backends are left.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["inherited.sock"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_fd_that_is_not_listening_is_refused() {
    let poll = Poll::new().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let err = Proxy::new(0)
        .add(poll.registry(), Listen::Fd(a.into()), Mode::Qmp)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

/// A monitor on a TCP port: the client's connection is the launcher's, and moves to the new
/// generation like a unix one.
#[test]
fn tcp_clients_are_served_like_unix_ones() {
    use std::net::{TcpListener, TcpStream};
    let dir = temp_dir();
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(16);
    let mut proxy = Proxy::new(100);
    proxy.set_backend_dir(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    proxy
        .add(poll.registry(), Listen::Tcp(listener), Mode::Qmp)
        .unwrap();
    let script = |gen| Script {
        gen,
        mode: Mode::Qmp,
        refuse_caps: false,
        caps_delay: Duration::ZERO,
    };
    let gen1 = Fake::spawn(proxy.backends_for(1).unwrap().remove(0), script(1));
    proxy.activate_first(poll.registry(), 1).unwrap();

    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut read_line = |proxy: &mut Proxy, poll: &mut Poll, client: &mut TcpStream| -> Value {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(i) = got.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = got.drain(..i + 2).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            assert!(Instant::now() < end, "timed out, have {got:?}");
            poll.poll(&mut events, Some(Duration::from_millis(5)))
                .unwrap();
            for ev in events.iter() {
                proxy.handle(poll.registry(), ev);
            }
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk) {
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert!(read_line(&mut proxy, &mut poll, &mut client)
        .get("QMP")
        .is_some());
    client.write_all(format!("{CAPS}\n").as_bytes()).unwrap();
    assert_eq!(
        read_line(&mut proxy, &mut poll, &mut client),
        json!({"return": {}, "id": "caps"})
    );

    let gen2 = Fake::spawn(proxy.backends_for(2).unwrap().remove(0), script(2));
    proxy.hold(poll.registry());
    proxy.prepare(poll.registry(), 2).unwrap();
    let end = Instant::now() + WAIT;
    let mut turn_events = Events::with_capacity(16);
    while !proxy.prepared(poll.registry()).unwrap() {
        assert!(Instant::now() < end, "timed out preparing");
        poll.poll(&mut turn_events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in turn_events.iter() {
            proxy.handle(poll.registry(), ev);
        }
    }
    assert!(proxy.drained());
    proxy.commit(poll.registry(), 2);
    client
        .write_all(b"{\"execute\":\"query-version\",\"id\":7}\n")
        .unwrap();
    let r = read_line(&mut proxy, &mut poll, &mut client);
    assert_eq!((version(&r), &r["id"]), (2, &json!(7)));
    assert_eq!(gen1.got().len(), 1);
    assert_eq!(
        gen2.got().len(),
        2,
        "capabilities replayed, then the command"
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A display's viewers are accepted and queued whole, for QEMU to take over: what the viewer
/// sends arrives unread on the queued socket.
#[test]
fn display_viewers_are_queued_unread() {
    use std::net::{TcpListener, TcpStream};
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(16);
    let mut proxy = Proxy::new(100);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    proxy
        .add_display(poll.registry(), vec![Listen::Tcp(listener)], "vnc")
        .unwrap();
    assert!(!proxy.has_viewers());
    let mut viewers: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    viewers[1].write_all(b"RFB 003.008\n").unwrap();
    let end = Instant::now() + WAIT;
    let mut taken = Vec::new();
    while taken.len() < 3 {
        assert!(Instant::now() < end, "viewers not accepted");
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in events.iter() {
            proxy.handle(poll.registry(), ev);
        }
        taken.extend(proxy.take_viewers());
    }
    assert!(taken.iter().all(|(p, _)| *p == "vnc"));
    let mut second = TcpStream::from(taken.swap_remove(1).1);
    second.set_nonblocking(false).unwrap();
    let mut hello = [0u8; 12];
    second.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"RFB 003.008\n");
}
