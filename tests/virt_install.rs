//! The VM hosts run, upgraded the way hosts get security updates: the domain exactly as
//! `virt-install --print-xml --import --osinfo debian11` writes it at test time (q35, no HPET,
//! a pty console, a guest-agent channel, balloon, RNG, virtio video; SPICE with its spicevmc
//! channel, USB redirectors and sound, or `--graphics vnc`), booted straight into the Linux
//! test guest, under libvirtd with Debian's packaged `qemu.conf` and virtlogd (the shim runs
//! as `libvirt-qemu`). It starts on QEMU 7.2.18, the binary the `.real` link names (libvirt
//! 9.0 cannot probe 10.0.2, so the domain cannot start there), and is upgraded by SIGUSR2 to
//! the pid libvirt tracks, the link repointed first as a package upgrade replaces the file:
//! 7.2.18 -> 7.2.22 -> 10.0.2 -> 7.2.22.
//!
//! Checked before the first upgrade and after each: the version on libvirt's own monitor
//! connection, `virsh domstate` running throughout (polled every 20 ms), the guest's `STAT`
//! lines on the pty console numbered with none lost, doubled or torn, the display port
//! answering its protocol (an RFB handshake, or SPICE's link), the guest agent's socket
//! accepting, the new vCPU 0 thread in libvirt's `vcpu0` cgroup, and root's
//! `qemu-liveupgrade status NAME`.
//!
//! What virt-install writes is changed only where a test machine must differ; see
//! [`qemu_liveupgrade_tests::virt_install`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qemu_liveupgrade_tests::libvirt::{
    domain_dir, ensure_libvirtd, install_emulator, reachable_copy, unique_name, Domain,
};
use qemu_liveupgrade_tests::libvirt_upgrade::{assert_packaged_setup, upgrade_by_signal};
use qemu_liveupgrade_tests::linux::{check_status_lines, create_disk, linux_guest, Console};
use qemu_liveupgrade_tests::liveupgrade::version;
use qemu_liveupgrade_tests::qemu_build;
use qemu_liveupgrade_tests::viewers::{rfb_handshake, spice_link};
use qemu_liveupgrade_tests::virt_install::{
    agent_accepts, edit, live_devices, print_xml, Edits, Graphics, LiveDevices,
};
use serde_json::Value;

/// Where the domain starts: Debian 12's security suite, what `apt` installed.
const START: &str = "7.2.18";
/// The upgrades: the point release, backports, and back to the point release.
const CHAIN: [&str; 3] = ["7.2.22", "10.0.2", "7.2.22"];
/// The guest's kernel command line: its serial console on ttyS0 (the pty), no network
/// address (the tap libvirt makes stays silent), a panic ends the guest.
const CMDLINE: &str = "console=ttyS0 quiet cryptomgr.notests panic=-1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// `STAT` lines (about 10 a second) the guest must print after each step.
const STATS_AFTER: u64 = 20;

#[test]
fn virt_install_domain_with_spice_upgrades_live() {
    upgrade_chain(Graphics::Spice);
}

#[test]
fn virt_install_domain_with_vnc_upgrades_live() {
    upgrade_chain(Graphics::Vnc);
}

fn step(graphics: Graphics, what: &str) {
    eprintln!("virt-install {}: {what}", graphics.kind());
}

