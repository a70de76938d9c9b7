//! Translation against capabilities written down from the Debian builds this project tests
//! (7.2.22 and 10.0.2 `-help` and QMP answers, abridged).

use std::collections::BTreeSet;

use super::probe::MachineType;
use super::*;
use crate::cmdline::testing::{parse, strings};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const COMMON: &[&str] = &[
    "machine",
    "accel",
    "m",
    "smp",
    "name",
    "S",
    "object",
    "device",
    "chardev",
    "mon",
    "netdev",
    "nodefaults",
    "no-user-config",
    "display",
    "nographic",
    "serial",
    "kernel",
    "append",
    "vnc",
    "spice",
    "overcommit",
    "global",
    "rtc",
    "boot",
    "uuid",
    "sandbox",
    "msg",
    "incoming",
    "audiodev",
    "no-shutdown",
    "drive",
    "blockdev",
    "add-fd",
    "qmp",
    "help",
    "h",
];

fn machine(name: &str, alias: Option<&str>) -> MachineType {
    MachineType {
        name: name.into(),
        alias: alias.map(Into::into),
        default: false,
    }
}

/// QEMU 10.0.2 as the probe sees it.
fn qemu10() -> Capabilities {
    let mut options = set(COMMON);
    options.extend(set(&["run-with", "perfmap", "jitdump", "shim"]));
    Capabilities {
        binary: "/usr/bin/qemu-10".into(),
        version: Some("10.0.2".into()),
        options,
        machines: vec![
            machine("pc-i440fx-10.0", Some("pc")),
            machine("pc-i440fx-7.2", None),
            machine("pc-q35-7.2", None),
        ],
        machine_props: Some(set(&[
            "hpet",
            "acpi",
            "usb",
            "memory-backend",
            "dump-guest-core",
        ])),
        devices: [
            ("virtio-blk-pci".to_owned(), Some(set(&["drive", "addr"]))),
            ("qxl-vga".to_owned(), None),
        ]
        .into(),
        objects: [
            ("secret".to_owned(), Some(set(&["data", "file", "format"]))),
            (
                "tcg-accel".to_owned(),
                Some(set(&["tb-size", "one-insn-per-tb"])),
            ),
        ]
        .into(),
    }
}

/// QEMU 7.2.22 as the probe sees it.
fn qemu72() -> Capabilities {
    let mut options = set(COMMON);
    options.extend(set(&[
        "no-hpet",
        "no-acpi",
        "async-teardown",
        "chroot",
        "runas",
        "singlestep",
    ]));
    Capabilities {
        binary: "/usr/bin/qemu-7.2".into(),
        version: Some("7.2.22".into()),
        options,
        machines: vec![
            machine("pc-i440fx-7.2", Some("pc")),
            machine("pc-q35-7.2", Some("q35")),
        ],
        machine_props: Some(set(&["hpet", "acpi", "usb", "memory-backend"])),
        devices: [
            (
                "virtio-blk-pci".to_owned(),
                Some(set(&["drive", "addr", "scsi"])),
            ),
            ("qxl-vga".to_owned(), Some(set(&["ram_size"]))),
        ]
        .into(),
        objects: [
            (
                "secret".to_owned(),
                Some(set(&["data", "file", "format", "loaded"])),
            ),
            ("tcg-accel".to_owned(), Some(set(&["tb-size"]))),
        ]
        .into(),
    }
}

#[test]
fn libvirt_9_argv_for_7_2_runs_on_10_0() {
    let cmd = parse(&[
        "-machine",
        "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel",
        "tcg",
        "-no-hpet",
        "-no-acpi",
        "-S",
    ]);
    let t = translate(&cmd, &qemu10()).unwrap();
    assert_eq!(
        strings(&t.cmd),
        [
            "-machine",
            "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=off",
            "-accel",
            "tcg",
            "-S"
        ]
    );
    let was: Vec<&str> = t.changes.iter().map(|c| c.was.as_str()).collect();
    assert_eq!(was, ["-no-hpet", "-no-acpi"]);
    assert!(
        t.changes[0].now.ends_with("hpet=off,acpi=off"),
        "{:?}",
        t.changes
    );
    assert!(t.changes[0].why.contains("9.0"));
}

#[test]
fn no_machine_option_gets_one() {
    let t = translate(&parse(&["-m", "256", "-no-hpet"]), &qemu10()).unwrap();
    assert_eq!(strings(&t.cmd), ["-m", "256", "-machine", "hpet=off"]);
}

#[test]
fn the_same_binary_changes_nothing() {
    let argv = [
        "-machine",
        "pc-i440fx-7.2,hpet=off",
        "-no-acpi",
        "-device",
        "virtio-blk-pci,drive=d0,scsi=off",
        "-object",
        "secret,id=s0,data=x,loaded=on",
        "-future-option",
        "x",
        "disk.img",
    ];
    let t = translate(&parse(&argv), &qemu72()).unwrap();
    assert!(t.changes.is_empty(), "{:?}", t.changes);
    assert_eq!(strings(&t.cmd), argv);
}

