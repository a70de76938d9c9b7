//! What a QEMU command line refers to that must stay stable across generations.
//!
//! Every generation is started with the same command line, so whatever it names outside
//! itself must mean the same thing to each of them: inherited fds must be open at the same
//! numbers (libvirt passes listening sockets, taps and log files that way and never reopens
//! them), sockets that managers connect to must stay where they are, guest RAM has a size and
//! a backing the launcher may take over, and monitors are how managers talk to "QEMU".
//! [`resources`] reads all of that from a [`CmdLine`], in both the `key=value` and the JSON
//! syntax.

use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::cmdline::{CmdLine, Item, Opt, OptArg};

/// Everything stable that a command line refers to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    /// Inherited fds named on the command line, one entry per mention, in order.
    pub fds: Vec<KeptFd>,
    /// Sockets QEMU listens on or connects to for character devices, monitors and streams.
    pub sockets: Vec<Socket>,
    /// `-m` and the memory backends.
    pub memory: Vec<Memory>,
    /// The machine settings, when any option sets one.
    pub machine: Option<Machine>,
    /// The monitors, explicit ones only (not QEMU's default `vc` monitor).
    pub monitors: Vec<Monitor>,
    /// Where the VM's state comes from, when QEMU starts by loading it: the last `-incoming`
    /// (`defer`, `fd:N`, `tcp:...`, `unix:...`, `exec:...`), as given.
    pub incoming: Option<String>,
}

/// An inherited fd that an option names.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptFd {
    /// The fd number, as open in the process that runs QEMU.
    pub fd: RawFd,
    /// The option naming it, canonical name: `netdev`, `chardev`, `add-fd`, `incoming`.
    pub option: String,
    /// The key naming it: `fd`, `fds`, `vhostfd`, `vhostfds`, `sock_fd`, a nested `addr.str`
    /// of an fd-typed address, a path key holding `/proc/self/fd/N`, or `uri` for
    /// `-incoming fd:N`.
    pub key: String,
    /// The option's `id=`.
    pub id: Option<String>,
}

/// Where a socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address as written; `host` is empty for "any", `port` may be a service name.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
    /// An inherited socket fd.
    Fd(RawFd),
}

impl fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            SocketAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            SocketAddr::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// A socket a character device, monitor, gdb stub or stream netdev uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Socket {
    /// The option: `chardev`, `qmp`, `monitor`, `serial`, `gdb`, `s`, `netdev`, ...
    pub option: String,
    /// The option's `id=` (QEMU names the legacy ones itself).
    pub id: Option<String>,
    /// Where it is.
    pub address: SocketAddr,
    /// Whether QEMU listens (`server=on`) rather than connects.
    pub server: bool,
}

/// Guest RAM as `-m` or a memory backend describes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Memory {
    /// `m` for `-m` (with `-mem-path`/`-mem-prealloc` folded in), or `object`.
    pub option: String,
    /// The backend's `id=`.
    pub id: Option<String>,
    /// The backend type: `memory-backend-ram`, `-file`, `-memfd`, ...
    pub backend: Option<String>,
    /// Bytes. A bare `-m 256` means MiB; a backend's `size=` means bytes.
    pub size: Option<u64>,
    /// `share=`, when given.
    pub share: Option<bool>,
    /// `mem-path=`, or `-mem-path` for `-m`.
    pub mem_path: Option<String>,
    /// Huge pages: `hugetlb=on`, a mem-path that looks like hugetlbfs, or `-mem-path` (which
    /// exists for hugetlbfs).
    pub hugepages: bool,
    /// `prealloc=on`, or `-mem-prealloc` for `-m`.
    pub prealloc: bool,
    /// `-m slots=`.
    pub slots: Option<u64>,
    /// `-m maxmem=`, bytes.
    pub maxmem: Option<u64>,
    /// The `-numa node` ids (`nodeid=`, else the node's position) that use this backend as
    /// their `memdev`.
    pub numa_nodes: Vec<String>,
}

