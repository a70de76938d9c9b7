//! Tests of [`crate::resources`], kept beside the command lines they share with the parser's
//! tests so that `resources.rs` stays one concern at a readable length.

use super::*;
use crate::cmdline::fixtures::{args, libvirt, libvirt_probe, script, script_fds, script_sockets};

fn of(argv: Vec<std::ffi::OsString>) -> Resources {
    resources(&CmdLine::parse(&argv).unwrap())
}

fn fd(fd: RawFd, option: &str, key: &str, id: Option<&str>) -> KeptFd {
    KeptFd {
        fd,
        option: option.into(),
        key: key.into(),
        id: id.map(Into::into),
    }
}

fn sock(option: &str, id: Option<&str>, address: SocketAddr, server: bool) -> Socket {
    Socket {
        option: option.into(),
        id: id.map(Into::into),
        address,
        server,
    }
}

fn tcp(host: &str, port: &str) -> SocketAddr {
    SocketAddr::Tcp {
        host: host.into(),
        port: port.into(),
    }
}

fn unix(path: &str) -> SocketAddr {
    SocketAddr::Unix(path.into())
}

fn object(id: &str, backend: &str, size: u64) -> Memory {
    Memory {
        option: "object".into(),
        id: Some(id.into()),
        backend: Some(backend.into()),
        size: Some(size),
        ..Memory::default()
    }
}