#[test]
fn newer_spellings_go_back_for_7_2() {
    let cmd = parse(&[
        "-run-with",
        "async-teardown=on,chroot=/var/empty,user=qemu",
        "-accel",
        "tcg,one-insn-per-tb=on",
        "-machine",
        "pc-i440fx-7.2",
    ]);
    let t = translate(&cmd, &qemu72()).unwrap();
    assert_eq!(
        strings(&t.cmd),
        [
            "-async-teardown",
            "-chroot",
            "/var/empty",
            "-runas",
            "qemu",
            "-accel",
            "tcg",
            "-singlestep",
            "-machine",
            "pc-i440fx-7.2"
        ]
    );
    assert_eq!(t.changes.len(), 2);
}

#[test]
fn older_spellings_go_forward_for_10_0() {
    let cmd = parse(&[
        "-accel",
        "tcg",
        "-async-teardown",
        "-chroot",
        "/var/empty",
        "-runas",
        "qemu",
        "-singlestep",
        "-device",
        r#"{"driver":"virtio-blk-pci","drive":"d0","scsi":false}"#,
        "-object",
        "secret,id=s0,data=x,loaded=on",
    ]);
    let t = translate(&cmd, &qemu10()).unwrap();
    assert_eq!(
        strings(&t.cmd),
        [
            "-accel",
            "tcg,one-insn-per-tb=on",
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"d0"}"#,
            "-object",
            "secret,id=s0,data=x",
            "-run-with",
            "async-teardown=on,chroot=/var/empty,user=qemu"
        ]
    );
    let was: Vec<&str> = t.changes.iter().map(|c| c.was.as_str()).collect();
    assert_eq!(
        was,
        [
            r#"-device {"driver":"virtio-blk-pci","drive":"d0","scsi":false}"#,
            "-object secret,id=s0,data=x,loaded=on",
            "-async-teardown -chroot /var/empty -runas qemu",
            "-singlestep"
        ]
    );
}

#[test]
fn what_has_no_equivalent_is_refused_by_name() {
    let cmd = parse(&[
        "-machine",
        "pc-i440fx-10.0",
        "-perfmap",
        "-device",
        "qxl-vga,id=video0",
        "-singlestep",
    ]);
    let v = translate(&cmd, &qemu72()).unwrap_err();
    let options: Vec<&str> = v.reasons.iter().map(|r| r.option.as_str()).collect();
    assert_eq!(options, ["-machine pc-i440fx-10.0", "-perfmap"]);
    assert!(v.reasons[0].why.contains("no machine type pc-i440fx-10.0"));
    assert!(v.reasons[1]
        .why
        .starts_with("QEMU 7.2.22 at /usr/bin/qemu-7.2 does not accept it"));
    let cmd = parse(&[
        "-device",
        "qxl-vga,id=video0",
        "-device",
        "virtio-blk-pci,drive=d0,scsi=on",
    ]);
    let v = translate(&cmd, &qemu10()).unwrap_err();
    assert_eq!(v.reasons[0].option, "-device qxl-vga,id=video0");
    assert!(v.reasons[0].why.ends_with("has no device qxl-vga"));
    assert_eq!(
        v.reasons[1].option,
        "-device virtio-blk-pci,drive=d0,scsi=on"
    );
    assert!(v.reasons[1].why.ends_with("has no property scsi"));
    // -singlestep needs an -accel tcg to carry its equivalent.
    let v = translate(&parse(&["-singlestep"]), &qemu10()).unwrap_err();
    assert_eq!(v.reasons[0].option, "-singlestep");
}

#[test]
fn legacy_options_of_qemu_5_and_6() {
    let cmd = parse(&[
        "-accel",
        "tcg",
        "-realtime",
        "mlock=off",
        "-tb-size",
        "256",
        "-sdl",
        "d.img",
    ]);
    let t = translate(&cmd, &qemu10()).unwrap();
    assert_eq!(
        strings(&t.cmd),
        [
            "-accel",
            "tcg,tb-size=256",
            "-overcommit",
            "mem-lock=off",
            "-display",
            "sdl",
            "d.img"
        ]
    );
    let v = translate(&parse(&["-enable-fips"]), &qemu10()).unwrap_err();
    assert_eq!(v.reasons[0].option, "-enable-fips");
}

#[test]
fn questions_name_what_the_argv_uses() {
    let q = questions(
        &parse(&[
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-device",
            r#"{"driver":"virtio-net-pci","id":"n"}"#,
            "-device",
            "e1000-82540em",
            "-object",
            "memory-backend-file,id=r,size=1G,mem-path=/proc/self/fd/9,share=on",
        ]),
        Some("pc-i440fx-7.2"),
    );
    assert_eq!(q.machine.as_deref(), Some("pc-i440fx-7.2"));
    assert_eq!(q.devices, set(&["e1000", "virtio-net-pci"]));
    assert_eq!(q.objects, set(&["memory-backend-file", "tcg-accel"]));
}
