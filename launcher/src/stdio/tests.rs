use std::os::fd::{AsRawFd, OwnedFd};

use super::*;

fn full_pipe() -> (OwnedFd, OwnedFd) {
    // A blocking write end, as an inherited stderr is; filled through a non-blocking twin.
    let (r, w) = nix::unistd::pipe().unwrap();
    let twin = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
        .unwrap();
    let flags = nix::fcntl::fcntl(twin.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(twin.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    while nix::unistd::write(&twin, &[b'.'; 4096]).is_ok() {}
    (r, w)
}

/// Reads everything the pipe holds now.
fn take(r: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let mut fds = [PollFd::new(r.as_fd_ref(), PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap() == 0 {
            return out;
        }
        let n = nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}

impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

#[test]
fn a_full_pipe_queues_without_waiting_and_keeps_the_order() {
    let (r, w) = full_pipe();
    let mut sink = Sink::new(w.as_raw_fd());
    let started = Instant::now();
    sink.write(b"first line\n");
    sink.write(b"second line\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(sink.pending(), 23, "nothing fits in a full pipe");
    let dots = take(&r);
    assert!(dots.iter().all(|&b| b == b'.'));
    assert!(!sink.flush(), "all of it fits once the reader read");
    assert_eq!(take(&r), b"first line\nsecond line\n");
    assert_eq!(sink.dropped, 0);
}

#[test]
fn overflow_is_dropped_whole_counted_and_said_once_the_stream_drains() {
    let (r, w) = full_pipe();
    let mut sink = Sink::new(w.as_raw_fd());
    let chunk = vec![b'q'; 1000];
    for _ in 0..(QUEUE_MAX / 1000) {
        sink.write(&chunk);
    }
    // 600 more do not fit in the queue's 64 KiB and are dropped whole; 5 more still fit.
    sink.write(&[b'd'; 600]);
    sink.write(b"fits\n");
    assert_eq!(sink.pending(), QUEUE_MAX / 1000 * 1000 + 5);
    assert_eq!(sink.dropped, 600);
    let mut got = take(&r);
    while sink.flush() {
        got.extend(take(&r));
    }
    got.extend(take(&r));
    let text = String::from_utf8_lossy(&got);
    let text = text.trim_start_matches('.');
    assert!(!text.contains("ddd"));
    let queued = text.split("fits").next().unwrap_or_default();
    assert_eq!(queued.matches('q').count(), QUEUE_MAX / 1000 * 1000);
    assert!(
        text.ends_with(
            "fits\nqemu-liveupgrade: 600 bytes of output dropped: stderr was not being read\n"
        ),
        "{}",
        &text[text.len() - 120..]
    );
    assert_eq!(sink.unreported, 0);
    sink.write(b"more\n");
    assert_eq!(take(&r), b"more\n", "said once, not again");
}

#[test]
fn a_reader_gone_costs_the_output_not_the_writer() {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let mut sink = Sink::new(w.as_raw_fd());
    sink.write(b"nobody reads this\n");
    assert_eq!(sink.pending(), 0);
    assert!(sink.gone);
    sink.write(b"nor this\n");
    assert!(!sink.flush());
}

#[test]
fn without_rwf_nowait_a_full_pipe_is_left_alone_too() {
    let (r, w) = full_pipe();
    assert_eq!(
        write_guarded(w.as_raw_fd(), b"x", GUARDED_CHUNK),
        Err(Errno::EAGAIN)
    );
    take(&r);
    let big = vec![b'y'; 3 * GUARDED_CHUNK];
    assert_eq!(
        write_guarded(w.as_raw_fd(), &big, GUARDED_CHUNK),
        Ok(GUARDED_CHUNK)
    );
    assert_eq!(fallback(w.as_raw_fd()), How::Guarded(GUARDED_CHUNK));
}

#[test]
fn a_regular_file_is_written_plainly() {
    let dir = std::env::temp_dir().join(format!("stdio-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log");
    let file = std::fs::File::create(&path).unwrap();
    assert_eq!(fallback(file.as_raw_fd()), How::Plain);
    let mut sink = Sink::new(file.as_raw_fd());
    sink.write(b"to a file\n");
    assert_eq!(sink.pending(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"to a file\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_regular_file_takes_more_than_a_queue_holds_whole_and_in_order() {
    // libvirt without virtlogd points the VM's stderr at the domain's log file: nothing there
    // is ever dropped or reordered, however much comes at once.
    let dir = std::env::temp_dir().join(format!("stdio-test-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log");
    let file = std::fs::File::create(&path).unwrap();
    let mut sink = Sink::new(file.as_raw_fd());
    let big: Vec<u8> = (0..3 * QUEUE_MAX).map(|i| b'a' + (i % 26) as u8).collect();
    sink.write(b"first\n");
    sink.write(&big);
    sink.write(b"last\n");
    assert_eq!((sink.pending(), sink.dropped), (0, 0));
    let mut want = b"first\n".to_vec();
    want.extend_from_slice(&big);
    want.extend_from_slice(b"last\n");
    assert!(std::fs::read(&path).unwrap() == want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_disk_costs_the_bytes_not_the_stream() {
    // /dev/full fails every write with ENOSPC, as a log on a full disk does.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut sink = Sink::new(full.as_raw_fd());
    sink.write(b"abc\n");
    assert!(!sink.gone, "space may come back");
    assert_eq!((sink.pending(), sink.dropped, sink.unreported), (0, 4, 4));
    sink.write(b"de\n");
    assert_eq!(sink.dropped, 7);
    // The notice fails too, once per try, and is counted like any other line: no loop.
    assert!(!sink.flush());
    assert_eq!(sink.pending(), 0);
    assert!(sink.dropped > 7);
    // Space again (a file in its place): the next line goes, and the notice after it.
    let dir = std::env::temp_dir().join(format!("stdio-test-full-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log");
    let file = std::fs::File::create(&path).unwrap();
    nix::unistd::dup2(file.as_raw_fd(), full.as_raw_fd()).unwrap();
    sink.how = How::Unknown;
    sink.write(b"space again\n");
    let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
    assert!(text.starts_with("space again\n"), "{text}");
    assert!(
        text.ends_with("bytes of output dropped: stderr was not being read\n"),
        "{text}"
    );
    assert_eq!(sink.unreported, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_waits_crosses_a_handover_for_stdout_and_stderr_only() {
    let mut sink = Sink::new(2);
    sink.queue = b"waiting\n".to_vec();
    sink.dropped = 10;
    sink.unreported = 4;
    let state = sink.exported().unwrap();
    let text = serde_json::to_string(&state).unwrap();
    let back: crate::handover::state::StdioQueue = serde_json::from_str(&text).unwrap();
    let got = Sink::imported(back).unwrap();
    assert_eq!(
        (got.fd, got.queue.as_slice(), got.dropped, got.unreported),
        (2, &b"waiting\n"[..], 10, 4)
    );
    assert_eq!(got.how, How::Unknown, "found anew by the new launcher");
    assert!(!got.watched, "registered anew in the new loop");

    let mut other = state.clone();
    other.fd = 7;
    assert!(
        Sink::imported(other).is_none(),
        "fd 7 is not the launcher's"
    );
    let mut long = state;
    long.queued.0 = vec![b'x'; QUEUE_MAX + 100];
    let got = Sink::imported(long).unwrap();
    assert_eq!((got.pending(), got.dropped), (QUEUE_MAX, 110));
    assert!(Sink::new(1).exported().is_none(), "nothing to carry");
}

#[test]
fn without_rwf_nowait_a_stream_queues_and_drains_the_same() {
    // Kernels before 6.4 refuse RWF_NOWAIT on pipes (EOPNOTSUPP): the poll-guarded writes
    // carry the stream instead, PIPE_BUF at a time.
    let (r, w) = full_pipe();
    let mut sink = Sink::new(w.as_raw_fd());
    sink.how = How::Guarded(GUARDED_CHUNK);
    let lines: Vec<u8> = (0..3000)
        .flat_map(|i| format!("{i:05}\n").into_bytes())
        .collect();
    sink.write(&lines);
    assert_eq!(sink.pending(), lines.len(), "nothing fits in a full pipe");
    let mut got = take(&r);
    got.retain(|&b| b != b'.');
    while sink.flush() {
        got.extend(take(&r));
    }
    got.extend(take(&r));
    assert!(got == lines, "in order, whole");
    assert_eq!(sink.how, How::Guarded(GUARDED_CHUNK));
}
