//! `qemu-liveupgrade plan` on real libvirt and script command lines: every fd, socket, memory
//! object and monitor listed, and the argv generation 1 gets.

use std::collections::BTreeMap;
use std::process::Command;

use qemu_liveupgrade_tests::shim::{cli_json, QEMU_NAME};
use qemu_liveupgrade_tests::{cli_bin, system_qemu};
use serde_json::{json, Value};

fn plan(args: &[&str]) -> Value {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["plan", "--json", "--"])
        .args(args)
        .env("QEMU_LIVEUPGRADE_BINARY", system_qemu())
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent");
    cli_json(cmd, "plan")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// Checks the private monitor at the end of a planned argv, and returns its fd.
fn planned_private_monitor(plan: &Value) -> i64 {
    let argv = strings(&plan["argv"]);
    let fd = plan["private_monitor_fd"]
        .as_i64()
        .expect("private_monitor_fd");
    assert_eq!(
        argv[argv.len() - 4..],
        [
            "-chardev".to_string(),
            format!("socket,id=qemu-liveupgrade-qmp,fd={fd}"),
            "-mon".to_string(),
            "chardev=qemu-liveupgrade-qmp,mode=control".to_string(),
        ],
        "{argv:?}"
    );
    assert!(
        !argv.iter().any(|a| a == "-daemonize" || a == "-pidfile"),
        "{argv:?}"
    );
    fd
}

const LIBVIRT_DOMAIN: &[&str] = &[
    "-name",
    "guest=hb1,debug-threads=on",
    "-S",
    "-object",
    r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-hb1/master-key.aes"}"#,
    "-machine",
    "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel",
    "tcg",
    "-m",
    "256",
    "-object",
    r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#,
    "-overcommit",
    "mem-lock=off",
    "-smp",
    "1,sockets=1,cores=1,threads=1",
    "-uuid",
    "0b3c6a3e-5ab1-4d0e-9d51-7a4f4a3a1c11",
    "-no-user-config",
    "-nodefaults",
    "-chardev",
    "socket,id=charmonitor,fd=28,server=on,wait=off",
    "-mon",
    "chardev=charmonitor,id=monitor,mode=control",
    "-rtc",
    "base=utc",
    "-no-shutdown",
    "-boot",
    "strict=on",
    "-kernel",
    "/var/lib/libvirt/images/heartbeat.elf",
    "-netdev",
    r#"{"type":"tap","fd":"32","id":"hostnet0"}"#,
    "-device",
    r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:6b:3c:58","bus":"pci.0","addr":"0x3"}"#,
    "-add-fd",
    "set=0,fd=27,opaque=serial0-log",
    "-chardev",
    "socket,id=charserial0,fd=26,server=on,wait=off,logfile=/dev/fdset/0,logappend=on",
    "-device",
    r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
    "-audiodev",
    r#"{"id":"audio1","driver":"none"}"#,
    "-sandbox",
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg",
    "timestamp=on",
];