fn monitor(
    option: &str,
    mode: MonitorMode,
    chardev: Option<&str>,
    address: &str,
    socket: Option<Socket>,
) -> Monitor {
    Monitor {
        option: option.into(),
        mode,
        chardev: chardev.map(Into::into),
        address: address.into(),
        socket,
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn libvirt_domain() {
    let r = of(libvirt());
    assert_eq!(
        r.fds,
        [
            fd(28, "chardev", "fd", Some("charmonitor")),
            fd(32, "netdev", "fd", Some("hostnet0")),
            fd(33, "netdev", "vhostfd", Some("hostnet0")),
            fd(27, "add-fd", "fd", None),
            fd(26, "chardev", "fd", Some("charserial0")),
            fd(30, "chardev", "fd", Some("charchannel0")),
        ]
    );
    assert_eq!(r.fd_numbers(), [26, 27, 28, 30, 32, 33]);
    let monitor_socket = sock("chardev", Some("charmonitor"), SocketAddr::Fd(28), true);
    assert_eq!(
        r.sockets,
        [
            monitor_socket.clone(),
            sock(
                "netdev",
                Some("hostnet1"),
                unix("/run/libvirt/qemu/passt/1-hb1-net1.socket"),
                false
            ),
            sock("chardev", Some("charserial0"), SocketAddr::Fd(26), true),
            sock("chardev", Some("charchannel0"), SocketAddr::Fd(30), true),
        ]
    );
    let m = Memory {
        option: "m".into(),
        size: Some(256 * MIB),
        ..Memory::default()
    };
    assert_eq!(
        r.memory,
        [m, object("pc.ram", "memory-backend-ram", 256 * MIB)]
    );
    assert_eq!(
        r.machine,
        Some(Machine {
            type_: Some("pc-i440fx-7.2".into()),
            memory_backend: Some("pc.ram".into()),
            accel: Some("tcg".into()),
        })
    );
    assert_eq!(
        r.monitors,
        [monitor(
            "mon",
            MonitorMode::Qmp,
            Some("charmonitor"),
            "charmonitor",
            Some(monitor_socket)
        )]
    );
    assert_eq!(r.ram_size(), Some(256 * MIB));
    let json = r.to_json();
    assert_eq!(
        json["fds"][1],
        serde_json::json!({"fd": 32, "option": "netdev", "key": "fd", "id": "hostnet0"})
    );
    assert_eq!(json["monitors"][0]["socket"], "fd:28");
    assert_eq!(json["machine"]["type"], "pc-i440fx-7.2");
}

#[test]
fn libvirt_probe_socket() {
    let r = of(libvirt_probe());
    let qmp = sock(
        "qmp",
        None,
        unix("/var/lib/libvirt/qemu/qmp-x1/qmp.monitor"),
        true,
    );
    assert_eq!(r.sockets, std::slice::from_ref(&qmp));
    let address = "unix:/var/lib/libvirt/qemu/qmp-x1/qmp.monitor,server=on,wait=off";
    assert_eq!(
        r.monitors,
        [monitor("qmp", MonitorMode::Qmp, None, address, Some(qmp))]
    );
    let machine = Machine {
        type_: Some("none".into()),
        accel: Some("kvm:tcg".into()),
        ..Machine::default()
    };
    assert_eq!(r.machine, Some(machine));
    assert!(r.fds.is_empty() && r.memory.is_empty());
    assert_eq!(r.ram_size(), None);
}

#[test]
fn script_vm() {
    let r = of(script());
    assert_eq!((r.fds.len(), r.sockets.len()), (0, 0));
    let m = Memory {
        option: "m".into(),
        size: Some(2048 * MIB),
        ..Memory::default()
    };
    assert_eq!(r.memory, [m]);
    assert_eq!(
        r.machine,
        Some(Machine {
            accel: Some("kvm".into()),
            ..Machine::default()
        })
    );
    assert_eq!(
        r.monitors,
        [monitor("serial", MonitorMode::Hmp, None, "mon:stdio", None)]
    );
    assert_eq!(of(args(&["-S"])), Resources::default());
}

#[test]
fn sockets_and_numa() {
    let r = of(script_sockets());
    assert!(r.fds.is_empty());
    let qmp = sock("qmp", None, unix("/run/vm1/qmp.sock"), true);
    let pretty = sock("qmp-pretty", None, tcp("127.0.0.1", "4445"), true);
    let telnet = sock("monitor", None, tcp("127.0.0.1", "4444"), true);
    let hmp1 = sock("chardev", Some("hmp1"), unix("/run/vm1/hmp,1.sock"), true);
    let con0 = sock("chardev", Some("con0"), tcp("0.0.0.0", "5555"), true);
    let gdb = sock("gdb", None, tcp("", "1234"), true);
    assert_eq!(
        r.sockets,
        [
            qmp.clone(),
            pretty.clone(),
            telnet.clone(),
            hmp1.clone(),
            con0,
            gdb
        ]
    );
    let m = Memory {
        option: "m".into(),
        size: Some(1024 * MIB),
        slots: Some(4),
        maxmem: Some(4096 * MIB),
        ..Memory::default()
    };
    let mem0 = Memory {
        share: Some(true),
        hugepages: true,
        numa_nodes: vec!["0".into()],
        ..object("mem0", "memory-backend-memfd", 512 * MIB)
    };
    let mem1 = Memory {
        share: Some(false),
        mem_path: Some("/dev/hugepages/vm1".into()),
        hugepages: true,
        numa_nodes: vec!["1".into()],
        ..object("mem1", "memory-backend-file", 512 * MIB)
    };
    assert_eq!(r.memory, [m, mem0, mem1]);
    assert_eq!(r.ram_size(), Some(1024 * MIB));
    assert_eq!(
        r.machine,
        Some(Machine {
            type_: Some("q35".into()),
            accel: Some("kvm:tcg".into()),
            ..Machine::default()
        })
    );
    assert_eq!(
        r.monitors,
        [
            monitor(
                "qmp",
                MonitorMode::Qmp,
                None,
                "unix:/run/vm1/qmp.sock,server=on,wait=off",
                Some(qmp)
            ),
            monitor(
                "qmp-pretty",
                MonitorMode::Qmp,
                None,
                "tcp:127.0.0.1:4445,server=on,wait=off",
                Some(pretty)
            ),
            monitor(
                "monitor",
                MonitorMode::Hmp,
                None,
                "telnet:127.0.0.1:4444,server,nowait",
                Some(telnet)
            ),
            monitor("mon", MonitorMode::Hmp, Some("hmp1"), "hmp1", Some(hmp1)),
        ]
    );
}

#[test]
fn fds_everywhere() {
    let r = of(script_fds());
    assert_eq!(
        r.fds,
        [
            fd(5, "netdev", "addr.str", Some("s0")),
            fd(6, "netdev", "local.str", Some("d0")),
            fd(7, "netdev", "fds", Some("t0")),
            fd(8, "netdev", "fds", Some("t0")),
            fd(9, "netdev", "vhostfds", Some("t0")),
            fd(10, "netdev", "vhostfds", Some("t0")),
            fd(13, "device", "vhostfd", None),
            fd(12, "chardev", "fd", Some("c0")),
            fd(14, "object", "mem-path", Some("shared")),
            fd(11, "incoming", "uri", None),
        ]
    );
    let c0 = sock("chardev", Some("c0"), SocketAddr::Fd(12), true);
    assert_eq!(
        r.sockets,
        [
            sock("netdev", Some("s0"), SocketAddr::Fd(5), false),
            c0.clone()
        ]
    );
    let m = Memory {
        option: "m".into(),
        size: Some(512 * MIB),
        mem_path: Some("/dev/hugepages".into()),
        hugepages: true,
        prealloc: true,
        ..Memory::default()
    };
    let shared = Memory {
        share: Some(true),
        mem_path: Some("/proc/self/fd/14".into()),
        ..object("shared", "memory-backend-file", 64 * MIB)
    };
    assert_eq!(r.memory, [m, shared]);
    assert_eq!(
        r.machine,
        Some(Machine {
            type_: Some("pc".into()),
            accel: Some("kvm:tcg".into()),
            ..Machine::default()
        })
    );
    assert_eq!(
        r.monitors,
        [monitor("mon", MonitorMode::Hmp, Some("c0"), "c0", Some(c0))]
    );
}

#[test]
fn json_sockets_and_fds() {
    let r = of(args(&[
        "-netdev",
        r#"{"type":"stream","id":"j0","server":true,"addr":{"type":"fd","str":40}}"#,
        "-netdev",
        r#"{"type":"vhost-vdpa","id":"v0","vhostfds":"41:42"}"#,
        "-chardev",
        r#"{"id":"q0","backend":{"type":"socket","data":{"addr":{"type":"fd","data":{"str":"43"}},"server":true}}}"#,
        "-netdev",
        "socket,id=l0,listen=:5000",
        "-object",
        r#"{"qom-type":"iommufd","id":"iommufd0","fd":"44"}"#,
        "-monitor",
        "none",
        "-parallel",
        "mon:unix:/run/p.sock,server=on,wait=off",
    ]));
    assert_eq!(
        r.fds,
        [
            fd(40, "netdev", "addr.str", Some("j0")),
            fd(41, "netdev", "vhostfds", Some("v0")),
            fd(42, "netdev", "vhostfds", Some("v0")),
            fd(43, "chardev", "backend.data.addr.data.str", Some("q0")),
            fd(44, "object", "fd", Some("iommufd0")),
        ]
    );
    let p = sock("parallel", None, unix("/run/p.sock"), true);
    assert_eq!(
        r.sockets,
        [
            sock("netdev", Some("j0"), SocketAddr::Fd(40), true),
            sock("chardev", Some("q0"), SocketAddr::Fd(43), true),
            sock("netdev", Some("l0"), tcp("", "5000"), true),
            p.clone(),
        ]
    );
    let address = "mon:unix:/run/p.sock,server=on,wait=off";
    assert_eq!(
        r.monitors,
        [monitor(
            "parallel",
            MonitorMode::Hmp,
            None,
            address,
            Some(p)
        )]
    );
}

#[test]
fn sizes() {
    for (s, mib, want) in [
        ("256", true, Some(256 * MIB)),
        ("256", false, Some(256)),
        ("2G", true, Some(2048 * MIB)),
        ("1.5g", false, Some(1536 * MIB)),
        ("512M", false, Some(512 * MIB)),
        ("4k", false, Some(4096)),
        ("1T", false, Some(1 << 40)),
        ("100b", true, Some(100)),
        ("0x1000", false, Some(4096)),
        ("1.5", false, None),
        ("", false, None),
        ("G", false, None),
        ("12Q", false, None),
        ("1GB", false, None),
        ("-1", false, None),
        ("16E", false, None),
    ] {
        assert_eq!(parse_size(s, mib), want, "{s:?} mib={mib}");
    }
}