/// Machine settings, merged over every `-machine`/`-M` as QEMU merges them (a later key wins).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Machine {
    /// The machine type; `None` means the default machine.
    pub type_: Option<String>,
    /// `memory-backend=`: the id of the backend holding main RAM.
    pub memory_backend: Option<String>,
    /// Accelerators in order of preference, `:`-separated as `-machine accel=` takes them:
    /// from `-accel` options, else `-machine accel=`, else `kvm` for `-enable-kvm`.
    pub accel: Option<String>,
}

/// Which protocol a monitor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP (`-qmp`, `-mon mode=control`).
    Qmp,
    /// The human monitor (`-monitor`, `-mon`, `-serial mon:...`).
    Hmp,
}

/// A monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct Monitor {
    /// The option: `qmp`, `qmp-pretty`, `monitor`, `mon`, `serial`, `parallel`.
    pub option: String,
    /// QMP or HMP.
    pub mode: MonitorMode,
    /// The `-chardev` id it runs on: `-mon chardev=ID` or `chardev:ID`; `None` when the
    /// character device is written inline (`-qmp unix:...`).
    pub chardev: Option<String>,
    /// The argument as written (`unix:/p,server=on,wait=off`, `mon:stdio`), or the chardev
    /// id for `-mon`.
    pub address: String,
    /// The socket under it, inline or from the linked `-chardev`.
    pub socket: Option<Socket>,
}

/// Finds everything stable that `cmd` refers to.
pub fn resources(cmd: &CmdLine) -> Resources {
    let opts: Vec<&Opt> = cmd
        .items
        .iter()
        .filter_map(|item| match item {
            Item::Opt(opt) => Some(opt),
            Item::Positional(_) => None,
        })
        .collect();
    let mut fds = Vec::new();
    let mut sockets = Vec::new();
    for opt in &opts {
        fds_of(opt, &mut fds);
        sockets.extend(socket_of(opt));
    }
    let monitors = opts
        .iter()
        .filter_map(|opt| monitor_of(opt, &sockets))
        .collect();
    Resources {
        fds,
        sockets,
        memory: memory(cmd),
        machine: machine(cmd),
        monitors,
        incoming: cmd
            .opts("incoming")
            .last()
            .and_then(|o| o.arg.as_ref())
            .map(|a| a.to_string_lossy().into_owned()),
    }
}

/// Parses QEMU's size syntax (`qemu_strtosz()`): a decimal or `0x` number with an optional
/// suffix `B`, `K`, `M`, `G`, `T`, `P`, `E` (powers of 1024, either case). Without a suffix
/// the unit is MiB when `default_suffix_mib` (as for `-m 256`), else bytes. A fraction needs a
/// unit above bytes (`1.5G`). `None` for anything else or on overflow.
pub fn parse_size(s: &str, default_suffix_mib: bool) -> Option<u64> {
    let (digits, rest, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            (&hex[..end], &hex[end..], 16)
        }
        None => {
            let end = s
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(s.len());
            (&s[..end], &s[end..], 10)
        }
    };
    let unit: u64 = match rest {
        "" if default_suffix_mib => 1 << 20,
        "" | "b" | "B" => 1,
        _ => {
            let shift = "KMGTPE"
                .find(&rest.to_ascii_uppercase())
                .filter(|_| rest.len() == 1)?;
            1 << (10 * (shift + 1))
        }
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || (!fraction.is_empty() && (radix == 16 || unit == 1)) {
        return None;
    }
    let whole = u64::from_str_radix(whole, radix).ok()?.checked_mul(unit)?;
    let fraction = match fraction {
        "" => 0,
        f => (format!("0.{f}").parse::<f64>().ok()? * unit as f64) as u64,
    };
    whole.checked_add(fraction)
}

/// Keys whose values are fd numbers, `:`-separated for the plural ones.
const FD_KEYS: &[&str] = &["fd", "fds", "vhostfd", "vhostfds", "sock_fd"];

