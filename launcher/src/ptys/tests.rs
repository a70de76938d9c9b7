//! The pty argv rewrite, the `query-chardev` rewrite, and the relay with real ptys and sockets.

use super::*;
use crate::cmdline::testing::{parse, strings};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

#[test]
fn pty_chardevs_become_sockets_and_shared_ones_stay_qemus() {
    let cmd = parse(&[
        "-chardev",
        "pty,id=c0,logfile=/var/log/c0.log,path=/run/vm/c0",
        "-serial",
        "none",
        "-serial",
        "pty",
        "-parallel",
        "none",
        "-parallel",
        "pty",
        "-chardev",
        "pty,id=m0,mux=on",
        "-monitor",
        "pty",
        "-chardev",
        "pty,id=h0",
        "-mon",
        "chardev=h0",
        "-serial",
        "mon:pty",
        "-chardev",
        r#"{"id":"j0","backend":{"type":"pty","data":{}}}"#,
    ]);
    let ptys = find(&cmd);
    assert_eq!(
        ptys.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(),
        ["c0", "serial1", "parallel0"]
    );
    assert_eq!(ptys[0].link, Some(PathBuf::from("/run/vm/c0")));
    let out = strings(&rewrite(&cmd, &ptys, &[30, 31, 32]));
    let mut want = strings(&cmd);
    want[1] = "socket,id=c0,logfile=/var/log/c0.log,fd=30".into();
    want[5] = "chardev:serial1".into();
    want[9] = "chardev:parallel0".into();
    want.extend(
        [
            "-chardev",
            "socket,id=serial1,fd=31",
            "-chardev",
            "socket,id=parallel0,fd=32",
        ]
        .map(String::from),
    );
    assert_eq!(out, want);
}

#[test]
fn query_chardev_reports_the_pty_for_kept_labels_only() {
    let names = [("serial0".to_owned(), "pty:/dev/pts/4".to_owned())];
    let reply = serde_json::json!([
        {"frontend-open": true, "filename": "unix:", "label": "serial0"},
        {"frontend-open": true, "filename": "pty:/dev/pts/9", "label": "compat_monitor0"},
    ]);
    let got = rewrite_chardev_info(&reply, &names).unwrap();
    assert_eq!(got[0]["filename"], "pty:/dev/pts/4");
    assert_eq!(got[1], reply[1]);
    assert_eq!(
        rewrite_chardev_info(&got, &names),
        None,
        "nothing to change"
    );
    let other = serde_json::json!([{"label": "serial0", "filename": "x"}]);
    assert_eq!(
        rewrite_chardev_info(&other, &names),
        None,
        "not ChardevInfo"
    );
}

/// Waits up to two seconds for `fd` to be readable: pty data reaches the other side
/// through the kernel's flip buffer, a moment after the write.
fn wait_in(fd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, PollTimeout::from(2000u16));
}

/// Reads what `fd` has now, waiting for it to become readable first.
fn recv_now(fd: &OwnedFd) -> Vec<u8> {
    wait_in(fd.as_fd());
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn nothing_for(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 16];
    socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) == Err(Errno::EAGAIN)
}

/// Reads `n` bytes from the pty's slave.
fn read_slave(slave: &mut File, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    let mut at = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while at < n && Instant::now() < deadline {
        wait_in(slave.as_fd());
        match slave.read(&mut out[at..]) {
            Ok(k) => at += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the slave: {e}"),
        }
    }
    out.truncate(at);
    out
}

