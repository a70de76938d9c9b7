//! Which monitors and socket chardevs the launcher serves itself, and the command-line
//! rewrite that points each QEMU generation at the launcher instead.
//!
//! A client connected to QEMU's own listening socket would see EOF when that QEMU is replaced,
//! and libvirt treats monitor EOF as a crash; a TCP port cannot even be bound by the next QEMU
//! while the old one holds it. So for every socket server on the command line (`-qmp unix:`,
//! `-qmp tcp:`, `-monitor`, `-serial`, `-parallel` with `unix:`, `tcp:` or `telnet:`,
//! `-chardev socket,path=` or `host=,port=`, and libvirt's `-chardev socket,fd=N,server=on`)
//! the launcher listens on the user's path, port or fd, and each generation gets a private
//! listening unix socket of its own in its place (see [`crate::proxy`]).
//!
//! Left to QEMU, and named by [`crate::listeners::blockers`]: sockets whose bytes are not the
//! chardev's alone to relay. A vhost-user chardev carries the guest's memory and vring fds
//! with SCM_RIGHTS and belongs to the backend's session with that QEMU; a `tls-creds` or
//! `websocket` chardev, or `tn3270`, has a session layer QEMU speaks on each connection, which
//! a new generation would start again in the middle of the client's stream.
//!
//! File chardevs and chardev logs are appended to by every generation after the first, which
//! QEMU would otherwise truncate when it opens them: an upgrade must not wipe a console log.

use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::cmdline::{CmdLine, Item, OptArg};
use crate::listeners::inet::{self, Endpoint};
use crate::proxy::Mode;

/// Where a proxied socket's clients connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// A path the launcher binds.
    Path(PathBuf),
    /// A listening socket inherited at this fd number.
    Fd(RawFd),
    /// A TCP address the launcher binds.
    Tcp(Endpoint),
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Path(p) => write!(f, "unix:{}", p.display()),
            ListenOn::Fd(fd) => write!(f, "fd:{fd}"),
            ListenOn::Tcp(ep) => ep.fmt(f),
        }
    }
}

/// One socket server the launcher serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    /// Where clients connect.
    pub listen: ListenOn,
    /// What it carries.
    pub mode: Mode,
    /// Whether QEMU was asked to wait for the first client before starting (`wait=on`, the
    /// default for a server). Only the first generation keeps it; later ones never wait.
    pub wait: bool,
    /// A legacy `telnet:` server: each generation keeps speaking telnet on it.
    telnet: bool,
    /// Index of the option in the command line's items.
    item: usize,
    /// The chardev id, when the option is a `-chardev`.
    chardev: Option<String>,
}

/// Finds every socket server the launcher will serve.
pub fn find(cmd: &CmdLine) -> Vec<Proxied> {
    let vhost_user = vhost_user_chardevs(cmd);
    let mut found = Vec::new();
    for (item, it) in cmd.items.iter().enumerate() {
        let Item::Opt(opt) = it else { continue };
        let Some(arg) = opt.parse_arg() else { continue };
        let legacy_mode = match opt.name.as_str() {
            "qmp" | "qmp-pretty" => Some(Mode::Qmp),
            "monitor" => Some(Mode::Hmp),
            "serial" | "parallel" => Some(Mode::Raw),
            _ => None,
        };
        if let Some(mode) = legacy_mode {
            let Some((listen, telnet)) = arg.get("dev").and_then(|d| legacy_listen(&d, &arg))
            else {
                continue;
            };
            if !is_on(&arg, "server") || !servable(&arg) {
                continue;
            }
            found.push(Proxied {
                listen,
                mode,
                wait: waits(&arg),
                telnet,
                item,
                chardev: None,
            });
            continue;
        }
        if opt.name != "chardev" || arg.is_json() {
            continue;
        }
        if arg.get("backend").as_deref() != Some("socket")
            || !is_on(&arg, "server")
            || !servable(&arg)
        {
            continue;
        }
        let Some(id) = arg.get("id") else { continue };
        if vhost_user.contains(&id) {
            continue;
        }
        let listen = match (arg.get("path"), arg.get("fd").and_then(|f| f.parse().ok())) {
            (Some(p), _) => ListenOn::Path(PathBuf::from(p)),
            (None, Some(fd)) => ListenOn::Fd(fd),
            (None, None) => match tcp_endpoint(&arg, arg.get("host"), arg.get("port")) {
                Some(ep) => ListenOn::Tcp(ep),
                None => continue,
            },
        };
        found.push(Proxied {
            listen,
            mode: chardev_mode(cmd, &id),
            wait: waits(&arg),
            telnet: false,
            item,
            chardev: Some(id),
        });
    }
    found
}