fn numeric_fd(s: &str) -> Option<RawFd> {
    s.parse::<u32>().ok().and_then(|n| RawFd::try_from(n).ok())
}

/// An fd a path names: `/proc/self/fd/N` or `/dev/fd/N` (the launcher's own memfd RAM uses
/// the first; a user's command line may too).
fn fd_path(path: &str) -> Option<RawFd> {
    numeric_fd(
        path.strip_prefix("/proc/self/fd/")
            .or_else(|| path.strip_prefix("/dev/fd/"))?,
    )
}

/// Whether the address whose `str` is at `key` is of type `fd`: `addr.str` beside
/// `addr.type=fd` (keyval and flat JSON), or `addr.data.str` under `addr.type=fd` (the QMP
/// shape of `SocketAddressLegacy`).
fn is_fd_address(arg: &OptArg, key: &str) -> bool {
    let Some(parent) = key.strip_suffix(".str") else {
        return false;
    };
    let is_fd = |p: &str| arg.get(&format!("{p}.type")).as_deref() == Some("fd");
    is_fd(parent) || parent.strip_suffix(".data").is_some_and(is_fd)
}

fn fds_of(opt: &Opt, out: &mut Vec<KeptFd>) {
    let mut push = |fd, key: &str, id: Option<String>| {
        out.push(KeptFd {
            fd,
            option: opt.name.clone(),
            key: key.to_owned(),
            id,
        });
    };
    let Some(arg) = opt.parse_arg() else {
        // Raw arguments: `-incoming fd:N`, or a path naming an fd (`-mem-path /dev/fd/5`).
        let raw = opt.arg_str().unwrap_or_default();
        if let Some(fd) = raw.strip_prefix("fd:").filter(|_| opt.name == "incoming") {
            numeric_fd(fd)
                .into_iter()
                .for_each(|fd| push(fd, "uri", None));
        } else if let Some(fd) = fd_path(raw) {
            push(fd, &opt.name, None);
        }
        return;
    };
    let id = arg.get("id");
    for key in arg.keys() {
        let Some(value) = arg.get(&key) else { continue };
        let last = key.rsplit('.').next().unwrap_or(&key);
        if FD_KEYS.contains(&last) {
            for fd in value.split(':').filter_map(numeric_fd) {
                push(fd, &key, id.clone());
            }
        } else if is_fd_address(&arg, &key) {
            numeric_fd(&value)
                .into_iter()
                .for_each(|fd| push(fd, &key, id.clone()));
        } else if let Some(fd) = fd_path(&value) {
            push(fd, &key, id.clone());
        }
    }
}

/// The socket of a legacy character-device string (`qemu_chr_parse_compat()`):
/// `unix:PATH[,...]`, `tcp:[HOST]:PORT[,...]`, `telnet:`, `tn3270:`, `websocket:`, optionally
/// behind `mon:`. `server` is the default when the caller forces one (`-gdb tcp:` listens).
fn legacy_socket(option: &str, dev: &str, server_default: bool) -> Option<Socket> {
    let list = OptArg::parse(dev, Some("dev"))?;
    let spec = list.get("dev")?;
    let spec = spec.strip_prefix("mon:").unwrap_or(&spec);
    let address = if let Some(path) = spec.strip_prefix("unix:") {
        SocketAddr::Unix(path.into())
    } else {
        let rest = ["tcp:", "telnet:", "tn3270:", "websocket:"]
            .iter()
            .find_map(|prefix| spec.strip_prefix(prefix))?;
        let (host, port) = rest.split_once(':')?;
        SocketAddr::Tcp {
            host: host.to_owned(),
            port: port.to_owned(),
        }
    };
    let server = server_default || list.get_bool("server").unwrap_or(false);
    Some(Socket {
        option: option.to_owned(),
        id: None,
        address,
        server,
    })
}

