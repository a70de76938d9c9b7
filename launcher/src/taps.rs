//! Taps named by interface (`-netdev tap,ifname=NAME`), opened once by the launcher.
//!
//! QEMU given `ifname=` opens `/dev/net/tun` itself and the tap lives as long as that fd. A
//! second QEMU opening the same name while the first holds it fails (the tap is busy), and a
//! tap that QEMU created disappears with the QEMU that quits. So the launcher opens each such
//! tap at first launch, runs the `script=` QEMU would have run, and gives every generation the
//! fd instead (`fd=N`, or `fds=` for several queues); the tap then lives as long as the VM.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

use nix::errno::Errno;

use crate::cmdline::{CmdLine, Item};

/// QEMU's default up script, run when `script=` is not given (net/tap.c).
const DEFAULT_SCRIPT: &str = "/etc/qemu-ifup";
/// QEMU's default down script.
const DEFAULT_DOWNSCRIPT: &str = "/etc/qemu-ifdown";

/// A failure opening or setting up a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened or the tap could not be attached.
    #[error("could not configure /dev/net/tun ({ifname})")]
    Open {
        /// The interface name asked for.
        ifname: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The up script failed, as QEMU reports it.
    #[error("network script {script} failed with status {status}")]
    Script {
        /// The script.
        script: String,
        /// Its exit status.
        status: String,
    },
}

/// One `-netdev tap,ifname=` the launcher opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedTap {
    /// Index of the option in the command line's items.
    item: usize,
    /// The interface name (may be a pattern such as `tap%d`).
    pub ifname: String,
    /// Queues: one fd each.
    pub queues: usize,
    vnet_hdr: bool,
    script: Option<String>,
    downscript: Option<String>,
}

/// Finds the taps given by name only (no `fd=`/`fds=`, no bridge helper).
pub fn find(cmd: &CmdLine) -> Vec<NamedTap> {
    let mut out = Vec::new();
    for (item, it) in cmd.items.iter().enumerate() {
        let Item::Opt(opt) = it else { continue };
        if opt.name != "netdev" {
            continue;
        }
        let Some(arg) = opt.parse_arg() else { continue };
        if arg.get("type").as_deref() != Some("tap")
            || arg.get("fd").is_some()
            || arg.get("fds").is_some()
        {
            continue;
        }
        if arg.get("helper").is_some() {
            continue;
        }
        let Some(ifname) = arg.get("ifname") else {
            continue;
        };
        let script = |key: &str, default: &str| match arg.get(key) {
            Some(s) if s.is_empty() || s == "no" => None,
            Some(s) => Some(s),
            None => Some(default.to_owned()),
        };
        out.push(NamedTap {
            item,
            ifname,
            queues: arg
                .get("queues")
                .and_then(|q| q.parse().ok())
                .unwrap_or(1)
                .max(1),
            vnet_hdr: arg.get("vnet_hdr").as_deref() != Some("off"),
            script: script("script", DEFAULT_SCRIPT),
            downscript: script("downscript", DEFAULT_DOWNSCRIPT),
        });
    }
    out
}

/// An opened tap: its queue fds and the name the kernel gave it.
#[derive(Debug)]
pub struct OpenTap {
    /// One fd per queue.
    pub fds: Vec<OwnedFd>,
    /// The interface name.
    pub ifname: String,
    downscript: Option<String>,
}

