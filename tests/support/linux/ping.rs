//! iputils `ping` from inside a test's network namespace, and what its output says about each
//! request: when it went out, whether and when it was answered.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::Vm;

/// One reply line of `ping -D`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingReply {
    /// `icmp_seq`.
    pub seq: u64,
    /// Unix time ping read the reply.
    pub received_at: f64,
    /// Round-trip time, seconds.
    pub rtt: f64,
}

impl PingReply {
    /// Unix time the request went out.
    pub fn sent_at(&self) -> f64 {
        self.received_at - self.rtt
    }
}

/// What `ping -D` printed: the summary and every reply.
#[derive(Clone, Debug, Default)]
pub struct PingReport {
    /// Requests sent, from the summary.
    pub transmitted: u64,
    /// Distinct replies, from the summary.
    pub received: u64,
    /// Duplicate replies (`DUP!`).
    pub duplicates: u64,
    /// Every reply line, duplicates included.
    pub replies: Vec<PingReply>,
}

impl PingReport {
    /// Parses iputils `ping -n -D` output.
    pub fn parse(text: &str) -> PingReport {
        let mut r = PingReport::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let Some((ts, rest)) = rest.split_once(']') else {
                    continue;
                };
                let field = |name: &str| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.parse::<f64>().ok())
                };
                if let (Ok(received_at), Some(seq), Some(rtt_ms)) =
                    (ts.parse(), field("icmp_seq="), field("time="))
                {
                    r.replies.push(PingReply {
                        seq: seq as u64,
                        received_at,
                        rtt: rtt_ms / 1000.0,
                    });
                    if rest.contains("DUP!") {
                        r.duplicates += 1;
                    }
                }
            } else if line.contains("packets transmitted") {
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if nums.len() >= 2 {
                    r.transmitted = nums[0];
                    r.received = nums[1];
                }
            }
        }
        r
    }

    /// Requests with no reply, among those sent before the last reply came: the ones still
    /// in flight when ping was stopped are not counted as lost.
    pub fn lost(&self) -> Vec<u64> {
        let mut seen: Vec<u64> = self.replies.iter().map(|r| r.seq).collect();
        seen.sort_unstable();
        seen.dedup();
        let Some(&last) = seen.last() else {
            return Vec::new();
        };
        // iputils numbers from 1.
        (1..=last)
            .filter(|s| seen.binary_search(s).is_err())
            .collect()
    }

    /// When the last answered request before `seq` went out: a lost request `seq` went out
    /// `seq - that` intervals later.
    pub fn answered_before(&self, seq: u64) -> Option<PingReply> {
        self.replies
            .iter()
            .filter(|r| r.seq < seq)
            .max_by_key(|r| r.seq)
            .copied()
    }

    /// Every request up to the last one answered (those still in flight when ping stopped
    /// are not counted), in order, with when it went out. An answered request's time comes
    /// from its reply (`-D` stamp minus round trip); an unanswered one's is interpolated
    /// between the answered requests around it, or, before the first answer, counted back
    /// from it by `interval`.
    pub fn requests(&self, interval: Duration) -> Vec<PingRequest> {
        let mut answered: Vec<PingReply> = Vec::new();
        for r in &self.replies {
            // The first reply to a sequence number; a duplicate says nothing new.
            if !answered.iter().any(|a| a.seq == r.seq) {
                answered.push(*r);
            }
        }
        answered.sort_by_key(|r| r.seq);
        let Some(last) = answered.last().map(|r| r.seq) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(last as usize);
        let mut next = 0; // index into `answered` of the first reply with seq >= the current
        for seq in 1..=last {
            while answered[next].seq < seq {
                next += 1;
            }
            let here = answered[next];
            if here.seq == seq {
                out.push(PingRequest {
                    seq,
                    sent_at: here.sent_at(),
                    rtt: Some(here.rtt),
                });
                continue;
            }
            let sent_at = match next.checked_sub(1).map(|i| answered[i]) {
                Some(before) => {
                    let step = (here.sent_at() - before.sent_at()) / (here.seq - before.seq) as f64;
                    before.sent_at() + step * (seq - before.seq) as f64
                }
                None => here.sent_at() - interval.as_secs_f64() * (here.seq - seq) as f64,
            };
            out.push(PingRequest {
                seq,
                sent_at,
                rtt: None,
            });
        }
        out
    }
}

/// One echo request of a [`PingReport`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingRequest {
    /// `icmp_seq`.
    pub seq: u64,
    /// Unix time it went out (estimated when unanswered, see [`PingReport::requests`]).
    pub sent_at: f64,
    /// Round trip of its first reply, seconds; `None`: lost.
    pub rtt: Option<f64>,
}

/// A `ping` running in a namespace, in its own process group.
pub struct Pinger {
    vm: Vm,
}

impl Pinger {
    /// Runs `cmd`, a `ping -n -D ...` command line.
    pub(super) fn spawn(cmd: std::process::Command) -> Pinger {
        Pinger { vm: Vm::spawn(cmd) }
    }

    /// Stops ping with SIGINT (it prints its summary then) and returns what it reported.
    pub fn stop(mut self) -> PingReport {
        self.vm.signal(Signal::SIGINT);
        self.vm.wait_exit(Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        // The reader thread may still be taking in the summary after the exit.
        while !self.vm.stdout_text().contains("packets transmitted") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        PingReport::parse(&self.vm.stdout_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let text = "PING 192.168.77.2 (192.168.77.2) 56(84) bytes of data.\n\
            [1700000000.100000] 64 bytes from 192.168.77.2: icmp_seq=1 ttl=64 time=0.5 ms\n\
            [1700000000.110000] 64 bytes from 192.168.77.2: icmp_seq=2 ttl=64 time=0.5 ms\n\
            [1700000000.140000] 64 bytes from 192.168.77.2: icmp_seq=5 ttl=64 time=0.5 ms\n\
            [1700000000.141000] 64 bytes from 192.168.77.2: icmp_seq=5 ttl=64 time=0.6 ms (DUP!)\n\
            \n--- 192.168.77.2 ping statistics ---\n\
            6 packets transmitted, 3 received, +1 duplicates, 50% packet loss, time 50ms\n";
        let r = PingReport::parse(text);
        assert_eq!((r.transmitted, r.received, r.duplicates), (6, 3, 1));
        assert_eq!(r.lost(), [3, 4]);
        let before = r.answered_before(4).unwrap();
        assert_eq!(before.seq, 2);
        assert!((before.sent_at() - 1700000000.1095).abs() < 1e-6);

        let reqs = r.requests(Duration::from_millis(10));
        let seqs: Vec<(u64, bool)> = reqs.iter().map(|q| (q.seq, q.rtt.is_some())).collect();
        assert_eq!(
            seqs,
            [(1, true), (2, true), (3, false), (4, false), (5, true)]
        );
        // 2 went out at .1095 and 5 at .1395: 3 and 4 a third of the way each.
        assert!((reqs[2].sent_at - 1700000000.1195).abs() < 1e-6);
        assert!((reqs[3].sent_at - 1700000000.1295).abs() < 1e-6);
    }
}