#[test]
fn plan_for_a_libvirt_domain_lists_every_fd_and_keeps_its_argv() {
    let p = plan(LIBVIRT_DOMAIN);
    assert_eq!(
        p["binary"],
        json!({"path": system_qemu().to_string_lossy(), "source": "env"})
    );
    assert_eq!(p["daemonize"], false);
    assert_eq!(p["pidfile"], Value::Null);

    let r = &p["resources"];
    let fds: BTreeMap<i64, (String, Value)> = r["fds"]
        .as_array()
        .expect("resources.fds")
        .iter()
        .map(|f| {
            (
                f["fd"].as_i64().unwrap(),
                (f["option"].as_str().unwrap().to_owned(), f["id"].clone()),
            )
        })
        .collect();
    let want: BTreeMap<i64, (String, Value)> = [
        (26, ("chardev".to_owned(), json!("charserial0"))),
        (27, ("add-fd".to_owned(), Value::Null)),
        (28, ("chardev".to_owned(), json!("charmonitor"))),
        (32, ("netdev".to_owned(), json!("hostnet0"))),
    ]
    .into_iter()
    .collect();
    assert_eq!(fds, want, "{}", r["fds"]);

    assert_eq!(
        r["machine"],
        json!({"type": "pc-i440fx-7.2", "memory_backend": "pc.ram", "accel": "tcg"})
    );
    let monitors = r["monitors"].as_array().expect("monitors");
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    assert_eq!(monitors[0]["mode"], "qmp");
    assert_eq!(monitors[0]["chardev"], "charmonitor");
    assert_eq!(monitors[0]["socket"], "fd:28");
    let ram = r["memory"]
        .as_array()
        .expect("memory")
        .iter()
        .find(|m| m["id"] == "pc.ram")
        .unwrap_or_else(|| panic!("pc.ram not among {}", r["memory"]));
    assert_eq!(ram["backend"], "memory-backend-ram");
    assert_eq!(ram["size"], 256u64 << 20);

    // Guest RAM moves onto a memfd the launcher owns, and the launcher serves the monitor
    // and serial sockets itself; each generation gets fds the command line leaves free.
    let memfds = p["guest_ram"]["memfds"].as_array().expect("memfds");
    assert_eq!(p["guest_ram"]["shared"], true);
    assert_eq!(memfds.len(), 1, "{memfds:?}");
    assert_eq!(memfds[0]["id"], "pc.ram");
    assert_eq!(memfds[0]["size"], 256u64 << 20);
    let ram_fd = memfds[0]["fd"].as_i64().unwrap();
    let served = served(&p);
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["fd:26", "fd:28"],
        "{}",
        p["served_by_launcher"]
    );
    let (monitor_mode, monitor_gen_fd) = served["fd:28"].clone();
    let (serial_mode, serial_gen_fd) = served["fd:26"].clone();
    assert_eq!(
        (monitor_mode.as_str(), serial_mode.as_str()),
        ("qmp", "raw")
    );
    let private_fd = planned_private_monitor(&p);
    let mut ours = vec![ram_fd, private_fd, monitor_gen_fd, serial_gen_fd];
    for fd in &ours {
        assert!(
            *fd > 2 && !want.contains_key(fd),
            "launcher fd {fd} clashes"
        );
    }
    ours.sort_unstable();
    ours.dedup();
    assert_eq!(ours.len(), 4, "launcher fds not distinct");

    // Generation 1 runs the user's argv word for word, but for the RAM backend and the fds
    // of the sockets the launcher serves.
    let argv = strings(&p["argv"]);
    assert_eq!(argv[0], QEMU_NAME);
    let body = &argv[1..argv.len() - 4];
    assert_eq!(body.len(), LIBVIRT_DOMAIN.len(), "{argv:?}");
    for (i, (got, want)) in body.iter().zip(LIBVIRT_DOMAIN).enumerate() {
        if want.contains("memory-backend-ram") {
            let obj: Value = serde_json::from_str(got).unwrap();
            assert_eq!(
                obj,
                json!({
                    "qom-type": "memory-backend-file",
                    "id": "pc.ram",
                    "size": 268435456u64,
                    "mem-path": format!("/proc/self/fd/{ram_fd}"),
                    "share": true,
                })
            );
        } else {
            let want = want
                .replace(
                    "id=charmonitor,fd=28,",
                    &format!("id=charmonitor,fd={monitor_gen_fd},"),
                )
                .replace(
                    "id=charserial0,fd=26,",
                    &format!("id=charserial0,fd={serial_gen_fd},"),
                );
            assert_eq!(*got, want, "word {i} of the user's argv");
        }
    }
}

/// `served_by_launcher` of a plan: listen address -> (mode, fd each generation listens on).
fn served(plan: &Value) -> BTreeMap<String, (String, i64)> {
    plan["served_by_launcher"]
        .as_array()
        .unwrap_or_else(|| panic!("no served_by_launcher in {plan}"))
        .iter()
        .map(|s| {
            (
                s["listen"].as_str().expect("listen").to_owned(),
                (
                    s["mode"].as_str().expect("mode").to_owned(),
                    s["generation_fd"].as_i64().expect("generation_fd"),
                ),
            )
        })
        .collect()
}

/// Whether `argv` has `-chardev` with a socket server on `fd`, as the launcher gives QEMU for
/// a socket it serves.
fn has_generation_socket(argv: &[String], fd: i64) -> bool {
    argv.windows(2).any(|w| {
        w[0] == "-chardev"
            && w[1].starts_with("socket,")
            && w[1].split(',').any(|kv| kv == format!("fd={fd}"))
            && w[1].split(',').any(|kv| kv == "server=on")
    })
}

