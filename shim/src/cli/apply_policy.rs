//! `qemu-liveupgrade apply-policy`: what the package's dpkg trigger runs, in the background,
//! after a QEMU package was installed or upgraded, and its postinst after this package was.
//!
//! It waits until dpkg and apt are done and reads the policy from the config file. When this
//! package itself was upgraded (`--upgraded-from`), the VMs' launchers come first: it either
//! logs which VMs run an outdated supervisor (`after_self_upgrade` `nothing`) or hands each
//! of them over to the installed shim, one at a time (`upgrade-supervisors`). Then QEMU: it
//! either logs which VMs run an outdated QEMU (`after_qemu_upgrade` `nothing`) or upgrades
//! them all, `max_parallel` at a time (`upgrade-all`). A line per VM and a summary each.

use std::path::Path;

use crate::dpkg;
use crate::log::Log;
use crate::policy::{self, After, AfterSelf, Policy};
use crate::rollout::{self, Vm};
use crate::supervisor;
use launcher::json::JsonExt;

/// Options of `apply-policy`.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Wait for dpkg and apt to release their locks first.
    pub wait_for_dpkg: bool,
    /// The log file.
    pub log: &'a Path,
    /// The version this package was upgraded from, when its postinst runs this: the
    /// supervisors' policy is applied first.
    pub upgraded_from: Option<&'a str>,
}

/// Applies the policy; `Ok(false)` if some VM failed to upgrade.
pub fn run(opts: &Options<'_>, list_vms: impl Fn() -> Vec<Vm>) -> Result<bool, String> {
    let mut log = Log::open(opts.log);
    log.line(&match opts.upgraded_from {
        Some(from) => format!(
            "qemu-liveupgrade: the package qemu-liveupgrade was upgraded from {from} (pid {})",
            std::process::id()
        ),
        None => format!(
            "qemu-liveupgrade: a QEMU package changed (pid {})",
            std::process::id()
        ),
    });
    if opts.wait_for_dpkg {
        let admin = dpkg::admin_dir();
        match dpkg::wait_unlocked(&admin) {
            Ok(waited) => log.line(&format!(
                "qemu-liveupgrade: dpkg is done (waited {:.1} s for its locks in {})",
                waited.as_secs_f64(),
                admin.display()
            )),
            Err(e) => log.line(&format!(
                "qemu-liveupgrade: cannot wait for dpkg's locks in {}: {e}; going on",
                admin.display()
            )),
        }
    }
    let policy = match policy::read(&policy::config_path()) {
        Ok(p) => p,
        Err(e) => {
            log.line(&format!("qemu-liveupgrade: no rollout: {e}"));
            return Err(e);
        }
    };
    let supervisors_ok = match opts.upgraded_from {
        Some(_) => supervisors(&mut log, &policy, list_vms()),
        None => true,
    };
    // Listed again: the status of a VM whose launcher was handed over is the new one's.
    let (outdated, left) = rollout::select(list_vms(), true);
    log.line(&format!(
        "qemu-liveupgrade: policy {} (from {}): {} VM(s) run an outdated QEMU, {} do not",
        policy.after_qemu_upgrade.as_str(),
        policy.config.display(),
        outdated.len(),
        left.len()
    ));
    match policy.after_qemu_upgrade {
        After::Nothing => {
            for vm in &outdated {
                log.line(&format!(
                    "qemu-liveupgrade: {} runs QEMU {} ({}): not upgraded by policy",
                    vm.label(),
                    vm.status.at("/version").as_str().unwrap_or("?"),
                    if vm.status.at("/binary_deleted") == true {
                        "a binary no longer on disk"
                    } else {
                        "not the installed binary"
                    },
                ));
            }
            if !outdated.is_empty() {
                log.line("qemu-liveupgrade: upgrade them with: qemu-liveupgrade upgrade --all --outdated");
            }
            Ok(supervisors_ok)
        }
        After::UpgradeAll => {
            let total = outdated.len();
            let outcomes = rollout::run(&outdated, policy.max_parallel, |o, done| {
                // Each worker logs through its own handle on the same file: appends of one
                // line each, which do not tear.
                Log::open(opts.log).line(&o.progress_line(done, total));
            });
            log.line(&rollout::table(&outcomes, &left));
            log.line(&rollout::to_json(&outcomes, &left, policy.max_parallel).to_string());
            Ok(supervisors_ok && rollout::succeeded(&outcomes))
        }
    }
}

/// The supervisors' part, after this package's own upgrade: every VM whose launcher is not
/// the installed shim is logged, or handed over to it, one at a time. Returns whether no
/// handover failed.
fn supervisors(log: &mut Log, policy: &Policy, vms: Vec<Vm>) -> bool {
    let (outdated, left) = supervisor::select(vms, true);
    log.line(&format!(
        "qemu-liveupgrade: policy after_self_upgrade {} (from {}): {} VM(s) run an outdated supervisor, {} do not",
        policy.after_self_upgrade.as_str(),
        policy.config.display(),
        outdated.len(),
        left.len()
    ));
    match policy.after_self_upgrade {
        AfterSelf::Nothing => {
            for vm in &outdated {
                log.line(&format!(
                    "qemu-liveupgrade: {} runs supervisor {} (build {}), not the installed one: not upgraded by policy",
                    vm.label(),
                    vm.status.at("/supervisor/version").as_str().unwrap_or("?"),
                    vm.status.at("/supervisor/build").as_str().unwrap_or("?"),
                ));
            }
            if !outdated.is_empty() {
                log.line("qemu-liveupgrade: hand them over with: qemu-liveupgrade upgrade --supervisor --all --outdated");
            }
            true
        }
        AfterSelf::UpgradeSupervisors => {
            let asked = outdated.iter().map(|vm| (&*vm.reach, vm.label()));
            let reports = supervisor::run(
                asked,
                None,
                |_, _| {},
                |label, report| log.line(&supervisor::describe(label, report)),
            );
            log.line(&supervisor::summary(&reports, &left));
            log.line(&supervisor::to_json(&reports, &left, false).to_string());
            supervisor::succeeded(&reports)
        }
    }
}
