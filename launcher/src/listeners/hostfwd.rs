//! User-mode networking's host forwards (`-netdev user,hostfwd=tcp::2222-:22`), across an
//! upgrade.
//!
//! libslirp binds each forward's host port inside QEMU and owns every connection through it;
//! it has no way to take a listening or accepted socket from outside, and its migration state
//! carries none of them (`slirp_state_save` writes guestfwd sockets only). So the launcher
//! cannot hold the port the way it holds monitors and displays. Instead every generation
//! after the first starts without the forwards, which it could not bind while the old QEMU
//! holds them, and gets them with HMP `hostfwd_add` (7.2 and 10.0 alike) once the old QEMU
//! has exited and its ports are free ([`super::handoff`]).
//!
//! What a user sees, which `plan` says before anything is tried ([`caveats`]): connections
//! open through a forward when the guest moves are reset on both ends (the host side belonged
//! to the old QEMU, and the new QEMU's slirp has no record of them, so it answers the guest's
//! next segment with RST), and a connection attempt in the few milliseconds between the old
//! QEMU's exit and the forward's return is refused.

use serde_json::Value;

use super::{Blocker, Caveat};
use crate::cmdline::{CmdLine, Item, Opt, OptArg};

/// One forward, as `hostfwd_add` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The user-mode netdev's id, when it has one; `None` means QEMU's first (and only) one.
    pub netdev: Option<String>,
    /// The rule as written: `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
    pub rule: String,
}

impl Forward {
    /// The HMP command line that adds it.
    pub fn hmp(&self) -> String {
        match &self.netdev {
            Some(id) => format!("hostfwd_add {id} {}", self.rule),
            None => format!("hostfwd_add {}", self.rule),
        }
    }
}

/// Whether an option creates a user-mode stack (`-netdev user`, `-nic user`, `-net user`).
fn user_stack(opt: &Opt) -> Option<OptArg> {
    if !matches!(opt.name.as_str(), "netdev" | "nic" | "net") {
        return None;
    }
    let arg = opt.parse_arg()?;
    (arg.get("type").as_deref() == Some("user")).then_some(arg)
}

/// Every `hostfwd` value of one option, in order: repeated keys in `key=value` syntax, a list
/// of `{"str": ...}` in JSON.
fn rules_of(arg: &OptArg) -> Vec<String> {
    match arg {
        OptArg::KeyVal(kv) => kv
            .elements()
            .filter_map(|e| match e {
                crate::cmdline::keyval::Element::Pair("hostfwd", v) => Some(v.to_owned()),
                _ => None,
            })
            .collect(),
        OptArg::Json(map) => map
            .get("hostfwd")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|f| f.get("str").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The forwards of `cmd`, each with the netdev `hostfwd_add` must name. With more than one
/// user-mode stack a forward needs its stack's id; one without is left out (see [`blockers`]).
pub fn find(cmd: &CmdLine) -> Vec<Forward> {
    let stacks: Vec<OptArg> = cmd
        .items
        .iter()
        .filter_map(|it| match it {
            Item::Opt(o) => user_stack(o),
            Item::Positional(_) => None,
        })
        .collect();
    let single = stacks.len() == 1;
    let mut out = Vec::new();
    for arg in &stacks {
        let id = arg.get("id").or_else(|| arg.get("name"));
        if id.is_none() && !single {
            continue;
        }
        let netdev = if single { None } else { id };
        out.extend(rules_of(arg).into_iter().map(|rule| Forward {
            netdev: netdev.clone(),
            rule,
        }));
    }
    out
}

/// Drops every forward from `cmd`, for a generation started while another holds the ports.
pub fn strip(cmd: &mut CmdLine) {
    for it in cmd.items.iter_mut() {
        let Item::Opt(opt) = it else { continue };
        let Some(mut arg) = user_stack(opt) else {
            continue;
        };
        if arg.remove("hostfwd").is_some() {
            opt.set_arg(&arg);
        }
    }
}

/// Forwards that cannot be added again by name.
pub fn blockers(cmd: &CmdLine) -> Vec<Blocker> {
    let stacks: Vec<(&Opt, OptArg)> = cmd
        .items
        .iter()
        .filter_map(|it| match it {
            Item::Opt(o) => user_stack(o).map(|a| (o, a)),
            Item::Positional(_) => None,
        })
        .collect();
    if stacks.len() < 2 {
        return Vec::new();
    }
    stacks
        .iter()
        .filter(|(_, a)| a.get("id").or_else(|| a.get("name")).is_none() && !rules_of(a).is_empty())
        .map(|(opt, _)| {
            Blocker::about(
                opt,
                "hostfwd on one of several user-mode networks without an id=: the next QEMU \
                 gets a forward by its network's id (hostfwd_add ID RULE)",
            )
        })
        .collect()
}

/// What happens to each forward's connections during an upgrade.
pub fn caveats(cmd: &CmdLine) -> Vec<Caveat> {
    find(cmd)
        .into_iter()
        .map(|f| {
            Caveat::new(
                format!("hostfwd={}", f.rule),
                "the new QEMU gets this forward (hostfwd_add) once the old one has exited: \
                 connections open through it during the upgrade are reset, and one attempted \
                 in the few milliseconds between is refused",
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::{parse, strings};

    #[test]
    fn a_script_vms_forward_is_stripped_and_added_back_by_rule() {
        let mut cmd = parse(&[
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]);
        let f = find(&cmd);
        assert_eq!(
            f.iter().map(Forward::hmp).collect::<Vec<_>>(),
            [
                "hostfwd_add tcp::2222-:22",
                "hostfwd_add udp:127.0.0.1:5353-:53"
            ]
        );
        assert!(blockers(&cmd).is_empty());
        assert_eq!(caveats(&cmd).len(), 2);
        strip(&mut cmd);
        assert_eq!(strings(&cmd)[1], "user,id=n0");
    }

    #[test]
    fn several_stacks_name_theirs_and_json_lists_work() {
        let cmd = parse(&[
            "-netdev",
            r#"{"type":"user","id":"a","hostfwd":[{"str":"tcp::80-:8080"}]}"#,
            "-nic",
            "user,hostfwd=tcp::81-:81",
        ]);
        assert_eq!(find(&cmd)[0].hmp(), "hostfwd_add a tcp::80-:8080");
        assert_eq!(find(&cmd).len(), 1);
        assert_eq!(blockers(&cmd).len(), 1);
        let mut stripped = cmd.clone();
        strip(&mut stripped);
        assert_eq!(strings(&stripped)[1], r#"{"type":"user","id":"a"}"#);
    }
}
