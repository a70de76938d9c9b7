//! What the supervisor's loop can be woken by: one typed token per kind of source.
//!
//! Every `mio::Token` value decodes to exactly one [`Token`], unknown ones included, and no
//! two sources can share a value however many generations, clients or relays come and go: the
//! kind sits in the low bits and the index above it, so no kind's range can run into the
//! next. The proxy allocates its own tokens, every value from [`Token::PROXY_BASE`] up.

/// One source of events in the supervisor's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// A signal arrived (the self-pipe of `signal-hook-mio`).
    Signals,
    /// The control socket's listener.
    Control,
    /// A control client, by slot.
    ControlClient(usize),
    /// QEMU's stdout (0) or stderr (1) copied on, when daemonized.
    Output(usize),
    /// A generation's stderr, copied on and kept for reports, by generation number.
    Stderr(u32),
    /// A generation's exec-status pipe, by generation number: EOF once it executed QEMU.
    Exec(u32),
    /// A generation's private monitor, by generation number.
    Monitor(u32),
    /// A generation's tap guard, by generation number.
    TapGuard(u32),
    /// A kept pty's master or generation sockets, by pty.
    Pty(usize),
    /// The pipes of a probe asking a new binary what it accepts.
    Probe,
    /// The answer of a new launcher binary run in its handover check mode.
    Handover,
    /// The launcher's own stdout or stderr, by fd, watched for writability while output
    /// waits for it ([`crate::stdio`]).
    Stdio(usize),
    /// A request to the placer service under way ([`crate::placer::Asking`]).
    Placer,
    /// One of the proxy's sockets; the proxy routes it itself.
    Proxy,
    /// A value nothing here hands out; its events are dropped.
    Unknown(usize),
}

/// Bits below the index that say which kind a token is.
const KIND_BITS: u32 = 4;
const KIND_MASK: usize = (1 << KIND_BITS) - 1;

const SIGNALS: usize = 0;
const CONTROL: usize = 1;
const CONTROL_CLIENT: usize = 2;
const OUTPUT: usize = 3;
const STDERR: usize = 4;
const EXEC: usize = 5;
const MONITOR: usize = 6;
const TAP_GUARD: usize = 7;
const PTY: usize = 8;
const PROBE: usize = 9;
const HANDOVER: usize = 10;
const STDIO: usize = 11;
const PLACER: usize = 12;

impl Token {
    /// Tokens from here up belong to the proxy, which counts up from it.
    pub const PROXY_BASE: usize = 1 << (usize::BITS - 1);

    /// The value registered with `mio`.
    pub fn to_mio(self) -> mio::Token {
        let tagged = |kind: usize, index: usize| (index << KIND_BITS) | kind;
        mio::Token(match self {
            Token::Signals => SIGNALS,
            Token::Control => CONTROL,
            Token::ControlClient(i) => tagged(CONTROL_CLIENT, i),
            Token::Output(i) => tagged(OUTPUT, i),
            Token::Stderr(n) => tagged(STDERR, n as usize),
            Token::Exec(n) => tagged(EXEC, n as usize),
            Token::Monitor(n) => tagged(MONITOR, n as usize),
            Token::TapGuard(n) => tagged(TAP_GUARD, n as usize),
            Token::Pty(i) => tagged(PTY, i),
            Token::Probe => PROBE,
            Token::Handover => HANDOVER,
            Token::Stdio(fd) => tagged(STDIO, fd),
            Token::Placer => PLACER,
            Token::Proxy => Self::PROXY_BASE,
            Token::Unknown(v) => v,
        })
    }

    /// The token a `mio` value stands for.
    pub fn from_mio(t: mio::Token) -> Token {
        let value = t.0;
        if value >= Self::PROXY_BASE {
            return Token::Proxy;
        }
        let index = value >> KIND_BITS;
        let generation = || u32::try_from(index).ok();
        let decoded = match value & KIND_MASK {
            SIGNALS if index == 0 => Some(Token::Signals),
            CONTROL if index == 0 => Some(Token::Control),
            CONTROL_CLIENT => Some(Token::ControlClient(index)),
            OUTPUT => Some(Token::Output(index)),
            STDERR => generation().map(Token::Stderr),
            EXEC => generation().map(Token::Exec),
            MONITOR => generation().map(Token::Monitor),
            TAP_GUARD => generation().map(Token::TapGuard),
            PTY => Some(Token::Pty(index)),
            PROBE if index == 0 => Some(Token::Probe),
            HANDOVER if index == 0 => Some(Token::Handover),
            STDIO => Some(Token::Stdio(index)),
            PLACER if index == 0 => Some(Token::Placer),
            _ => None,
        };
        decoded.unwrap_or(Token::Unknown(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_round_trips() {
        let big = usize::MAX >> (KIND_BITS + 1);
        for t in [
            Token::Signals,
            Token::Control,
            Token::ControlClient(0),
            Token::ControlClient(70_000),
            Token::ControlClient(big),
            Token::Output(1),
            Token::Stderr(u32::MAX),
            Token::Exec(2),
            Token::Monitor(1),
            Token::TapGuard(65_000),
            Token::Pty(3),
            Token::Probe,
            Token::Handover,
            Token::Stdio(2),
            Token::Placer,
        ] {
            assert_eq!(Token::from_mio(t.to_mio()), t, "{t:?}");
        }
    }

    #[test]
    fn no_two_kinds_share_a_value() {
        let mut seen = std::collections::HashMap::new();
        for i in 0..5000usize {
            let n = i as u32;
            for t in [
                Token::ControlClient(i),
                Token::Output(i),
                Token::Stderr(n),
                Token::Exec(n),
                Token::Monitor(n),
                Token::TapGuard(n),
                Token::Pty(i),
                Token::Stdio(i),
            ] {
                if let Some(other) = seen.insert(t.to_mio(), t) {
                    panic!("{t:?} and {other:?} share {:?}", t.to_mio());
                }
            }
        }
    }

    #[test]
    fn every_value_decodes() {
        for v in (0..4096).chain([usize::MAX, Token::PROXY_BASE - 1, Token::PROXY_BASE]) {
            let t = Token::from_mio(mio::Token(v));
            match t {
                Token::Unknown(u) => assert_eq!(u, v),
                Token::Proxy => assert!(v >= Token::PROXY_BASE),
                t => assert_eq!(t.to_mio().0, v, "{t:?}"),
            }
        }
        assert_eq!(Token::from_mio(mio::Token(16)), Token::Unknown(16));
        assert_eq!(Token::from_mio(mio::Token(15)), Token::Unknown(15));
    }
}