/// The socket of a legacy chardev string the launcher can serve, and whether it is `telnet:`.
fn legacy_listen(dev: &str, arg: &OptArg) -> Option<(ListenOn, bool)> {
    if let Some(path) = dev.strip_prefix("unix:") {
        return Some((ListenOn::Path(PathBuf::from(path)), false));
    }
    let (rest, telnet) = match dev.strip_prefix("tcp:") {
        Some(rest) => (rest, false),
        None => (dev.strip_prefix("telnet:")?, true),
    };
    let (host, port) = inet::split_host_port(rest)?;
    Some((
        ListenOn::Tcp(tcp_endpoint(arg, Some(host), Some(port))?),
        telnet,
    ))
}

/// A TCP server address from `host`, `port` and the options that shape binding. A port QEMU
/// would look up as a service name stays QEMU's.
fn tcp_endpoint(arg: &OptArg, host: Option<String>, port: Option<String>) -> Option<Endpoint> {
    let port = inet::parse_port(&port?)?;
    let to = match arg.get("to") {
        Some(to) => Some(inet::parse_port(&to)?),
        None => None,
    };
    Some(Endpoint {
        host: host.unwrap_or_default(),
        port,
        to,
        ipv4: arg.get_bool("ipv4"),
        ipv6: arg.get_bool("ipv6"),
    })
}

/// Whether a socket server's bytes are the chardev's alone, so that the launcher may relay
/// them: no session layer of QEMU's own on each connection.
pub fn servable(arg: &OptArg) -> bool {
    let dev = arg.get("dev").unwrap_or_default();
    arg.get("tls-creds").is_none()
        && arg.get_bool("websocket") != Some(true)
        && arg.get_bool("tn3270") != Some(true)
        && !dev.starts_with("tn3270:")
        && !dev.starts_with("websocket:")
}

/// Ids of the chardevs a vhost-user backend talks on: `-netdev vhost-user,chardev=` and the
/// `chardev` of every `vhost-user-*` device.
pub fn vhost_user_chardevs(cmd: &CmdLine) -> Vec<String> {
    let netdevs = cmd
        .opts("netdev")
        .filter_map(|o| o.parse_arg())
        .filter(|a| a.get("type").as_deref() == Some("vhost-user"));
    let devices = cmd
        .opts("device")
        .filter_map(|o| o.parse_arg())
        .filter(|a| a.get("driver").is_some_and(|d| d.starts_with("vhost-user")));
    netdevs
        .chain(devices)
        .filter_map(|a| a.get("chardev"))
        .collect()
}

/// A chardev used by a `-mon` is a monitor (QMP with `mode=control`, HMP otherwise); any other
/// use (serial port, console, channel) makes it plain bytes.
fn chardev_mode(cmd: &CmdLine, id: &str) -> Mode {
    for mon in cmd.opts("mon").filter_map(|o| o.parse_arg()) {
        if mon.get("chardev").as_deref() == Some(id) {
            return match mon.get("mode").as_deref() {
                Some("control") => Mode::Qmp,
                _ => Mode::Hmp,
            };
        }
    }
    Mode::Raw
}

fn is_on(arg: &OptArg, key: &str) -> bool {
    matches!(arg.get(key).as_deref(), Some("on" | "true" | "yes" | "y"))
}

/// QEMU waits for a client when a server has no `wait=off` (`nowait` in the old spelling).
fn waits(arg: &OptArg) -> bool {
    match arg.get("wait").as_deref() {
        Some(v) => matches!(v, "on" | "true" | "yes" | "y"),
        None => arg.get("nowait").as_deref() != Some("on"),
    }
}

/// Id of the chardev the launcher adds for a legacy option at `item`.
fn legacy_id(item: usize) -> String {
    format!("qemu-liveupgrade-chr{item}")
}

