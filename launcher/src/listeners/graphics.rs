//! VNC and SPICE displays whose listening socket the launcher owns.
//!
//! A new QEMU cannot bind the display port the old one holds ("Failed to find an available
//! port", "failed to initialize spice server"). So the launcher binds the port (or unix path)
//! once, and every generation runs its display server on a private unix socket of its own,
//! with every other setting as given (`-vnc unix:PRIVATE,password=on,audiodev=...`,
//! `-spice unix=on,addr=PRIVATE,disable-ticketing=on,...`). Each connection the launcher
//! accepts is handed to the QEMU running the guest with `getfd` and QMP `add_client`
//! ([`super::handoff`]), which QEMU 7.2 and 10.0 serve exactly as one accepted on their own
//! port: VNC runs the display's auth (`vnc_display_add_client` calls `vnc_connect` with the
//! display's auth and subauth; VeNCrypt/TLS included), SPICE its link and ticketing
//! (`spice_server_add_client`).
//!
//! What `add_client` cannot take, which stays QEMU's own and is named by [`blockers`]: VNC
//! websocket connections (`add_client` always starts plain RFB: `vnc_connect(..., websocket
//! = false)`, and QEMU refuses websocket on a unix socket), SPICE `tls-port` (spice-server sets
//! up TLS only with a TLS listening port of its own, `reds_init_ssl`), and a second VNC
//! display (`add_client` serves the first).
//!
//! A private listener rather than `-vnc none`: QEMU's `query-vnc` reports a display without a
//! listener as disabled. With one, `query-vnc`, `query-vnc-servers` and `query-spice` report
//! the private socket, and [`info_reply`] puts the launcher's address back, so that a client
//! of the proxied monitors sees the port it always saw.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use super::inet::{self, Endpoint};
use super::Blocker;
use crate::cmdline::{CmdLine, Item, KeyVal, Opt, OptArg};

/// A display protocol, as `add_client` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `-vnc`.
    Vnc,
    /// `-spice`.
    Spice,
}

impl Protocol {
    /// The name `add_client` takes.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Vnc => "vnc",
            Protocol::Spice => "spice",
        }
    }
}

/// Where a display's viewers connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address; `all`: on every address the host resolves to (VNC), else the first
    /// that binds (SPICE).
    Tcp {
        /// The address.
        endpoint: Endpoint,
        /// Every resolved address.
        all: bool,
    },
    /// A unix socket path.
    Path(PathBuf),
}

/// One display the launcher serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Display {
    /// VNC or SPICE.
    pub protocol: Protocol,
    /// Where viewers connect.
    pub listen: Listen,
}

/// Each generation's private display sockets, made by the proxy in its private directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sockets {
    /// The VNC server's listening socket.
    pub vnc: Option<PathBuf>,
    /// The SPICE server's listening socket.
    pub spice: Option<PathBuf>,
}

impl Sockets {
    /// Stand-ins for `plan`, which starts nothing: the sockets are made in the launcher's
    /// private directory when a generation starts.
    pub fn placeholders(displays: &[Display]) -> Sockets {
        let mut s = Sockets::default();
        for d in displays {
            let path = Some(PathBuf::from(format!("<private>/{}", d.protocol.name())));
            match d.protocol {
                Protocol::Vnc => s.vnc = path,
                Protocol::Spice => s.spice = path,
            }
        }
        s
    }

    fn get(&self, protocol: Protocol) -> Option<&Path> {
        match protocol {
            Protocol::Vnc => self.vnc.as_deref(),
            Protocol::Spice => self.spice.as_deref(),
        }
    }
}

/// Keys of `-vnc` that say where to listen, replaced by the private socket.
const VNC_ADDRESS_KEYS: [&str; 4] = ["vnc", "to", "ipv4", "ipv6"];
/// Keys of `-spice` that say where to listen, replaced by the private socket.
const SPICE_ADDRESS_KEYS: [&str; 5] = ["port", "addr", "ipv4", "ipv6", "unix"];

