//! A VM's TCP listeners across live upgrades, 7.2.22 -> 10.0.2 -> 7.2.22.
//!
//! A script VM as people run one on a laptop: the Linux test guest with user-mode networking
//! forwarding a loopback port to its echo service (`hostfwd=tcp:127.0.0.1:PORT-:7`), a VNC
//! display on `127.0.0.1:N` and a QMP monitor on a TCP port. After each upgrade the same QMP
//! connection answers (from the new QEMU), a VNC viewer's RFB handshake is answered on the
//! same port, and a new connection through the forward reaches the guest. What the plan warns
//! of is checked too: a viewer and a forwarded connection open during the upgrade are ended.
//!
//! And a SPICE VM with libvirt's own `-spice` options: the SPICE link handshake is answered on
//! the same port after each upgrade.
//!
//! Everything listens on 127.0.0.1; the guest's network is QEMU's own user-mode stack.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::linux::{linux_guest, Console};
use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::plan_json;
use qemu_liveupgrade_tests::viewers::{
    free_port, free_vnc_display, rfb_handshake, rfb_login, spice_link, TcpQmp,
};
use qemu_liveupgrade_tests::{system_qemu, wait_until};
use serde_json::json;

/// Boot to READY under TCG takes 3-5 s on an idle machine; CI machines are shared.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// The guest's address on QEMU's user-mode network (its default 10.0.2.0/24).
const GUEST_IP: &str = "10.0.2.15";

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The ports one script VM listens on.
struct Ports {
    vnc_display: u16,
    forward: u16,
    qmp: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports {
            vnc_display: free_vnc_display(),
            forward: free_port(),
            qmp: free_port(),
        }
    }

    fn vnc(&self) -> SocketAddr {
        local(5900 + self.vnc_display)
    }
}

/// The Linux guest on q35 with a VGA display on VNC, a virtio NIC on user-mode networking
/// forwarding `ports.forward` to the echo service, QMP on `ports.qmp`, and its serial console
/// on a unix socket at `serial`. No disk: the guest's disk writer is off.
fn script_argv(ports: &Ports, serial: &str) -> Vec<String> {
    let guest = linux_guest();
    let append = format!(
        "console=ttyS0 quiet cryptomgr.notests panic=-1 guest_ip={GUEST_IP}/24 disk_writer=0"
    );
    [
        "-accel".to_owned(),
        "tcg".into(),
        "-machine".into(),
        "q35".into(),
        "-m".into(),
        "256".into(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-device".into(),
        "VGA".into(),
        "-vnc".into(),
        format!("127.0.0.1:{}", ports.vnc_display),
        "-chardev".into(),
        format!("socket,id=con0,path={serial},server=on,wait=off"),
        "-serial".into(),
        "chardev:con0".into(),
        "-kernel".into(),
        guest.kernel.display().to_string(),
        "-initrd".into(),
        guest.initrd.display().to_string(),
        "-append".into(),
        append,
        "-netdev".into(),
        format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{}-{GUEST_IP}:7",
            ports.forward
        ),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
        "-qmp".into(),
        format!("tcp:127.0.0.1:{},server=on,wait=off", ports.qmp),
    ]
    .to_vec()
}

/// Opens a connection through the forward to the guest's echo service. Right after an
/// upgrade the forward is back once the upgrade reported, so this does not retry.
fn echo_connection(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to the forward on port {port}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

/// One line through the forward and back.
fn echo(stream: &mut TcpStream, line: &str) -> std::io::Result<String> {
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut back = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut back)?;
    Ok(back)
}

/// Whether a connection has ended: EOF or an error on the next read, within the timeout.
fn ended(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(b"after\n");
    let mut buf = [0u8; 64];
    let until = Instant::now() + IO_TIMEOUT;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            // The echo of a line sent before the end may still come.
            Ok(_) if Instant::now() < until => continue,
            Ok(_) => return false,
        }
    }
}

/// Everything the script VM's users rely on, on the QEMU of `version`.
fn check_script_vm(qmp: &mut TcpQmp, ports: &Ports, version: &str) {
    let v = qmp
        .execute("query-version", json!({}))
        .unwrap_or_else(|e| panic!("query-version on the TCP monitor: {e}"));
    let got = format!(
        "{}.{}.{}",
        v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
    );
    assert_eq!(got, version, "the TCP monitor's QEMU");

    let init = rfb_handshake(ports.vnc())
        .unwrap_or_else(|e| panic!("RFB handshake on {} with {version}: {e}", ports.vnc()));
    assert!(init.width > 0 && init.height > 0, "{init:?}");
    let info = qmp.execute("query-vnc", json!({})).expect("query-vnc");
    assert_eq!(
        (&info["host"], &info["service"], &info["family"]),
        (
            &json!("127.0.0.1"),
            &json!((5900 + ports.vnc_display).to_string()),
            &json!("ipv4")
        ),
        "query-vnc on {version}: {info}"
    );

    let mut conn = echo_connection(ports.forward);
    let line = format!("through the forward on {version}");
    let back = echo(&mut conn, &line).unwrap_or_else(|e| panic!("echo on {version}: {e}"));
    assert_eq!(back.trim_end(), line);
}