fn open_slave(path: &std::path::Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

/// Lets the relay see what the slave's user typed.
fn typed(relay: &mut PtyRelay, slave: &mut File, bytes: &[u8]) {
    slave.write_all(bytes).unwrap();
    wait_in(relay.ptys[0].pty.master.as_fd());
    relay.handle(0);
}

/// A `-chardev pty,id=c0`.
fn chardev_c0() -> KeptPty {
    KeptPty {
        item: 0,
        kind: Kind::Chardev,
        label: "c0".into(),
        link: None,
    }
}

#[test]
fn the_pty_follows_the_guest_from_one_generation_to_the_next() {
    let poll = mio::Poll::new().unwrap();
    let registry = poll.registry();
    let pty = open(&chardev_c0()).unwrap();
    assert_eq!(
        pty.announcement(),
        format!(
            "char device redirected to {} (label c0)",
            pty.path.display()
        )
    );
    let mut slave = open_slave(&pty.path);
    let raw = nix::sys::termios::tcgetattr(&slave).unwrap();
    assert!(!raw
        .local_flags
        .contains(nix::sys::termios::LocalFlags::ECHO));
    let mut relay = PtyRelay::new(registry, vec![pty], Token).unwrap();
    let gen1 = relay.ends_for(registry, 1).unwrap().remove(0);

    socket::send(gen1.as_raw_fd(), b"HB 1\n", MsgFlags::empty()).unwrap();
    relay.handle(0);
    assert_eq!(read_slave(&mut slave, 5), b"HB 1\n");
    typed(&mut relay, &mut slave, b"abc");
    // QEMU 1 reads one byte into its UART; the rest waits in its socket.
    let mut one = [0u8; 1];
    wait_in(gen1.as_fd());
    socket::recv(gen1.as_raw_fd(), &mut one, MsgFlags::MSG_DONTWAIT).unwrap();
    assert_eq!(&one, b"a");

    // An upgrade starts QEMU 2: what QEMU 1 did not read is taken back, and new input
    // waits for the one that will run the guest.
    let gen2 = relay.ends_for(registry, 2).unwrap().remove(0);
    assert!(nothing_for(&gen1), "unread input taken back from QEMU 1");
    typed(&mut relay, &mut slave, b"def");
    assert!(nothing_for(&gen1) && nothing_for(&gen2), "input held");
    socket::send(gen1.as_raw_fd(), b"HB 2\n", MsgFlags::empty()).unwrap();
    socket::send(gen2.as_raw_fd(), b"HB 4\n", MsgFlags::empty()).unwrap();
    relay.handle(0);
    assert_eq!(read_slave(&mut slave, 5), b"HB 2\n");
    // QEMU 1's last output, written before QEMU 2 took over, comes before QEMU 2's.
    socket::send(gen1.as_raw_fd(), b"HB 3\n", MsgFlags::empty()).unwrap();
    relay.commit(registry, 2);
    assert_eq!(read_slave(&mut slave, 10), b"HB 3\nHB 4\n");
    assert_eq!(recv_now(&gen2), b"bcdef");

    // A failed upgrade: held input goes back to the generation still running the guest.
    let gen3 = relay.ends_for(registry, 3).unwrap().remove(0);
    typed(&mut relay, &mut slave, b"ghi");
    assert!(nothing_for(&gen2));
    relay.abort(registry);
    assert_eq!(recv_now(&gen2), b"ghi");
    assert!(socket::send(gen3.as_raw_fd(), b"x", MsgFlags::MSG_NOSIGNAL).is_err());

    // Nobody has the pty open: output is dropped, as QEMU drops it.
    drop(slave);
    socket::send(gen2.as_raw_fd(), b"lost\n", MsgFlags::empty()).unwrap();
    wait_in(relay.ptys[0].ends[0].ours.as_fd());
    relay.handle(0);
    let mut slave = open_slave(&relay.ptys[0].pty.path);
    socket::send(gen2.as_raw_fd(), b"seen\n", MsgFlags::empty()).unwrap();
    relay.handle(0);
    assert_eq!(read_slave(&mut slave, 5), b"seen\n");
}

#[test]
fn the_first_output_of_the_generation_committed_is_timed() {
    let poll = mio::Poll::new().unwrap();
    let registry = poll.registry();
    let pty = open(&chardev_c0()).unwrap();
    let _slave = open_slave(&pty.path);
    let mut relay = PtyRelay::new(registry, vec![pty], Token).unwrap();
    let _gen1 = relay.ends_for(registry, 1).unwrap().remove(0);
    let gen2 = relay.ends_for(registry, 2).unwrap().remove(0);
    // QEMU 2 says nothing before it runs the guest: nothing to time yet.
    let committed = Instant::now();
    relay.commit(registry, 2);
    assert_eq!(relay.first_output(), None);
    socket::send(gen2.as_raw_fd(), b"HB 1\n", MsgFlags::empty()).unwrap();
    wait_in(relay.ptys[0].ends[0].ours.as_fd());
    relay.handle(0);
    let first = relay.first_output().expect("QEMU 2's first output timed");
    assert!(first >= committed);
    socket::send(gen2.as_raw_fd(), b"HB 2\n", MsgFlags::empty()).unwrap();
    wait_in(relay.ptys[0].ends[0].ours.as_fd());
    relay.handle(0);
    assert_eq!(
        relay.first_output(),
        Some(first),
        "the first stays the first"
    );
}
