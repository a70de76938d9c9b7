//! The guest's TCP echo service (port 7): a single round trip, or an [`EchoSession`] that
//! keeps one connection busy in the background for as long as a test runs.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::unix_now;

/// Sends `payload` on an echo connection and checks the same bytes come back.
pub fn echo_round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Duration> {
    let start = Instant::now();
    stream.write_all(payload)?;
    let mut back = vec![0; payload.len()];
    stream.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo returned {:?} for {:?}",
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(payload)
            ),
        ));
    }
    Ok(start.elapsed())
}

/// How long the receiver waits for an echo that is due before it calls the session broken.
const STALL: Duration = Duration::from_secs(15);

/// One TCP connection to the echo service, used by two threads: a sender that writes the
/// numbered line `seq <n>` every `period` whatever came back, and a receiver that checks
/// every echo comes back whole, once, in order. A broken connection, a lost, repeated or
/// reordered line, or an echo overdue by [`STALL`] ends the session with an error.
pub struct EchoSession {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    sender: JoinHandle<(Vec<f64>, Option<String>)>,
    receiver: JoinHandle<(Vec<f64>, Option<String>)>,
}

/// What an [`EchoSession`] saw.
#[derive(Clone, Debug, Default)]
pub struct EchoLog {
    /// Unix time line n went out, by n.
    pub sent_at: Vec<f64>,
    /// Unix time the echo of line n came back, by n.
    pub echoed_at: Vec<f64>,
    /// What broke the session, if anything did.
    pub error: Option<String>,
}

impl EchoLog {
    /// The lines sent within `[from, to]` (unix times), and the longest round trip among
    /// them in seconds (an unanswered one counts until the last echo).
    pub fn during(&self, from: f64, to: f64) -> (usize, f64) {
        let last = self.echoed_at.last().copied().unwrap_or(to);
        let mut n = 0;
        let mut longest: f64 = 0.0;
        for (i, &sent) in self.sent_at.iter().enumerate() {
            if sent < from || sent > to {
                continue;
            }
            n += 1;
            let back = self.echoed_at.get(i).copied().unwrap_or(last);
            longest = longest.max(back - sent);
        }
        (n, longest)
    }
}

impl EchoSession {
    /// Starts the two threads on `stream`, a connection to the echo service with nothing in
    /// flight.
    pub fn start(stream: TcpStream, period: Duration) -> EchoSession {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let sending = Arc::new(AtomicBool::new(true));
        let mut tx = stream.try_clone().expect("dup echo socket");
        let rx = stream.try_clone().expect("dup echo socket");
        // Short, so the receiver notices the end of the session; SO_RCVTIMEO is the socket's,
        // shared by every fd on it, and `stop` puts back what the caller had.
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("SO_RCVTIMEO");
        let sender = {
            let (stop, sent, sending) =
                (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&sending));
            thread::spawn(move || {
                let mut times = Vec::new();
                let mut error = None;
                while !stop.load(Ordering::Relaxed) {
                    let at = unix_now();
                    if let Err(e) = tx.write_all(line(times.len()).as_bytes()) {
                        error = Some(format!("sending line {}: {e}", times.len()));
                        break;
                    }
                    times.push(at);
                    sent.store(times.len(), Ordering::Release);
                    thread::sleep(period);
                }
                sending.store(false, Ordering::Release);
                (times, error)
            })
        };
        let receiver = thread::spawn(move || receive(rx, &sent, &sending));
        EchoSession {
            stream,
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending, waits for the echoes still due, and returns the connection (with the
    /// read timeout `read_timeout`) and what was seen.
    pub fn stop(self, read_timeout: Duration) -> (TcpStream, EchoLog) {
        self.stop.store(true, Ordering::Relaxed);
        let (sent_at, send_error) = self.sender.join().expect("echo sender panicked");
        let (echoed_at, receive_error) = self.receiver.join().expect("echo receiver panicked");
        self.stream
            .set_read_timeout(Some(read_timeout))
            .expect("SO_RCVTIMEO");
        let error = match (send_error, receive_error) {
            (None, None) => None,
            (a, b) => Some([a, b].into_iter().flatten().collect::<Vec<_>>().join("; ")),
        };
        let log = EchoLog {
            sent_at,
            echoed_at,
            error,
        };
        (self.stream, log)
    }
}

fn line(n: usize) -> String {
    format!("seq {n:06}\n")
}

/// The receiver: reads echoes until the sender has stopped and every line it sent is back.
fn receive(
    stream: TcpStream,
    sent: &AtomicUsize,
    sending: &AtomicBool,
) -> (Vec<f64>, Option<String>) {
    let mut reader = BufReader::new(stream);
    let mut times = Vec::new();
    // Persistent: a read that times out keeps what it had of a line here.
    let mut buf = Vec::new();
    let mut progress = Instant::now();
    loop {
        let done_sending = !sending.load(Ordering::Acquire);
        let due = sent.load(Ordering::Acquire);
        if done_sending && times.len() == due {
            return (times, None);
        }
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => {
                let e = format!("the connection closed after {} echoes", times.len());
                return (times, Some(e));
            }
            Ok(_) if buf.ends_with(b"\n") => {
                let want = line(times.len());
                if buf != want.as_bytes() {
                    let e = format!(
                        "echo {:?} where {want:?} was due",
                        String::from_utf8_lossy(&buf)
                    );
                    return (times, Some(e));
                }
                times.push(unix_now());
                buf.clear();
                progress = Instant::now();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if times.len() == due {
                    progress = Instant::now();
                } else if progress.elapsed() > STALL {
                    let e = format!(
                        "no echo for {STALL:?} with lines {}..{due} due",
                        times.len()
                    );
                    return (times, Some(e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let e = format!("reading echo {}: {e}", times.len());
                return (times, Some(e));
            }
        }
    }
}