fn vnc_opts(cmd: &CmdLine) -> Vec<(usize, OptArg)> {
    cmd.items
        .iter()
        .enumerate()
        .filter_map(|(i, it)| match it {
            Item::Opt(o) if o.name == "vnc" => o.parse_arg().map(|a| (i, a)),
            _ => None,
        })
        .collect()
}

/// QEMU merges every `-spice` into one set of options, a later key winning.
fn spice_merged(cmd: &CmdLine) -> Option<OptArg> {
    let mut merged: Option<OptArg> = None;
    for arg in cmd.opts("spice").filter_map(|o| o.parse_arg()) {
        let m = merged.get_or_insert_with(|| OptArg::KeyVal(KeyVal::default()));
        for key in arg.keys() {
            if let Some(v) = arg.get(&key) {
                m.set(&key, &v);
            }
        }
    }
    merged
}

/// The VNC display's listening address as `vnc_display_get_address` reads it: `unix:PATH`,
/// or `HOST:DISPLAY` on port 5900 + DISPLAY (`to=` the last display of a range). `None` for
/// `none`, a reverse connection, or what the launcher cannot read (left to QEMU).
fn vnc_listen(arg: &OptArg) -> Option<Listen> {
    let addr = arg.get("vnc")?;
    if addr == "none" || arg.get_bool("reverse") == Some(true) {
        return None;
    }
    if let Some(path) = addr.strip_prefix("unix:") {
        return Some(Listen::Path(PathBuf::from(path)));
    }
    let (host, display) = inet::split_host_port(&addr)?;
    let display: u16 = display.parse().ok()?;
    let port = display.checked_add(5900)?;
    let to = match arg.get("to") {
        Some(to) => Some(to.parse::<u16>().ok()?.checked_add(5900)?),
        None => None,
    };
    Some(Listen::Tcp {
        endpoint: Endpoint {
            host,
            port,
            to,
            ipv4: arg.get_bool("ipv4"),
            ipv6: arg.get_bool("ipv6"),
        },
        all: true,
    })
}

/// The SPICE server's listening address: `unix=on,addr=PATH`, or `port=` on `addr=`.
/// `None` without a plain port, or with a `tls-port` (left to QEMU).
fn spice_listen(arg: &OptArg) -> Option<Listen> {
    if arg.get("tls-port").is_some_and(|p| p != "0") {
        return None;
    }
    if arg.get_bool("unix") == Some(true) {
        return arg.get("addr").map(|p| Listen::Path(PathBuf::from(p)));
    }
    let port: u16 = arg.get("port")?.parse().ok()?;
    (port != 0).then(|| Listen::Tcp {
        endpoint: Endpoint {
            host: arg.get("addr").unwrap_or_default(),
            port,
            to: None,
            ipv4: arg.get_bool("ipv4"),
            ipv6: arg.get_bool("ipv6"),
        },
        all: false,
    })
}

/// The displays the launcher serves for `cmd`: the VNC display when it is the only one and
/// has no websocket, and SPICE without TLS.
pub fn find(cmd: &CmdLine) -> Vec<Display> {
    let mut found = Vec::new();
    let vnc = vnc_opts(cmd);
    if let [(_, arg)] = vnc.as_slice() {
        if arg.get("websocket").is_none() {
            if let Some(listen) = vnc_listen(arg) {
                found.push(Display {
                    protocol: Protocol::Vnc,
                    listen,
                });
            }
        }
    }
    if let Some(listen) = spice_merged(cmd).as_ref().and_then(spice_listen) {
        found.push(Display {
            protocol: Protocol::Spice,
            listen,
        });
    }
    found
}

