//! A vhost-user NIC whose socket QEMU serves (`-chardev socket,server=on` + `-netdev
//! vhost-user`) under the shim: the socket stays QEMU's, so the backend gets the fds QEMU
//! sends with SCM_RIGHTS and the VM starts; `plan` says such a VM cannot be upgraded, and an
//! upgrade is refused before anything is tried, the guest running on.

use std::time::Duration;

use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::plan_json;
use qemu_liveupgrade_tests::vhost_user::{Backend, SET_VRING_CALL};
use qemu_liveupgrade_tests::{guest_argv, system_qemu};

/// The heartbeat guest with a virtio NIC on a vhost-user netdev whose socket is at `path`.
fn vhost_user_argv(path: &str) -> Vec<String> {
    let mut argv = guest_argv(64);
    for a in [
        "-chardev",
        &format!("socket,id=vu0,path={path},server=on,wait=off"),
        "-netdev",
        "vhost-user,id=n0,chardev=vu0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ] {
        argv.push(a.to_owned());
    }
    argv
}

#[test]
fn a_vhost_user_backend_gets_qemus_fds_and_the_vm_is_not_upgradable() {
    let dir = qemu_liveupgrade_tests::tempdir();
    let sock = dir.join("vu.sock");
    let sock = sock.to_str().expect("utf-8 path");

    // What the plan says, before anything runs.
    let plan = plan_json(&system_qemu(), &vhost_user_argv(sock));
    assert_eq!(plan["verdict"]["upgradable"], false, "{}", plan["verdict"]);
    let reasons = plan["verdict"]["reasons"].as_array().expect("reasons");
    assert!(
        reasons.iter().any(|b| b["option"]
            .as_str()
            .is_some_and(|o| o.starts_with("-netdev vhost-user"))
            && b["why"].as_str().is_some_and(|r| r.contains("backend"))),
        "{reasons:?}"
    );
    assert!(
        plan["served_by_launcher"]
            .as_array()
            .expect("served")
            .iter()
            .all(|s| s["listen"] != format!("unix:{sock}")),
        "the vhost-user socket must stay QEMU's: {}",
        plan["served_by_launcher"]
    );

    // QEMU waits for its backend before it starts the guest.
    let vm = UpgradeVm::start_with("7.2.22", vhost_user_argv(sock), &["-S"], &[]);
    let backend = Backend::connect(dir.join("vu.sock").as_path(), Duration::from_secs(60));
    let mut qmp = vm.connect();
    qmp.execute("cont", serde_json::json!({}));
    vm.vm.wait_ready(Duration::from_secs(60));
    let calls: Vec<_> = backend
        .messages()
        .into_iter()
        .filter(|m| m.request == SET_VRING_CALL)
        .collect();
    assert!(
        !calls.is_empty(),
        "no SET_VRING_CALL: {:?}",
        backend.messages()
    );
    for call in &calls {
        assert!(
            !call.says_fd || call.fds == 1,
            "a SET_VRING_CALL came without the eventfd it announces: {calls:?}"
        );
    }
    assert!(
        calls.iter().any(|c| c.says_fd),
        "no eventfd passed at all: {calls:?}"
    );

    // An upgrade is refused with the reason, and the guest runs on.
    vm.install("10.0.2");
    let report = vm.upgrade();
    assert_eq!(report["result"], "failed", "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot upgrade this VM") && reason.contains("vhost-user"),
        "{report}"
    );
    assert_eq!(report["generation"], 1);
    vm.assert_guest_healthy(200);
    let status = qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running");
}
