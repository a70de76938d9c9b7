//! `qemu-liveupgrade apply-policy`: what the package's dpkg trigger runs, in the background,
//! after a QEMU package was installed or upgraded.
//!
//! It waits until dpkg and apt are done, reads the policy from the config file, and either
//! logs which VMs now run an outdated QEMU (policy `nothing`) or upgrades them all,
//! `max_parallel` at a time (policy `upgrade-all`), logging a line per VM and the summary.

use std::path::Path;

use crate::dpkg;
use crate::log::Log;
use crate::policy::{self, After};
use crate::rollout::{self, Vm};
use launcher::json::JsonExt;

/// Options of `apply-policy`.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Wait for dpkg and apt to release their locks first.
    pub wait_for_dpkg: bool,
    /// The log file.
    pub log: &'a Path,
}

/// Applies the policy; `Ok(false)` if some VM failed to upgrade.
pub fn run(opts: &Options<'_>, list_vms: impl Fn() -> Vec<Vm>) -> Result<bool, String> {
    let mut log = Log::open(opts.log);
    log.line(&format!(
        "qemu-liveupgrade: a QEMU package changed (pid {})",
        std::process::id()
    ));
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
            Ok(true)
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
            Ok(rollout::succeeded(&outcomes))
        }
    }
}