/// Points each proxied server at the generation's own listening socket, placed at `fds[i]`.
/// `first` is the first generation, the only one that keeps a `wait=on`.
pub fn rewrite(cmd: &CmdLine, proxied: &[Proxied], fds: &[RawFd], first: bool) -> CmdLine {
    let mut out = cmd.clone();
    let mut added = Vec::new();
    for (p, fd) in proxied.iter().zip(fds) {
        let wait = if p.wait && first { "on" } else { "off" };
        let Some(Item::Opt(opt)) = out.items.get_mut(p.item) else {
            continue;
        };
        match &p.chardev {
            Some(_) => {
                let Some(mut arg) = opt.parse_arg() else {
                    continue;
                };
                for key in [
                    "path", "nowait", "host", "port", "to", "ipv4", "ipv6", "numeric",
                ] {
                    arg.remove(key);
                }
                arg.set("fd", &fd.to_string());
                arg.set("wait", wait);
                opt.set_arg(&arg);
            }
            None => {
                // `-qmp unix:P,server=on` becomes `-mon chardev=ID,mode=control` in place, with
                // the chardev defined at the end (QEMU creates chardevs before monitors and
                // serial ports, whatever their order).
                let id = legacy_id(p.item);
                let pretty = opt.name == "qmp-pretty";
                let (name, arg) = match opt.name.as_str() {
                    "qmp" | "qmp-pretty" => {
                        let pretty = if pretty { ",pretty=on" } else { "" };
                        ("mon", format!("chardev={id},mode=control{pretty}"))
                    }
                    "monitor" => ("mon", format!("chardev={id},mode=readline")),
                    other => (other, format!("chardev:{id}")),
                };
                opt.spelling = format!("-{name}").into();
                opt.name = name.to_owned();
                opt.arg = Some(arg.into());
                let telnet = if p.telnet { ",telnet=on" } else { "" };
                added.push(format!(
                    "socket,id={id},fd={fd},server=on,wait={wait}{telnet}"
                ));
            }
        }
    }
    for chardev in added {
        out.push("chardev", Some(&chardev));
    }
    out
}

