//! Command lines the tests of [`super`] and [`crate::resources`] share.

use std::ffi::OsString;

/// Tokens from string slices.
pub(crate) fn args(tokens: &[&str]) -> Vec<OsString> {
    tokens.iter().map(OsString::from).collect()
}

/// A domain start as libvirt 9.0 runs it (see FACTS.md), completed the way libvirt writes
/// the rest: a secret, JSON -blockdev/-device/-netdev, an fd set for the serial log, a guest
/// agent channel, a passt-style stream netdev, -sandbox and -msg.
#[rustfmt::skip] // One option and its argument a line, as on a command line.
pub(crate) fn libvirt() -> Vec<OsString> {
    args(&[
        "-name", "guest=hb1,debug-threads=on",
        "-S",
        "-object", r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-hb1/master-key.aes"}"#,
        "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel", "tcg",
        "-cpu", "qemu64",
        "-m", "256",
        "-object", r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#,
        "-overcommit", "mem-lock=off",
        "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "6d5f6b2e-4c3a-4c1e-9a57-3c1f0e2b9a11",
        "-no-user-config",
        "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=28,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc",
        "-no-shutdown",
        "-boot", "strict=on",
        "-device", r#"{"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"}"#,
        "-device", r#"{"driver":"virtio-serial-pci","id":"virtio-serial0","bus":"pci.0","addr":"0x6"}"#,
        "-blockdev", r#"{"driver":"file","filename":"/var/lib/libvirt/images/hb1.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
        "-blockdev", r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage"}"#,
        "-device", r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
        "-netdev", r#"{"type":"tap","fd":"32","vhost":true,"vhostfd":"33","id":"hostnet0"}"#,
        "-device", r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56","bus":"pci.0","addr":"0x3"}"#,
        "-netdev", r#"{"type":"stream","addr":{"type":"unix","path":"/run/libvirt/qemu/passt/1-hb1-net1.socket"},"server":false,"reconnect":5,"id":"hostnet1"}"#,
        "-device", r#"{"driver":"virtio-net-pci","netdev":"hostnet1","id":"net1","mac":"52:54:00:12:34:57","bus":"pci.0","addr":"0x7"}"#,
        "-add-fd", "set=0,fd=27,opaque=serial0-log",
        "-chardev", "socket,id=charserial0,fd=26,server=on,wait=off,logfile=/dev/fdset/0,logappend=on",
        "-device", r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        "-chardev", "socket,id=charchannel0,fd=30,server=on,wait=off",
        "-device", r#"{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#,
        "-audiodev", r#"{"id":"audio1","driver":"none"}"#,
        "-vnc", "127.0.0.1:0,audiodev=audio1",
        "-device", r#"{"driver":"cirrus-vga","id":"video0","bus":"pci.0","addr":"0x2"}"#,
        "-device", r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x5"}"#,
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on",
    ])
}

/// A hand-written script's command line: KVM, a disk path with an escaped comma, a tap
/// netdev, the serial console multiplexed with the monitor on stdio, a direct kernel boot.
#[rustfmt::skip]
pub(crate) fn script() -> Vec<OsString> {
    args(&[
        "-enable-kvm",
        "-m", "2G",
        "-smp", "2",
        "-drive", "file=/var/lib/vm/my,,disk.qcow2,if=virtio",
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0",
        "-serial", "mon:stdio",
        "-nographic",
        "-kernel", "bzImage",
        "-append", "console=ttyS0 root=/dev/vda",
    ])
}

/// Monitors and sockets in every legacy spelling, shared RAM on NUMA nodes.
#[rustfmt::skip]
pub(crate) fn script_sockets() -> Vec<OsString> {
    args(&[
        "--machine", "q35,accel=kvm:tcg",
        "-m", "size=1G,slots=4,maxmem=4G",
        "-object", "memory-backend-memfd,id=mem0,size=512M,share=on,hugetlb=on",
        "-object", "memory-backend-file,id=mem1,size=512M,mem-path=/dev/hugepages/vm1,share=off",
        "-numa", "node,nodeid=0,memdev=mem0",
        "-numa", "node,nodeid=1,memdev=mem1",
        "-qmp", "unix:/run/vm1/qmp.sock,server=on,wait=off",
        "-qmp-pretty", "tcp:127.0.0.1:4445,server=on,wait=off",
        "-monitor", "telnet:127.0.0.1:4444,server,nowait",
        "-chardev", "socket,id=hmp1,path=/run/vm1/hmp,,1.sock,server=on,wait=off",
        "-mon", "hmp1",
        "-chardev", "socket,id=con0,host=0.0.0.0,port=5555,server=on,wait=off,telnet=on",
        "-serial", "chardev:con0",
        "-parallel", "none",
        "-gdb", "tcp::1234",
        "-display", "none",
        "-daemonize",
        "-pidfile", "/run/vm1/pid",
    ])
}

/// Inherited fds in every place QEMU takes one.
#[rustfmt::skip]
pub(crate) fn script_fds() -> Vec<OsString> {
    args(&[
        "-M", "pc",
        "-accel", "kvm",
        "-accel", "tcg",
        "-m", "512",
        "-mem-path", "/dev/hugepages",
        "-mem-prealloc",
        "-netdev", "stream,id=s0,server=off,addr.type=fd,addr.str=5",
        "-netdev", "dgram,id=d0,local.type=fd,local.str=6",
        "-netdev", "tap,id=t0,fds=7:8,vhost=on,vhostfds=9:10",
        "-netdev", "socket,id=named,fd=tapfd",
        "-device", "vhost-vsock-pci,guest-cid=3,vhostfd=13",
        "-chardev", "socket,id=c0,fd=12,server=on,wait=off",
        "-mon", "chardev=c0,mode=readline",
        "-object", "memory-backend-file,id=shared,size=64M,mem-path=/proc/self/fd/14,share=on",
        "-incoming", "fd:11",
    ])
}

/// libvirt's capability probe (FACTS.md): no VM of interest, but a real QMP socket.
#[rustfmt::skip]
pub(crate) fn libvirt_probe() -> Vec<OsString> {
    args(&[
        "-S", "-no-user-config", "-nodefaults", "-nographic",
        "-machine", "none,accel=kvm:tcg",
        "-qmp", "unix:/var/lib/libvirt/qemu/qmp-x1/qmp.monitor,server=on,wait=off",
        "-pidfile", "/var/lib/libvirt/qemu/qmp-x1/qmp.pid",
        "-daemonize",
    ])
}