/// What the launcher cannot serve for the displays of `cmd`, which would keep QEMU from being
/// started a second time beside the first.
pub fn blockers(cmd: &CmdLine) -> Vec<Blocker> {
    let mut out = Vec::new();
    let listening: Vec<&Opt> = cmd
        .opts("vnc")
        .filter(|o| {
            o.parse_arg().is_some_and(|a| {
                a.get("vnc").as_deref() != Some("none") && a.get_bool("reverse") != Some(true)
            })
        })
        .collect();
    for opt in &listening {
        let Some(arg) = opt.parse_arg() else { continue };
        if arg.get("websocket").is_some() {
            out.push(Blocker::about(
                opt,
                "a VNC websocket listener stays QEMU's: add_client hands QEMU plain RFB \
                 connections only, so the next QEMU would have to bind the websocket port the \
                 running one holds",
            ));
        } else if vnc_listen(&arg).is_none() {
            out.push(Blocker::about(
                opt,
                "the launcher cannot read this VNC address; the next QEMU would have to bind \
                 the port the running one holds",
            ));
        }
    }
    if let Some(second) = listening.get(1) {
        out.push(Blocker::about(
            second,
            "more than one VNC display listens: add_client hands connections to the first \
             only, so the others stay QEMU's and the next QEMU could not bind them",
        ));
    }
    for opt in cmd.opts("display") {
        if opt.parse_arg().and_then(|a| a.get("vnc")).is_some() {
            out.push(Blocker::about(
                opt,
                "a VNC display given with -display vnc= stays QEMU's; give it with -vnc",
            ));
        }
    }
    if let (Some(arg), Some(first)) = (spice_merged(cmd), cmd.opts("spice").next()) {
        if arg.get("tls-port").is_some_and(|p| p != "0") {
            out.push(Blocker::about(
                first,
                "SPICE over TLS (tls-port) stays QEMU's: spice-server sets up TLS only for a \
                 TLS port it listens on itself, which the next QEMU cannot bind while the \
                 running one holds it",
            ));
        } else if arg.get("port").is_some_and(|p| p.parse::<u16>().is_err()) {
            out.push(Blocker::about(
                first,
                "the launcher cannot read this SPICE port; the next QEMU would have to bind \
                 the port the running one holds",
            ));
        }
    }
    out
}

/// `cmd` with each served display on the generation's private socket in `sockets`; every
/// other display setting is kept.
pub fn rewrite(cmd: &CmdLine, displays: &[Display], sockets: &Sockets) -> CmdLine {
    let mut out = cmd.clone();
    for d in displays {
        let Some(path) = sockets.get(d.protocol) else {
            continue;
        };
        let path = path.display().to_string();
        match d.protocol {
            Protocol::Vnc => {
                for opt in out.opts_mut("vnc") {
                    let Some(mut arg) = opt.parse_arg() else {
                        continue;
                    };
                    for key in &VNC_ADDRESS_KEYS[1..] {
                        arg.remove(key);
                    }
                    arg.set("vnc", &format!("unix:{path}"));
                    opt.set_arg(&arg);
                }
            }
            Protocol::Spice => {
                let mut last = None;
                for opt in out.opts_mut("spice") {
                    let Some(mut arg) = opt.parse_arg() else {
                        continue;
                    };
                    for key in SPICE_ADDRESS_KEYS {
                        arg.remove(key);
                    }
                    opt.set_arg(&arg);
                    last = Some(opt);
                }
                if let Some(opt) = last {
                    if let Some(mut arg) = opt.parse_arg() {
                        arg.set("unix", "on");
                        arg.set("addr", &path);
                        opt.set_arg(&arg);
                    }
                }
            }
        }
    }
    out
}

/// Where viewers of one display connect, as the display's query replies must report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Public {
    /// The first TCP listener's address, and the address as the user gave it (SPICE reports
    /// `addr=` as written, or `*`).
    Tcp(SocketAddr, String),
    /// A unix socket path.
    Path(PathBuf),
}

/// What the query replies are rewritten with: the private directory the generations' display
/// sockets live in, and each display's public address.
#[derive(Debug, Clone)]
pub struct Published {
    /// The proxy's private directory.
    pub dir: PathBuf,
    /// VNC's address.
    pub vnc: Option<Public>,
    /// SPICE's address.
    pub spice: Option<Public>,
}

static PUBLISHED: OnceLock<Published> = OnceLock::new();

