//! A minimal vhost-user backend in client mode, for a QEMU whose vhost-user chardev is the
//! server (`-chardev socket,server=on` + `-netdev vhost-user`): it answers what QEMU asks at
//! start-up and records every message, with the fds that came with it.
//!
//! QEMU sends fds with some messages by SCM_RIGHTS (docs/interop/vhost-user.rst): already at
//! start-up `VHOST_USER_SET_VRING_CALL` carries each virtqueue's eventfd, and once the guest
//! drives the device `SET_MEM_TABLE` carries guest RAM. A backend that gets those messages
//! without their fds cannot work; that is what a byte relay in between would do.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// `VHOST_USER_GET_FEATURES`.
pub const GET_FEATURES: u32 = 1;
/// `VHOST_USER_SET_VRING_CALL`.
pub const SET_VRING_CALL: u32 = 13;
/// `VHOST_USER_GET_PROTOCOL_FEATURES`.
const GET_PROTOCOL_FEATURES: u32 = 15;
/// `VHOST_USER_GET_QUEUE_NUM`.
const GET_QUEUE_NUM: u32 = 17;
/// `VHOST_USER_GET_VRING_BASE`.
const GET_VRING_BASE: u32 = 11;
/// `VHOST_USER_VRING_NOFD_MASK`: set in a vring message's index when no fd comes with it.
const NOFD: u64 = 1 << 8;
/// Header flags: protocol version 1, a reply, a reply wanted.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// What the backend offers: `VIRTIO_F_VERSION_1` only, no protocol features.
const FEATURES: u64 = 1 << 32;

/// One message QEMU sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The request number.
    pub request: u32,
    /// How many fds came with it.
    pub fds: usize,
    /// Whether the message says an fd comes with it (vring messages: no `NOFD` bit).
    pub says_fd: bool,
}

/// The backend, answering on a thread until QEMU closes the connection.
pub struct Backend {
    log: Arc<Mutex<Vec<Message>>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Connects to QEMU's vhost-user socket at `path` (retrying until it accepts, within
    /// `timeout`) and serves it.
    pub fn connect(path: &Path, timeout: Duration) -> Backend {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("vhost-user: cannot connect to {}: {e}", path.display())
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&log);
        let thread = thread::spawn(move || serve(stream, &shared));
        Backend {
            log,
            thread: Some(thread),
        }
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<Message> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // The thread ends when QEMU closes its end; a test that leaves QEMU running must not
        // wait for it.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes, collecting fds; `None` at EOF.
fn read_full(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Option<()> {
    let mut at = 0;
    while at < buf.len() {
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf[at..])];
        let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        };
        if msg.bytes == 0 {
            return None;
        }
        for cmsg in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these fds in this process for this message;
                // nothing else knows their numbers, so each is owned exactly once here.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        at += msg.bytes;
    }
    Some(())
}

fn serve(mut stream: UnixStream, log: &Mutex<Vec<Message>>) {
    use std::io::Write;
    let fd = stream.as_raw_fd();
    loop {
        let mut fds = Vec::new();
        let mut header = [0u8; 12];
        if read_full(fd, &mut header, &mut fds).is_none() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        let mut payload = vec![0u8; size.min(1 << 16)];
        if read_full(fd, &mut payload, &mut fds).is_none() {
            return;
        }
        let first = payload
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let says_fd = request == SET_VRING_CALL && first.is_some_and(|v| v & NOFD == 0);
        log.lock().unwrap_or_else(|e| e.into_inner()).push(Message {
            request,
            fds: fds.len(),
            says_fd,
        });
        let answer: Option<u64> = match request {
            GET_FEATURES => Some(FEATURES),
            GET_PROTOCOL_FEATURES => Some(0),
            GET_QUEUE_NUM => Some(1),
            GET_VRING_BASE => Some(first.unwrap_or(0) & 0xff_ffff_ffff),
            _ if flags & NEED_REPLY != 0 => Some(0),
            _ => None,
        };
        if let Some(value) = answer {
            let mut reply = Vec::with_capacity(20);
            reply.extend_from_slice(&request.to_le_bytes());
            reply.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&value.to_le_bytes());
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}