#[test]
fn script_vm_keeps_vnc_hostfwd_and_tcp_qmp_across_upgrades() {
    let ports = Ports::pick();
    let dir = qemu_liveupgrade_tests::tempdir();
    let serial = dir.join("serial.sock");
    let argv = script_argv(&ports, serial.to_str().expect("utf-8"));

    // The plan keeps all three, and says what an upgrade ends.
    let p = plan_json(&system_qemu(), &argv);
    assert_eq!(p["verdict"]["upgradable"], true, "{}", p["verdict"]);
    let caveats: Vec<&str> = p["verdict"]["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|c| c["option"].as_str())
        .collect();
    assert_eq!(
        caveats,
        [
            "-vnc".to_owned(),
            format!("hostfwd=tcp:127.0.0.1:{}-{GUEST_IP}:7", ports.forward)
        ]
    );
    assert_eq!(
        p["displays_held_by_launcher"],
        json!([{"protocol": "vnc", "listen": format!("tcp:127.0.0.1:{}", 5900 + ports.vnc_display)}])
    );

    // Paused at start, so that the console reader is there before the guest's first line.
    let vm = UpgradeVm::start_with("7.2.22", argv, &["-S"], &[]);
    let console = Console::connect("serial", &serial, READY_TIMEOUT);
    let mut qmp = TcpQmp::connect(local(ports.qmp), READY_TIMEOUT);
    qmp.execute("cont", json!({})).expect("cont");
    console.wait_for("READY", READY_TIMEOUT, |lines| {
        lines.iter().any(|l| l.contains("READY ip="))
    });
    check_script_vm(&mut qmp, &ports, "7.2.22");

    for version in ["10.0.2", "7.2.22"] {
        // Held open across the upgrade: the plan says both end.
        let mut forwarded = echo_connection(ports.forward);
        assert!(echo(&mut forwarded, "before").is_ok());
        let mut viewer = TcpStream::connect(ports.vnc()).expect("viewer");
        viewer.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut hello = [0u8; 12];
        viewer.read_exact(&mut hello).expect("RFB greeting");

        vm.install(version);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "upgrade to {version}: {report}");
        assert_eq!(
            report["hostfwd"],
            json!({"forwards": 1, "problems": []}),
            "{report}"
        );
        check_script_vm(&mut qmp, &ports, version);
        assert!(
            ended(&mut forwarded),
            "a forwarded connection outlived {version}'s upgrade"
        );
        assert!(
            ended(&mut viewer),
            "a VNC viewer outlived {version}'s upgrade"
        );
        let before = console.lines().len();
        wait_until(READY_TIMEOUT, "the guest's status lines to go on", || {
            console.lines().len() > before + 3
        });
    }
}

/// libvirt's `-spice` for a virt-install domain (FACTS: "What real hosts run"), on a free
/// port.
fn spice_args(port: u16) -> String {
    format!(
        "port={port},addr=127.0.0.1,disable-ticketing=on,image-compression=off,seamless-migration=on"
    )
}

/// The SPICE server answers a client's link on `port`, and `query-spice` reports that port.
fn check_spice(vm: &UpgradeVm, qmp: &mut qemu_liveupgrade_tests::Qmp, port: u16, version: &str) {
    let error = spice_link(local(port))
        .unwrap_or_else(|e| panic!("SPICE link on port {port} with {version}: {e}"));
    assert_eq!(error, 0, "SpiceLinkReply error with {version}");
    let info = qmp.execute("query-spice", json!({}));
    assert_eq!(
        (&info["enabled"], &info["host"], &info["port"]),
        (&json!(true), &json!("127.0.0.1"), &json!(port)),
        "query-spice on {version}: {info}"
    );
    vm.assert_guest_healthy(200);
}

#[test]
fn spice_link_is_answered_on_the_same_port_across_upgrades() {
    let port = free_port();
    let spice = spice_args(port);
    let vm = UpgradeVm::start("7.2.22", 64, &["-spice", &spice, "-vga", "qxl"]);
    let mut qmp = vm.connect();
    check_spice(&vm, &mut qmp, port, "7.2.22");
    for version in ["10.0.2", "7.2.22"] {
        vm.install(version);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "upgrade to {version}: {report}");
        check_spice(&vm, &mut qmp, port, version);
    }
}

/// A VNC password set through a monitor, as libvirt sets `<graphics passwd=...>` once after
/// start, lets a viewer in on every later QEMU, and a wrong one does not.
#[test]
fn a_vnc_password_set_at_run_time_outlives_upgrades() {
    let display = free_vnc_display();
    let vnc = format!("127.0.0.1:{display},password=on");
    let vm = UpgradeVm::start("7.2.22", 64, &["-vnc", &vnc, "-vga", "std"]);
    let mut qmp = vm.connect();
    let addr = local(5900 + display);
    qmp.execute(
        "set_password",
        json!({"protocol": "vnc", "password": "s3cret", "connected": "keep"}),
    );
    let check = |version: &str| {
        rfb_login(addr, Some("s3cret"))
            .unwrap_or_else(|e| panic!("the password on {version}: {e}"));
        let wrong = rfb_login(addr, Some("guess")).expect_err("a wrong password let in");
        assert_eq!(
            wrong.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{wrong}"
        );
    };
    check("7.2.22");
    for version in ["10.0.2", "7.2.22"] {
        vm.install(version);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "upgrade to {version}: {report}");
        check(version);
    }
}