/// Opens `tap`'s queues and runs its up script, as QEMU would at start.
pub fn open(tap: &NamedTap) -> Result<OpenTap, TapError> {
    let fail = |source| TapError::Open {
        ifname: tap.ifname.clone(),
        source,
    };
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if tap.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    if tap.queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut fds = Vec::new();
    let mut name = tap.ifname.clone();
    for _ in 0..tap.queues {
        let path = CString::new("/dev/net/tun").unwrap_or_default();
        // SAFETY: open(2) with a valid path; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail(Errno::last()));
        }
        // SAFETY: fd was just opened and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF on a tun fd with a valid ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(fail(Errno::last()));
        }
        // The kernel resolves a `%d` pattern; later queues attach to the name it chose.
        name = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        fds.push(fd);
    }
    if let Some(script) = &tap.script {
        let status = Command::new(script)
            .arg(&name)
            .status()
            .map_err(|e| TapError::Script {
                script: script.clone(),
                status: e.to_string(),
            })?;
        if !status.success() {
            return Err(TapError::Script {
                script: script.clone(),
                status: status.to_string(),
            });
        }
    }
    Ok(OpenTap {
        fds,
        ifname: name,
        downscript: tap.downscript.clone(),
    })
}

impl OpenTap {
    /// Its part of a supervisor handover's state ([`crate::handover`]).
    pub(crate) fn export(&self) -> crate::handover::state::Tap {
        crate::handover::state::Tap {
            fds: self
                .fds
                .iter()
                .map(crate::handover::state::Fd::of)
                .collect(),
            ifname: self.ifname.clone(),
            downscript: self.downscript.clone(),
        }
    }

    /// The tap a handover brought, with its queues `fds`.
    pub(crate) fn import(s: &crate::handover::state::Tap, fds: Vec<OwnedFd>) -> OpenTap {
        OpenTap {
            fds,
            ifname: s.ifname.clone(),
            downscript: s.downscript.clone(),
        }
    }

    /// Runs the down script, as QEMU does when it closes the tap.
    pub fn close(self) {
        if let Some(script) = &self.downscript {
            let _ = Command::new(script).arg(&self.ifname).status();
        }
    }
}

/// Points each named tap at the fds placed at `numbers` (one per queue, in order).
pub fn rewrite(cmd: &CmdLine, taps: &[NamedTap], numbers: &[RawFd]) -> CmdLine {
    let mut out = cmd.clone();
    let mut next = numbers.iter();
    for tap in taps {
        let fds: Vec<String> = next
            .by_ref()
            .take(tap.queues)
            .map(|n| n.to_string())
            .collect();
        let Some(Item::Opt(opt)) = out.items.get_mut(tap.item) else {
            continue;
        };
        let Some(mut arg) = opt.parse_arg() else {
            continue;
        };
        // QEMU refuses these next to fd=; the launcher did what they asked.
        for key in ["ifname", "script", "downscript", "queues", "vnet_hdr"] {
            arg.remove(key);
        }
        if let [fd] = fds.as_slice() {
            arg.set("fd", fd);
        } else {
            arg.set("fds", &fds.join(":"));
        }
        opt.set_arg(&arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::parse;

    #[test]
    fn named_taps_become_fds() {
        let cmd = parse(&[
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on",
            "-netdev",
            "tap,id=n1,ifname=mq%d,queues=2,script=/etc/up",
            "-netdev",
            "tap,id=n2,fd=7",
            "-netdev",
            r#"{"type":"tap","id":"n3","ifname":"tap3","script":"no","downscript":"no"}"#,
        ]);
        let taps = find(&cmd);
        assert_eq!(
            taps.iter()
                .map(|t| (t.ifname.as_str(), t.queues))
                .collect::<Vec<_>>(),
            [("tap0", 1), ("mq%d", 2), ("tap3", 1)]
        );
        assert_eq!(taps[0].script, None);
        assert_eq!(taps[1].script.as_deref(), Some("/etc/up"));
        assert_eq!(taps[1].downscript.as_deref(), Some(DEFAULT_DOWNSCRIPT));
        let out: Vec<String> = rewrite(&cmd, &taps, &[20, 21, 22, 23])
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(out[1], "tap,id=n0,vhost=on,fd=20");
        assert_eq!(out[3], "tap,id=n1,fds=21:22");
        assert_eq!(out[5], "tap,id=n2,fd=7");
        let json: serde_json::Value = serde_json::from_str(&out[7]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "tap", "id": "n3", "fd": "23"})
        );
    }
}