/// Makes a later generation append to every file the first one wrote: `-chardev file` gets
/// `append=on`, a chardev `logfile=` gets `logappend=on`, and the legacy `file:PATH` of
/// `-serial`, `-parallel` and `-monitor` becomes such a chardev.
pub fn append_to_files(cmd: &mut CmdLine) {
    let mut added = Vec::new();
    for (item, it) in cmd.items.iter_mut().enumerate() {
        let Item::Opt(opt) = it else { continue };
        let Some(mut arg) = opt.parse_arg() else {
            continue;
        };
        match opt.name.as_str() {
            "chardev" if !arg.is_json() => {
                let mut changed = false;
                if arg.get("backend").as_deref() == Some("file") {
                    arg.set("append", "on");
                    changed = true;
                }
                if arg.get("logfile").is_some() {
                    arg.set("logappend", "on");
                    changed = true;
                }
                if changed {
                    opt.set_arg(&arg);
                }
            }
            "serial" | "parallel" | "monitor" => {
                // QEMU takes everything after `file:` as the path, commas included.
                let Some(path) = opt
                    .arg_str()
                    .and_then(|a| a.strip_prefix("file:"))
                    .map(str::to_owned)
                else {
                    continue;
                };
                let id = format!("qemu-liveupgrade-file{item}");
                let spec = if opt.name == "monitor" {
                    format!("chardev={id},mode=readline")
                } else {
                    format!("chardev:{id}")
                };
                if opt.name == "monitor" {
                    opt.spelling = "-mon".into();
                    opt.name = "mon".into();
                }
                opt.arg = Some(spec.into());
                added.push(format!(
                    "file,id={id},path={},append=on",
                    path.replace(',', ",,")
                ));
            }
            _ => {}
        }
    }
    for chardev in added {
        cmd.push("chardev", Some(&chardev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::{parse, strings};

    #[test]
    fn libvirt_monitor_and_serial_fds() {
        let cmd = parse(&[
            "-chardev",
            "socket,id=charmonitor,fd=28,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-add-fd",
            "set=0,fd=27,opaque=serial0-log",
            "-chardev",
            "socket,id=charserial0,fd=26,server=on,wait=off,logfile=/dev/fdset/0,logappend=on",
            "-device",
            r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        ]);
        let p = find(&cmd);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].listen.clone(), p[0].mode, p[0].wait),
            (ListenOn::Fd(28), Mode::Qmp, false)
        );
        assert_eq!(
            (p[1].listen.clone(), p[1].mode),
            (ListenOn::Fd(26), Mode::Raw)
        );
        let out = strings(&rewrite(&cmd, &p, &[40, 41], true));
        assert_eq!(out[1], "socket,id=charmonitor,fd=40,server=on,wait=off");
        assert_eq!(
            out[7],
            "socket,id=charserial0,fd=41,server=on,wait=off,logfile=/dev/fdset/0,logappend=on"
        );
    }

    #[test]
    fn legacy_qmp_monitor_and_serial_become_chardevs_in_place() {
        let cmd = parse(&[
            "-qmp",
            "unix:/run/vm/qmp.sock,server=on,wait=off",
            "-monitor",
            "unix:/run/vm/hmp.sock,server,nowait",
            "-serial",
            "unix:/run/vm/ttyS0,server=on",
            "-qmp",
            "tcp:127.0.0.1:4444,server=on,wait=off",
        ]);
        let p = find(&cmd);
        assert_eq!(
            p.iter().map(|p| (p.mode, p.wait)).collect::<Vec<_>>(),
            [
                (Mode::Qmp, false),
                (Mode::Hmp, false),
                (Mode::Raw, true),
                (Mode::Qmp, false)
            ]
        );
        assert_eq!(p[3].listen.to_string(), "tcp:127.0.0.1:4444");
        let first = strings(&rewrite(&cmd, &p, &[10, 11, 12, 13], true));
        assert_eq!(
            first,
            [
                "-mon",
                "chardev=qemu-liveupgrade-chr0,mode=control",
                "-mon",
                "chardev=qemu-liveupgrade-chr1,mode=readline",
                "-serial",
                "chardev:qemu-liveupgrade-chr2",
                "-mon",
                "chardev=qemu-liveupgrade-chr3,mode=control",
                "-chardev",
                "socket,id=qemu-liveupgrade-chr0,fd=10,server=on,wait=off",
                "-chardev",
                "socket,id=qemu-liveupgrade-chr1,fd=11,server=on,wait=off",
                "-chardev",
                "socket,id=qemu-liveupgrade-chr2,fd=12,server=on,wait=on",
                "-chardev",
                "socket,id=qemu-liveupgrade-chr3,fd=13,server=on,wait=off",
            ]
        );
        let later = strings(&rewrite(&cmd, &p, &[10, 11, 12, 13], false));
        assert!(later[later.len() - 3].ends_with("wait=off"), "{later:?}");
    }

    #[test]
    fn later_generations_append_to_files() {
        let mut cmd = parse(&[
            "-chardev",
            "file,id=log0,path=/var/log/vm/console.log",
            "-chardev",
            "socket,id=s0,fd=26,server=on,wait=off,logfile=/dev/fdset/0",
            "-serial",
            "file:/tmp/a,b.log",
            "-chardev",
            "pty,id=p0",
        ]);
        append_to_files(&mut cmd);
        assert_eq!(
            strings(&cmd),
            [
                "-chardev",
                "file,id=log0,path=/var/log/vm/console.log,append=on",
                "-chardev",
                "socket,id=s0,fd=26,server=on,wait=off,logfile=/dev/fdset/0,logappend=on",
                "-serial",
                "chardev:qemu-liveupgrade-file2",
                "-chardev",
                "pty,id=p0",
                "-chardev",
                "file,id=qemu-liveupgrade-file2,path=/tmp/a,,b.log,append=on",
            ]
        );
    }

    #[test]
    fn tcp_and_telnet_servers_are_served_tls_and_vhost_user_are_not() {
        let cmd = parse(&[
            "-chardev",
            "socket,id=c0,host=127.0.0.1,port=4450,to=4460,server=on,wait=off,ipv4=on",
            "-serial",
            "telnet::4555,server,nowait",
            "-chardev",
            "socket,id=t0,host=127.0.0.1,port=4446,server=on,tls-creds=tls0",
            "-chardev",
            "socket,id=vu0,path=/run/vu.sock,server=on",
            "-netdev",
            "vhost-user,id=n0,chardev=vu0",
            "-monitor",
            "tcp:localhost:http,server=on",
        ]);
        let p = find(&cmd);
        assert_eq!(
            p.iter().map(|p| p.listen.to_string()).collect::<Vec<_>>(),
            ["tcp:127.0.0.1:4450", "tcp::4555"],
            "the TLS, vhost-user and service-named servers stay QEMU's"
        );
        let ListenOn::Tcp(ep) = &p[0].listen else {
            panic!("not tcp")
        };
        assert_eq!((ep.to, ep.ipv4), (Some(4460), Some(true)));
        let out = strings(&rewrite(&cmd, &p, &[20, 21], true));
        assert_eq!(out[1], "socket,id=c0,server=on,wait=off,fd=20");
        assert_eq!(out[3], "chardev:qemu-liveupgrade-chr1");
        assert_eq!(
            out.last().unwrap(),
            "socket,id=qemu-liveupgrade-chr1,fd=21,server=on,wait=off,telnet=on"
        );
    }

    #[test]
    fn chardev_path_servers_keep_their_id_and_options() {
        let cmd = parse(&[
            "-chardev",
            "socket,id=hmp0,path=/tmp/h.sock,server=on,wait=off",
            "-mon",
            "chardev=hmp0",
            "-chardev",
            "socket,id=client0,path=/tmp/elsewhere.sock",
        ]);
        let p = find(&cmd);
        assert_eq!(p.len(), 1, "a client socket is QEMU's to connect");
        assert_eq!(p[0].mode, Mode::Hmp);
        let out = strings(&rewrite(&cmd, &p, &[9], true));
        assert_eq!(out[1], "socket,id=hmp0,server=on,wait=off,fd=9");
    }
}