/// Makes [`info_reply`] rewrite query replies with `p`. Set once: a launcher runs one VM and
/// its displays are bound before the first generation starts. A process-wide table for the
/// same reason as [`crate::ptys::publish`]: the proxy frames QEMU's output per connection,
/// far below anything that knows about displays.
pub fn publish(p: Published) {
    let _ = PUBLISHED.set(p);
}

/// Whether [`info_reply`] may change `raw`, a reply's `return` as QEMU wrote it: the launcher
/// holds display ports, and the return names the private directory QEMU's displays listen in.
pub fn may_rewrite(raw: &[u8]) -> bool {
    PUBLISHED.get().is_some_and(|p| {
        let dir = std::os::unix::ffi::OsStrExt::as_bytes(p.dir.as_os_str());
        !dir.is_empty() && raw.windows(dir.len()).any(|w| w == dir)
    })
}

/// What [`publish`] was given, as a supervisor handover writes it ([`crate::handover`]).
pub(crate) fn export_published() -> Option<crate::handover::state::Published> {
    use crate::handover::state::{Public as P, Published as S, Text};
    let public = |p: &Public| match p {
        Public::Tcp(addr, given) => P::Tcp {
            addr: addr.to_string(),
            given: given.clone(),
        },
        Public::Path(path) => P::Path(Text::path(path)),
    };
    PUBLISHED.get().map(|p| S {
        dir: Text::path(&p.dir),
        vnc: p.vnc.as_ref().map(public),
        spice: p.spice.as_ref().map(public),
    })
}

/// Publishes again what a handover brought; an address that does not parse is left out (its
/// replies then go unrewritten).
pub(crate) fn import_published(s: &crate::handover::state::Published) {
    use crate::handover::state::Public as P;
    let public = |p: &P| match p {
        P::Tcp { addr, given } => addr.parse().ok().map(|a| Public::Tcp(a, given.clone())),
        P::Path(path) => Some(Public::Path(path.to_path())),
    };
    publish(Published {
        dir: s.dir.to_path(),
        vnc: s.vnc.as_ref().and_then(public),
        spice: s.spice.as_ref().and_then(public),
    });
}

/// The `return` of a `query-vnc`, `query-vnc-servers` or `query-spice` reply with the private
/// socket replaced by the launcher's address; `None` when there is nothing to change.
pub fn info_reply(ret: &Value) -> Option<Value> {
    rewrite_info(ret, PUBLISHED.get()?)
}

/// A VNC connection event (`VNC_CONNECTED`, `VNC_INITIALIZED`, `VNC_DISCONNECTED`) with its
/// `server`, which QEMU describes by its listener (`vnc_server_info_get`), put back to the
/// launcher's address; `None` for any other event or nothing to change.
pub fn event(name: &str, msg: &Map<String, Value>) -> Option<Value> {
    if !name.starts_with("VNC_") {
        return None;
    }
    let p = PUBLISHED.get()?;
    rewrite_event(msg, p)
}

fn rewrite_event(msg: &Map<String, Value>, p: &Published) -> Option<Value> {
    let public = p.vnc.as_ref()?;
    let mut out = msg.clone();
    let server = out.get_mut("data")?.get_mut("server")?.as_object_mut()?;
    if !is_private(server.get("service"), &p.dir) {
        return None;
    }
    vnc_server_fields(server, public);
    Some(Value::Object(out))
}

fn is_private(v: Option<&Value>, dir: &Path) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| Path::new(s).starts_with(dir))
}

/// `host`, `service` and `family` of a VNC server entry for `public`.
fn vnc_server_fields(obj: &mut Map<String, Value>, public: &Public) {
    let (host, service, family) = match public {
        Public::Tcp(addr, _) => (
            addr.ip().to_string(),
            addr.port().to_string(),
            if addr.is_ipv4() { "ipv4" } else { "ipv6" },
        ),
        Public::Path(p) => (String::new(), p.display().to_string(), "unix"),
    };
    obj.insert("host".into(), json!(host));
    obj.insert("service".into(), json!(service));
    obj.insert("family".into(), json!(family));
}