#[test]
fn plan_for_libvirts_probe_drops_daemonize_and_pidfile() {
    let p = plan(&[
        "-S",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "-machine",
        "none,accel=tcg",
        "-qmp",
        "unix:/var/lib/libvirt/qemu/qmp-x/qmp.monitor,server=on,wait=off",
        "-pidfile",
        "/var/lib/libvirt/qemu/qmp-x/qmp.pid",
        "-daemonize",
    ]);
    assert_eq!(p["daemonize"], true);
    assert_eq!(p["pidfile"], "/var/lib/libvirt/qemu/qmp-x/qmp.pid");
    planned_private_monitor(&p);
    let address = "unix:/var/lib/libvirt/qemu/qmp-x/qmp.monitor";
    let sockets = p["resources"]["sockets"].as_array().expect("sockets");
    assert!(
        sockets
            .iter()
            .any(|s| s["address"] == address && s["server"] == true),
        "{sockets:?}"
    );
    // The launcher binds libvirt's path; QEMU must not, or it would race it for clients.
    let (mode, fd) = served(&p)
        .remove(address)
        .unwrap_or_else(|| panic!("{address} not served: {}", p["served_by_launcher"]));
    assert_eq!(mode, "qmp");
    let argv = strings(&p["argv"]);
    assert!(!argv.iter().any(|a| a.contains("qmp.monitor")), "{argv:?}");
    assert!(has_generation_socket(&argv, fd), "{argv:?}");
}

#[test]
fn plan_for_a_script_lists_its_socket_and_memory() {
    let args = [
        "-m",
        "512",
        "-drive",
        "file=disk.img,if=virtio",
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-qmp",
        "unix:/tmp/q.sock,server=on,wait=off",
        "-serial",
        "mon:stdio",
    ];
    let p = plan(&args);
    let r = &p["resources"];
    assert_eq!(r["fds"], json!([]), "no fds in this command line");
    let sockets = r["sockets"].as_array().expect("sockets");
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert_eq!(sockets[0]["option"], "qmp");
    assert_eq!(sockets[0]["address"], "unix:/tmp/q.sock");
    assert_eq!(sockets[0]["server"], true);
    let memory = r["memory"].as_array().expect("memory");
    assert!(
        memory
            .iter()
            .any(|m| m["option"] == "m" && m["size"] == 512u64 << 20),
        "{memory:?}"
    );
    let monitors = r["monitors"].as_array().expect("monitors");
    assert!(
        monitors
            .iter()
            .any(|m| m["mode"] == "qmp" && m["socket"] == "unix:/tmp/q.sock"),
        "{monitors:?}"
    );
    assert!(
        monitors
            .iter()
            .any(|m| m["option"] == "serial" && m["address"] == "mon:stdio"),
        "{monitors:?}"
    );
    let memfds = p["guest_ram"]["memfds"].as_array().expect("memfds");
    assert_eq!(memfds.len(), 1, "{memfds:?}");
    assert_eq!(memfds[0]["size"], 512u64 << 20);

    // The socket is the launcher's to serve; QEMU gets one of its own in place of the path.
    let (mode, fd) = served(&p)
        .remove("unix:/tmp/q.sock")
        .unwrap_or_else(|| panic!("/tmp/q.sock not served: {}", p["served_by_launcher"]));
    assert_eq!(mode, "qmp");
    let argv = strings(&p["argv"]);
    assert_eq!(argv[0], QEMU_NAME);
    assert!(!argv.iter().any(|a| a.contains("/tmp/q.sock")), "{argv:?}");
    assert!(has_generation_socket(&argv, fd), "{argv:?}");
    // The tap named tap0 is opened by the launcher and reaches QEMU by fd.
    let taps = p["taps_opened_by_launcher"].as_array().expect("taps");
    assert_eq!(taps.len(), 1, "{taps:?}");
    assert_eq!(taps[0]["ifname"], "tap0");
    let tap_fd = taps[0]["fds"][0].as_i64().expect("tap fd");
    let tap_word = format!("tap,id=n0,fd={tap_fd}");
    // Every other word of the user's, in the user's order.
    let mut rest = argv[1..].iter();
    for word in args
        .iter()
        .filter(|a| !a.starts_with("-qmp") && !a.contains("q.sock"))
        .map(|a| {
            if a.starts_with("tap,") {
                tap_word.as_str()
            } else {
                *a
            }
        })
    {
        assert!(
            rest.any(|a| a == word),
            "{word} missing or out of order in {argv:?}"
        );
    }
    let private_fd = planned_private_monitor(&p);
    let ram_fd = memfds[0]["fd"].as_i64().unwrap();
    let mut ours = vec![ram_fd, private_fd, fd, tap_fd];
    ours.sort_unstable();
    ours.dedup();
    assert_eq!(ours.len(), 4, "launcher fds not distinct");
}