/// The address of an inet/unix/fd socket address whose `type` is under `type_at` and whose
/// other members are under `data_at` (the same place in `SocketAddress`; `data` below it in
/// the QMP `SocketAddressLegacy`).
fn socket_address(arg: &OptArg, type_at: &str, data_at: &str) -> Option<SocketAddr> {
    let get = |key: &str| arg.get(&format!("{data_at}{key}"));
    match arg.get(&format!("{type_at}type"))?.as_str() {
        "unix" => get("path").map(|p| SocketAddr::Unix(p.into())),
        "inet" => Some(SocketAddr::Tcp {
            host: get("host")?,
            port: get("port")?,
        }),
        "fd" => get("str")
            .as_deref()
            .and_then(numeric_fd)
            .map(SocketAddr::Fd),
        _ => None,
    }
}

fn socket_of(opt: &Opt) -> Option<Socket> {
    let make = |address, server| {
        let id = opt.parse_arg().and_then(|a| a.get("id"));
        Some(Socket {
            option: opt.name.clone(),
            id,
            address,
            server,
        })
    };
    match opt.name.as_str() {
        "qmp" | "qmp-pretty" | "monitor" | "serial" | "parallel" | "debugcon" => {
            legacy_socket(&opt.name, opt.arg_str()?, false)
        }
        "gdb" => legacy_socket(&opt.name, opt.arg_str()?, true),
        "s" => make(
            SocketAddr::Tcp {
                host: String::new(),
                port: "1234".into(),
            },
            true,
        ),
        "chardev" => {
            let arg = opt.parse_arg()?;
            let server = arg.get_bool("server").unwrap_or(false);
            if arg.get("backend").as_deref() == Some("socket") {
                let address = if let Some(path) = arg.get("path") {
                    SocketAddr::Unix(path.into())
                } else if let Some(port) = arg.get("port") {
                    SocketAddr::Tcp {
                        host: arg.get("host").unwrap_or_default(),
                        port,
                    }
                } else {
                    SocketAddr::Fd(numeric_fd(&arg.get("fd")?)?)
                };
                return make(address, server);
            }
            // The QMP shape, `{"id":..,"backend":{"type":"socket","data":{"addr":..}}}`.
            if arg.get("backend.type").as_deref() == Some("socket") {
                let address =
                    socket_address(&arg, "backend.data.addr.", "backend.data.addr.data.")?;
                return make(
                    address,
                    arg.get_bool("backend.data.server").unwrap_or(false),
                );
            }
            None
        }
        "netdev" => {
            let arg = opt.parse_arg()?;
            let server = arg.get_bool("server").unwrap_or(false);
            match arg.get("type")?.as_str() {
                "stream" => make(socket_address(&arg, "addr.", "addr.")?, server),
                "socket" => {
                    if let Some(listen) = arg.get("listen") {
                        let (host, port) = listen.split_once(':')?;
                        make(
                            SocketAddr::Tcp {
                                host: host.into(),
                                port: port.into(),
                            },
                            true,
                        )
                    } else if let Some(connect) = arg.get("connect") {
                        let (host, port) = connect.split_once(':')?;
                        make(
                            SocketAddr::Tcp {
                                host: host.into(),
                                port: port.into(),
                            },
                            false,
                        )
                    } else {
                        make(SocketAddr::Fd(numeric_fd(&arg.get("fd")?)?), false)
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn monitor_of(opt: &Opt, sockets: &[Socket]) -> Option<Monitor> {
    let address = opt.arg_str()?.to_owned();
    let linked = |id: &str| {
        sockets
            .iter()
            .find(|s| s.option == "chardev" && s.id.as_deref() == Some(id))
            .cloned()
    };
    let (mode, chardev) = match opt.name.as_str() {
        "qmp" | "qmp-pretty" => (MonitorMode::Qmp, address.strip_prefix("chardev:")),
        // QEMU skips `-monitor none...` (`strncmp(optarg, "none", 4)` in vl.c).
        "monitor" if address.starts_with("none") => return None,
        "monitor" => (MonitorMode::Hmp, address.strip_prefix("chardev:")),
        "serial" | "parallel" if address.starts_with("mon:") => (MonitorMode::Hmp, None),
        "mon" => {
            let arg = opt.parse_arg()?;
            let chardev = arg.get("chardev")?;
            let mode = match arg.get("mode").as_deref() {
                Some("control") => MonitorMode::Qmp,
                _ => MonitorMode::Hmp,
            };
            let socket = linked(&chardev);
            return Some(Monitor {
                option: opt.name.clone(),
                mode,
                chardev: Some(chardev.clone()),
                address: chardev,
                socket,
            });
        }
        _ => return None,
    };
    let chardev = chardev.map(|id| id.split(',').next().unwrap_or(id).to_owned());
    let socket = match &chardev {
        Some(id) => linked(id),
        None => legacy_socket(&opt.name, &address, false),
    };
    Some(Monitor {
        option: opt.name.clone(),
        mode,
        chardev,
        address,
        socket,
    })
}

/// A path that looks like it is on hugetlbfs (`/dev/hugepages`, `/mnt/huge`,
/// `/hugetlbfs/vm1`): a heuristic, as the file may not exist yet.
fn looks_hugetlbfs(path: &str) -> bool {
    path.split('/').any(|part| part.starts_with("huge"))
}

fn memory(cmd: &CmdLine) -> Vec<Memory> {
    let mut out = Vec::new();
    let mem_path = cmd
        .opts("mem-path")
        .last()
        .and_then(|o| o.arg_str())
        .map(str::to_owned);
    let prealloc = cmd.has("mem-prealloc");
    if cmd.has("m") || mem_path.is_some() || prealloc {
        // QEMU merges every -m into one set of options; a later key wins.
        let mut m = Memory {
            option: "m".into(),
            hugepages: mem_path.is_some(),
            prealloc,
            ..Memory::default()
        };
        for arg in cmd.opts("m").filter_map(Opt::parse_arg) {
            m.size = arg
                .get("size")
                .and_then(|s| parse_size(&s, true))
                .or(m.size);
            m.slots = arg.get("slots").and_then(|s| s.parse().ok()).or(m.slots);
            m.maxmem = arg
                .get("maxmem")
                .and_then(|s| parse_size(&s, false))
                .or(m.maxmem);
        }
        m.mem_path = mem_path;
        out.push(m);
    }
    for arg in cmd.opts("object").filter_map(Opt::parse_arg) {
        let Some(backend) = arg
            .get("qom-type")
            .filter(|t| t.starts_with("memory-backend-"))
        else {
            continue;
        };
        let mem_path = arg.get("mem-path");
        out.push(Memory {
            option: "object".into(),
            id: arg.get("id"),
            backend: Some(backend),
            size: arg.get("size").and_then(|s| parse_size(&s, false)),
            share: arg.get_bool("share"),
            hugepages: arg.get_bool("hugetlb") == Some(true)
                || mem_path.as_deref().is_some_and(looks_hugetlbfs),
            mem_path,
            prealloc: arg.get_bool("prealloc") == Some(true),
            ..Memory::default()
        });
    }
    let nodes = cmd
        .opts("numa")
        .filter_map(Opt::parse_arg)
        .filter(|a| a.get("type").as_deref() == Some("node"));
    for (position, node) in nodes.enumerate() {
        let Some(memdev) = node.get("memdev") else {
            continue;
        };
        let node_id = node.get("nodeid").unwrap_or_else(|| position.to_string());
        if let Some(m) = out
            .iter_mut()
            .find(|m| m.option == "object" && m.id.as_deref() == Some(&memdev))
        {
            m.numa_nodes.push(node_id);
        }
    }
    out
}

fn machine(cmd: &CmdLine) -> Option<Machine> {
    let mut machine = Machine::default();
    let mut any = false;
    for opt in cmd.items.iter().filter_map(|item| match item {
        Item::Opt(opt) if matches!(opt.name.as_str(), "machine" | "enable-kvm") => Some(opt),
        _ => None,
    }) {
        any = true;
        if opt.name == "enable-kvm" {
            machine.accel = Some("kvm".into());
            continue;
        }
        let Some(arg) = opt.parse_arg() else { continue };
        machine.type_ = arg.get("type").or(machine.type_);
        machine.memory_backend = arg.get("memory-backend").or(machine.memory_backend);
        machine.accel = arg.get("accel").or(machine.accel);
    }
    let accels: Vec<String> = cmd
        .opts("accel")
        .filter_map(|o| o.parse_arg()?.get("accel"))
        .collect();
    if !accels.is_empty() {
        any = true;
        machine.accel = Some(accels.join(":"));
    }
    any.then_some(machine)
}

impl Resources {
    /// Guest RAM in bytes as the command line sets it: the `-machine memory-backend`, else
    /// the NUMA nodes' backends, else `-m`. `None` when it is the machine's default.
    pub fn ram_size(&self) -> Option<u64> {
        let objects = self.memory.iter().filter(|m| m.option == "object");
        if let Some(id) = self
            .machine
            .as_ref()
            .and_then(|m| m.memory_backend.as_deref())
        {
            return objects
                .clone()
                .find(|m| m.id.as_deref() == Some(id))
                .and_then(|m| m.size);
        }
        let numa: Vec<&Memory> = objects.filter(|m| !m.numa_nodes.is_empty()).collect();
        if !numa.is_empty() {
            return numa.iter().map(|m| m.size).sum();
        }
        self.memory
            .iter()
            .find(|m| m.option == "m")
            .and_then(|m| m.size)
    }

    /// The fd numbers named, sorted, each once.
    pub fn fd_numbers(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.fds.iter().map(|f| f.fd).collect();
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Everything as JSON, for `plan` and logs.
    pub fn to_json(&self) -> Value {
        json!({
            "fds": self.fds.iter().map(KeptFd::to_json).collect::<Vec<_>>(),
            "sockets": self.sockets.iter().map(Socket::to_json).collect::<Vec<_>>(),
            "memory": self.memory.iter().map(Memory::to_json).collect::<Vec<_>>(),
            "machine": self.machine.as_ref().map(Machine::to_json),
            "monitors": self.monitors.iter().map(Monitor::to_json).collect::<Vec<_>>(),
            "incoming": self.incoming,
        })
    }
}

impl KeptFd {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({ "fd": self.fd, "option": self.option, "key": self.key, "id": self.id })
    }
}

impl Socket {
    /// As JSON; the address as `unix:PATH`, `tcp:HOST:PORT` or `fd:N`.
    pub fn to_json(&self) -> Value {
        json!({
            "option": self.option,
            "id": self.id,
            "address": self.address.to_string(),
            "server": self.server,
        })
    }
}

impl Memory {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "option": self.option,
            "id": self.id,
            "backend": self.backend,
            "size": self.size,
            "share": self.share,
            "mem_path": self.mem_path,
            "hugepages": self.hugepages,
            "prealloc": self.prealloc,
            "slots": self.slots,
            "maxmem": self.maxmem,
            "numa_nodes": self.numa_nodes,
        })
    }
}

impl Machine {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({ "type": self.type_, "memory_backend": self.memory_backend, "accel": self.accel })
    }
}

impl Monitor {
    /// As JSON; the socket as its address.
    pub fn to_json(&self) -> Value {
        json!({
            "option": self.option,
            "mode": match self.mode { MonitorMode::Qmp => "qmp", MonitorMode::Hmp => "hmp" },
            "chardev": self.chardev,
            "address": self.address,
            "socket": self.socket.as_ref().map(|s| s.address.to_string()),
        })
    }
}

#[cfg(test)]
#[path = "cmdline/resources_tests.rs"]
mod tests;
