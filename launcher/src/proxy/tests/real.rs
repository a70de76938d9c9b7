//! The proxy in front of real QEMU processes, when `qemu-system-x86_64` is installed: the
//! backend fd as QEMU takes it, QMP and HMP framing as QEMU really writes them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde_json::json;

use super::{send, H};
use crate::proxy::Mode;

/// A QEMU killed when the test ends, however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// Starts a QEMU with no machine, paused, with a QMP monitor on `fds[0]` and an HMP one on
/// `fds[1]`, passed as libvirt passes them.
fn start(bin: &PathBuf, name: &str, fds: Vec<OwnedFd>) -> Qemu {
    for fd in &fds {
        // The child inherits them at their own numbers; the test drops its copies after.
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    }
    let (q, h) = (fds[0].as_raw_fd(), fds[1].as_raw_fd());
    let child = Command::new(bin)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-name",
            name,
        ])
        .args([
            "-chardev",
            &format!("socket,id=q,fd={q},server=on,wait=off"),
        ])
        .args(["-mon", "chardev=q,mode=control"])
        .args([
            "-chardev",
            &format!("socket,id=h,fd={h},server=on,wait=off"),
        ])
        .args(["-mon", "chardev=h,mode=readline"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Qemu(child)
}

#[test]
fn clients_move_between_real_qemus() {
    let Some(bin) = binary() else {
        eprintln!("qemu-system-x86_64 not installed; skipped");
        return;
    };
    let mut h = H::new(&[Mode::Qmp, Mode::Hmp]);
    let fds = h.proxy.backends_for(1).unwrap();
    let q1 = start(&bin, "g1", fds);
    h.proxy.activate_first(h.poll.registry(), 1).unwrap();

    let mut qmp = h.connect(0);
    assert!(h.msg(&mut qmp).get("QMP").is_some());
    let caps = r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"caps"}"#;
    assert_eq!(h.cmd(&mut qmp, caps), json!({"return": {}, "id": "caps"}));
    let r = h.cmd(&mut qmp, r#"{"execute":"query-name","id":1}"#);
    assert_eq!(r, json!({"return": {"name": "g1"}, "id": 1}));

    let mut hmp = h.connect(1);
    assert!(h.upto(&mut hmp, "(qemu) ").starts_with("QEMU "));
    // QEMU's readline takes CR and LF each as the end of a line: two prompts.
    send(&mut hmp, "info name\r");
    assert!(h.upto(&mut hmp, "(qemu) ").ends_with("g1\r\n(qemu) "));
    assert_eq!(h.upto(&mut hmp, "(qemu) "), "\r\n(qemu) ");

    let fds = h.proxy.backends_for(2).unwrap();
    let _q2 = start(&bin, "g2", fds);
    h.proxy.hold(h.poll.registry());
    send(&mut qmp, r#"{"execute":"query-name","id":2}"#);
    send(&mut hmp, "info name");
    h.prepare(2).unwrap();
    h.until("drained", |h| h.proxy.drained());
    h.proxy.commit(h.poll.registry(), 2);
    drop(q1);

    let r = h.msg(&mut qmp);
    assert_eq!(r, json!({"return": {"name": "g2"}, "id": 2}));
    // OOB was negotiated on the new QEMU too: without it QEMU would call exec-oob
    // "unexpected" rather than judge the command.
    let r = h.cmd(&mut qmp, r#"{"exec-oob":"query-name","id":3}"#);
    assert_eq!(
        r["error"]["desc"],
        "The command query-name does not support OOB"
    );
    let out = h.upto(&mut hmp, "(qemu) ");
    assert!(
        out.ends_with("g2\r\n(qemu) ") && !out.contains("QEMU "),
        "{out:?}"
    );
}

#[test]
fn fds_and_hot_plugs_through_a_real_qemu() {
    use std::os::fd::{AsFd, AsRawFd};

    let Some(bin) = binary() else {
        eprintln!("qemu-system-x86_64 not installed; skipped");
        return;
    };
    let ino = |fd: &dyn AsRawFd| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
    let mut h = H::new(&[Mode::Qmp, Mode::Hmp]);
    let fds = h.proxy.backends_for(1).unwrap();
    let _q = start(&bin, "g1", fds);
    h.proxy.activate_first(h.poll.registry(), 1).unwrap();
    let mut qmp = h.connect(0);
    assert!(h.msg(&mut qmp).get("QMP").is_some());
    h.cmd(&mut qmp, r#"{"execute":"qmp_capabilities"}"#);

    let (_r1, w1) = nix::unistd::pipe().unwrap();
    let getfd = r#"{"execute":"getfd","arguments":{"fdname":"f1"},"id":1}"#;
    super::send_fd(&mut qmp, getfd, w1.as_fd());
    assert_eq!(h.msg(&mut qmp), json!({"return": {}, "id": 1}));
    let (_r2, w2) = nix::unistd::pipe().unwrap();
    let add = r#"{"execute":"add-fd","arguments":{"opaque":"log"},"id":2}"#;
    super::send_fd(&mut qmp, add, w2.as_fd());
    let r = h.msg(&mut qmp);
    let set = r["return"]["fdset-id"].as_i64().expect("add-fd answered");
    let sets = h.cmd(&mut qmp, r#"{"execute":"query-fdsets"}"#);
    assert_eq!(sets["return"][0]["fds"][0]["opaque"], "log", "{sets}");
    let io = r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1"}}"#;
    assert_eq!(h.cmd(&mut qmp, io), json!({"return": {}}));

    let mut hmp = h.connect(1);
    h.upto(&mut hmp, "(qemu) ");
    let (_r3, w3) = nix::unistd::pipe().unwrap();
    super::send_fd(&mut hmp, "getfd f3", w3.as_fd());
    let out = h.upto(&mut hmp, "(qemu) ");
    assert!(!out.contains("Error"), "{out:?}");
    send(&mut hmp, "netdev_add user,id=n1");
    h.upto(&mut hmp, "(qemu) ");
    send(&mut hmp, "netdev_add user,id=n1");
    h.upto(&mut hmp, "(qemu) ");

    let journal = h.proxy.journal();
    let got: Vec<_> = journal
        .entries()
        .iter()
        .map(|e| e.command.as_str())
        .collect();
    assert_eq!(
        got,
        [
            "getfd",
            "add-fd",
            "object-add",
            "getfd",
            "human-monitor-command"
        ]
    );
    assert_eq!(journal.entries()[1].arguments["fdset-id"], set);
    let kept: Vec<u64> = journal
        .entries()
        .iter()
        .flat_map(|e| e.fds.iter().map(|fd| ino(fd)))
        .collect();
    assert_eq!(kept, [ino(&w1), ino(&w2), ino(&w3)]);

    h.cmd(
        &mut qmp,
        r#"{"execute":"closefd","arguments":{"fdname":"f1"}}"#,
    );
    let remove = format!(r#"{{"execute":"remove-fd","arguments":{{"fdset-id":{set}}}}}"#);
    assert_eq!(h.cmd(&mut qmp, &remove), json!({"return": {}}));
    h.cmd(
        &mut qmp,
        r#"{"execute":"object-del","arguments":{"id":"io1"}}"#,
    );
    send(&mut hmp, "closefd f3");
    h.upto(&mut hmp, "(qemu) ");
    send(&mut hmp, "netdev_del n1");
    h.upto(&mut hmp, "(qemu) ");
    let left: Vec<_> = h
        .proxy
        .journal()
        .entries()
        .iter()
        .map(|e| &e.command)
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