fn rewrite_info(ret: &Value, p: &Published) -> Option<Value> {
    let mut out = ret.clone();
    let mut changed = false;
    // query-vnc: {"enabled": true, "host": "", "service": PRIVATE, "family": "unix", ...}
    if let (Some(obj), Some(public)) = (out.as_object_mut(), &p.vnc) {
        if obj.contains_key("enabled") && is_private(obj.get("service"), &p.dir) {
            vnc_server_fields(obj, public);
            changed = true;
        }
    }
    // query-spice: {"enabled": true, "host": PRIVATE, "mouse-mode": ..., ...}
    if let (Some(obj), Some(public)) = (out.as_object_mut(), &p.spice) {
        if obj.contains_key("mouse-mode") && is_private(obj.get("host"), &p.dir) {
            match public {
                Public::Tcp(addr, given) => {
                    obj.insert("host".into(), json!(given));
                    obj.insert("port".into(), json!(addr.port()));
                }
                Public::Path(path) => {
                    obj.insert("host".into(), json!(path.display().to_string()));
                }
            }
            changed = true;
        }
    }
    // query-vnc-servers: [{"id": .., "server": [{"host", "service", "family", ...}], ..}]
    if let (Some(list), Some(public)) = (out.as_array_mut(), &p.vnc) {
        for display in list.iter_mut() {
            let Some(servers) = display.get_mut("server").and_then(Value::as_array_mut) else {
                continue;
            };
            for server in servers.iter_mut().filter_map(Value::as_object_mut) {
                if is_private(server.get("service"), &p.dir) {
                    vnc_server_fields(server, public);
                    changed = true;
                }
            }
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::{parse, strings};

    fn tcp(host: &str, port: u16, all: bool) -> Listen {
        Listen::Tcp {
            endpoint: Endpoint {
                host: host.into(),
                port,
                to: None,
                ipv4: None,
                ipv6: None,
            },
            all,
        }
    }

    #[test]
    fn libvirt_vnc_moves_to_a_private_socket_keeping_its_audiodev() {
        let cmd = parse(&["-vnc", "127.0.0.1:0,audiodev=audio1", "-m", "256"]);
        let d = find(&cmd);
        assert_eq!(
            d,
            [Display {
                protocol: Protocol::Vnc,
                listen: tcp("127.0.0.1", 5900, true)
            }]
        );
        assert!(blockers(&cmd).is_empty());
        let sockets = Sockets {
            vnc: Some("/run/x/1.vnc".into()),
            spice: None,
        };
        assert_eq!(
            strings(&rewrite(&cmd, &d, &sockets)),
            ["-vnc", "unix:/run/x/1.vnc,audiodev=audio1", "-m", "256"]
        );
    }

    #[test]
    fn vnc_forms() {
        let one = |s: &str| find(&parse(&["-vnc", s])).pop().map(|d| d.listen);
        assert_eq!(one(":47"), Some(tcp("", 5947, true)));
        assert_eq!(one("[::1]:2"), Some(tcp("::1", 5902, true)));
        assert_eq!(
            one("unix:/tmp/v.sock,password=on"),
            Some(Listen::Path("/tmp/v.sock".into()))
        );
        assert_eq!(one("none"), None);
        assert_eq!(one("localhost:5,reverse=on"), None);
        let Some(Listen::Tcp { endpoint, .. }) = one("0.0.0.0:1,to=9,ipv4=on") else {
            panic!("no tcp")
        };
        assert_eq!((endpoint.to, endpoint.ipv4), (Some(5909), Some(true)));
        let cmd = parse(&["-vnc", ":1,to=3,lossy=on,ipv4=on"]);
        let sockets = Sockets {
            vnc: Some("/p/v".into()),
            spice: None,
        };
        assert_eq!(
            strings(&rewrite(&cmd, &find(&cmd), &sockets))[1],
            "unix:/p/v,lossy=on"
        );
    }

    #[test]
    fn websocket_second_display_and_display_vnc_are_blockers() {
        let ws = parse(&["-vnc", ":1,websocket=5701"]);
        assert!(find(&ws).is_empty());
        assert!(
            blockers(&ws)[0].why.contains("websocket"),
            "{:?}",
            blockers(&ws)
        );
        let two = parse(&["-vnc", ":1", "-vnc", ":2,id=b"]);
        assert!(find(&two).is_empty());
        assert_eq!(blockers(&two).len(), 1);
        let dpy = parse(&["-display", "vnc=:3"]);
        assert_eq!(blockers(&dpy).len(), 1);
        assert!(blockers(&parse(&["-vnc", "none"])).is_empty());
    }

    #[test]
    fn libvirt_spice_moves_to_a_private_unix_socket() {
        let cmd = parse(&[
            "-spice",
            "port=5901,addr=127.0.0.1,disable-ticketing=on,image-compression=off,seamless-migration=on",
        ]);
        let d = find(&cmd);
        assert_eq!(d[0].listen, tcp("127.0.0.1", 5901, false));
        let sockets = Sockets {
            vnc: None,
            spice: Some("/run/x/1.spice".into()),
        };
        assert_eq!(
            strings(&rewrite(&cmd, &d, &sockets))[1],
            "disable-ticketing=on,image-compression=off,seamless-migration=on,unix=on,addr=/run/x/1.spice"
        );
        let tls = parse(&["-spice", "port=5901,tls-port=5902,x509-dir=/etc/pki"]);
        assert!(find(&tls).is_empty());
        assert!(blockers(&tls)[0].why.contains("TLS"));
        assert_eq!(blockers(&tls)[0].option, "-spice port=5901");
        let unix = parse(&["-spice", "unix=on,addr=/run/s.sock,gl=on"]);
        assert_eq!(find(&unix)[0].listen, Listen::Path("/run/s.sock".into()));
    }

    #[test]
    fn query_replies_report_the_launchers_address() {
        let p = Published {
            dir: "/run/q".into(),
            vnc: Some(Public::Tcp(
                "127.0.0.1:5947".parse().unwrap(),
                String::new(),
            )),
            spice: Some(Public::Tcp(
                "127.0.0.1:5901".parse().unwrap(),
                "127.0.0.1".into(),
            )),
        };
        let vnc = json!({"enabled": true, "host": "", "service": "/run/q/2.1.vnc",
            "family": "unix", "auth": "none", "clients": []});
        assert_eq!(
            rewrite_info(&vnc, &p).unwrap(),
            json!({"enabled": true, "host": "127.0.0.1", "service": "5947",
                "family": "ipv4", "auth": "none", "clients": []})
        );
        let spice = json!({"enabled": true, "migrated": false, "host": "/run/q/2.2.spice",
            "auth": "none", "compiled-version": "0.15.1", "mouse-mode": "server", "channels": []});
        let got = rewrite_info(&spice, &p).unwrap();
        assert_eq!(
            (&got["host"], &got["port"]),
            (&json!("127.0.0.1"), &json!(5901))
        );
        let servers = json!([{"id": "default", "auth": "none", "clients": [],
            "server": [{"host": "", "service": "/run/q/2.1.vnc", "family": "unix",
                "websocket": false, "auth": "none"}]}]);
        let got = rewrite_info(&servers, &p).unwrap();
        assert_eq!(got[0]["server"][0]["service"], "5947");
        assert_eq!(rewrite_info(&json!({"enabled": false}), &p), None);
        let event = json!({"event": "VNC_CONNECTED", "data": {
            "server": {"auth": "none", "family": "unix", "service": "/run/q/2.4.vnc",
                "host": "", "websocket": false},
            "client": {"family": "ipv4", "service": "55366", "host": "127.0.0.1",
                "websocket": false}}});
        let got = rewrite_event(event.as_object().unwrap(), &p).unwrap();
        assert_eq!(
            got["data"]["server"],
            json!({"auth": "none", "family": "ipv4", "service": "5947",
                "host": "127.0.0.1", "websocket": false})
        );
        assert_eq!(got["data"]["client"], event["data"]["client"]);
        assert_eq!(rewrite_info(&json!([{"label": "x"}]), &p), None);
    }
}