/// One domain at a time: each runs a 2-vCPU Linux guest under TCG, and two at once on a
/// 2-core machine take as long as one after the other, with every deadline tighter.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn upgrade_chain(graphics: Graphics) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ensure_libvirtd();
    let dir = domain_dir();
    let emulator = install_emulator(dir.path(), Some(&qemu_build(START)));
    for v in CHAIN {
        qemu_build(v);
    }
    let real = dir.join("bin/qemu-system-x86_64.real");
    let guest = linux_guest();
    let kernel = reachable_copy(dir.path(), &guest.kernel);
    let initrd = reachable_copy(dir.path(), &guest.initrd);
    let disk = dir.join("disk.img");
    create_disk(&disk, 16);
    let name = unique_name(&format!("qlu-vi-{}", graphics.kind()));
    let written = print_xml(&name, &disk, graphics);
    let xml = edit(
        &written,
        &Edits {
            emulator: &emulator,
            kernel: &kernel,
            initrd: &initrd,
            cmdline: CMDLINE,
            mem_mib: 256,
        },
    );
    let dom = Domain::define(&name, &xml, &dir.join("no-serial-file"));

    step(graphics, &format!("virsh start {name}"));
    dom.start();
    assert_packaged_setup(dom.pid());
    let live = live_devices(&name, graphics);
    let console = Console::open_pty("pty console", &live.console);
    console.wait_for("READY", BOOT_TIMEOUT, |lines| {
        lines.iter().any(|l| l.contains("READY "))
    });
    let mut stats = check(&dom, &console, &live, graphics, START, 0);
    assert!(
        dom.vcpu_in_libvirt_cgroup(0),
        "libvirt did not put vCPU 0 in a vcpu0 cgroup: {:?}",
        dom.vcpu_cgroups(0)
    );

    let mut from = START;
    for to in CHAIN {
        step(graphics, &format!("SIGUSR2: {from} -> {to}"));
        let up = upgrade_by_signal(&dom, &real, &qemu_build(to));
        step(
            graphics,
            &format!(
                "{from} -> {to}: {} in {:?}, {} domstate polls, vCPU 0 in {:?}",
                up.report["result"],
                up.took,
                up.states.len(),
                up.vcpu0_cgroups
                    .iter()
                    .filter(|l| l.contains("vcpu"))
                    .collect::<Vec<_>>()
            ),
        );
        up.assert_ok(from, to);
        let now = live_devices(&name, graphics);
        assert_eq!(
            now.display_port, live.display_port,
            "the display port moved"
        );
        assert_eq!(now.console, live.console, "the console's pty moved");
        assert!(
            console.path_unchanged(),
            "{} was replaced",
            live.console.display()
        );
        stats = check(&dom, &console, &live, graphics, to, stats);
        from = to;
    }
    step(
        graphics,
        &format!("{stats} STAT lines on the pty, none lost"),
    );
}

/// Everything the test watches, on QEMU `version`: libvirt's connection, the pty console
/// (`STAT_AFTER` more lines after the `seen` counted so far, all of them in order), the
/// display, the guest agent socket. Returns the `STAT` lines seen.
fn check(
    dom: &Domain,
    console: &Console,
    live: &LiveDevices,
    graphics: Graphics,
    version_now: &str,
    seen: u64,
) -> u64 {
    assert_eq!(
        version(&dom.qmp_ok("query-version", Value::Null)),
        version_now,
        "version through libvirt's monitor connection"
    );
    let start = Instant::now();
    console.wait_for(
        &format!("{STATS_AFTER} more STAT lines"),
        BOOT_TIMEOUT,
        |lines| {
            check_status_lines(lines).is_ok_and(|s| s.stats >= seen + STATS_AFTER)
                || check_status_lines(lines).is_err()
        },
    );
    let status = check_status_lines(&console.lines()).unwrap_or_else(|e| {
        panic!(
            "the pty console on {version_now}, {:?} after the step: {e}",
            start.elapsed()
        )
    });
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, live.display_port));
    match graphics {
        Graphics::Vnc => {
            rfb_handshake(addr).unwrap_or_else(|e| panic!("VNC on {addr} ({version_now}): {e}"));
        }
        Graphics::Spice => {
            let code =
                spice_link(addr).unwrap_or_else(|e| panic!("SPICE on {addr} ({version_now}): {e}"));
            assert_eq!(code, 0, "SPICE link refused on {addr} ({version_now})");
        }
    }
    agent_accepts(&live.agent).unwrap_or_else(|e| panic!("guest agent ({version_now}): {e}"));
    status.stats
}
