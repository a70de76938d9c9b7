//! Tiny protocol clients for what a VM serves on TCP: a VNC viewer's RFB handshake, a SPICE
//! client's link handshake, and a line-at-a-time QMP client; plus free loopback ports.
//!
//! Each does just enough of its protocol to prove a real server answered on the port, and
//! fails with a message instead of hanging (every read has a deadline).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one handshake may take. Generous: QEMU runs under TCG on a shared machine.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// What a VNC server said in its `ServerInit` (RFC 6143, 7.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width.
    pub width: u16,
    /// Framebuffer height.
    pub height: u16,
    /// The desktop name (QEMU's `-name`, or "QEMU").
    pub name: String,
}

/// Connects to `addr` as a VNC viewer: protocol version 3.8, security type None, a shared
/// `ClientInit`, and returns the `ServerInit`. Fails if the server offers no None security
/// (a password was set) or says anything that is not RFB.
pub fn rfb_handshake(addr: SocketAddr) -> io::Result<ServerInit> {
    rfb_login(addr, None)
}

/// [`rfb_handshake`] with VNC authentication (security type 2) when `password` is given: the
/// server's challenge answered with DES ([`crate::des`]). A refused password is an error of
/// kind `PermissionDenied`.
pub fn rfb_login(addr: SocketAddr, password: Option<&str>) -> io::Result<ServerInit> {
    let mut s = connect(addr)?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version)?;
    if !version.starts_with(b"RFB 003.") {
        return Err(bad(format!("not an RFB server: {version:?}")));
    }
    s.write_all(b"RFB 003.008\n")?;
    let mut count = [0u8; 1];
    s.read_exact(&mut count)?;
    let mut types = vec![0u8; usize::from(count[0])];
    s.read_exact(&mut types)?;
    let wanted = if password.is_some() { 2 } else { 1 };
    if !types.contains(&wanted) {
        return Err(bad(format!(
            "security type {wanted} not offered: {types:?}"
        )));
    }
    s.write_all(&[wanted])?;
    if let Some(password) = password {
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge)?;
        s.write_all(&crate::des::vnc_response(password, &challenge))?;
    }
    let mut result = [0u8; 4];
    s.read_exact(&mut result)?;
    if result != [0; 4] {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("security handshake failed: {result:?}"),
        ));
    }
    s.write_all(&[1])?;
    let mut init = [0u8; 24];
    s.read_exact(&mut init)?;
    let len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    let mut name = vec![0u8; len.min(4096)];
    s.read_exact(&mut name)?;
    Ok(ServerInit {
        width: u16::from_be_bytes([init[0], init[1]]),
        height: u16::from_be_bytes([init[2], init[3]]),
        name: String::from_utf8_lossy(&name).into_owned(),
    })
}

/// SPICE's link stage (spice-protocol `protocol.h`): `SpiceLinkHeader` (magic `REDQ`,
/// protocol 2.2, size) and `SpiceLinkMess` for the main channel with no capabilities. Returns
/// the error code of the server's `SpiceLinkReply`: 0 (`SPICE_LINK_ERR_OK`) when it takes
/// the client, which it does only when ticketing is off or a password was set.
pub fn spice_link(addr: SocketAddr) -> io::Result<u32> {
    let mut s = connect(addr)?;
    // connection_id, channel_type (1 = main), channel_id, num_common_caps, num_channel_caps,
    // caps_offset: 18 bytes, little-endian.
    let mut mess = Vec::with_capacity(18);
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.extend_from_slice(&[1, 0]);
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.extend_from_slice(&18u32.to_le_bytes());
    let mut link = b"REDQ".to_vec();
    link.extend_from_slice(&2u32.to_le_bytes());
    link.extend_from_slice(&2u32.to_le_bytes());
    link.extend_from_slice(&(mess.len() as u32).to_le_bytes());
    link.extend_from_slice(&mess);
    s.write_all(&link)?;
    let mut header = [0u8; 16];
    s.read_exact(&mut header)?;
    if &header[..4] != b"REDQ" {
        return Err(bad(format!("not a SPICE server: {header:?}")));
    }
    let size = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if size < 4 {
        return Err(bad(format!("SpiceLinkReply of {size} bytes")));
    }
    let mut reply = vec![0u8; size.min(4096)];
    s.read_exact(&mut reply)?;
    Ok(u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]))
}

/// A loopback TCP port nothing listens on now. Another process may take it before the
/// caller binds it; tests that use one fail loudly if that happens.
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A VNC display number N in 40..100 whose port 5900 + N is free on loopback now, tried from
/// a start that varies with the process and the call, so that tests running at once (in one
/// process or several) pick different ones.
pub fn free_vnc_display() -> u16 {
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(7, std::sync::atomic::Ordering::Relaxed);
    let start = ((std::process::id() as u16) % 60).wrapping_add(call) % 60;
    for i in 0..60 {
        let n = 40 + (start + i) % 60;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, 5900 + n)).is_ok() {
            return n;
        }
    }
    panic!("no free VNC display between :40 and :99 on 127.0.0.1");
}

/// A QMP client over TCP, as a script talks to `-qmp tcp:HOST:PORT,server=on`: one command at
/// a time, events skipped.
pub struct TcpQmp {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
    /// The greeting's `QMP.version`.
    pub version: Value,
}

impl TcpQmp {
    /// Connects (retrying until the port accepts, within `timeout`), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> TcpQmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("cannot connect to QMP on {addr} within {timeout:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut qmp = TcpQmp {
            writer: stream,
            reader,
            next_id: 1,
            version: Value::Null,
        };
        let greeting = qmp.read().expect("QMP greeting");
        qmp.version = greeting["QMP"]["version"].clone();
        assert!(!qmp.version.is_null(), "not a QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        qmp
    }

    fn read(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(|e| bad(format!("{e}: {line:?}")))
    }

    /// Runs `cmd` and returns its `return`, or its `error` as an `Err`. I/O failures (the
    /// connection broke) are `Err` too, as text.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": cmd, "arguments": args, "id": id});
        let io = |e: io::Error| json!(format!("QMP connection: {e}"));
        writeln!(self.writer, "{msg}").map_err(io)?;
        loop {
            let reply = self.read().map_err(io)?;
            if reply.get("event").is_some() || reply["id"] != id {
                continue;
            }
            return match reply.get("error") {
                Some(e) => Err(e.clone()),
                None => Ok(reply["return"].clone()),
            };
        }
    }
}
