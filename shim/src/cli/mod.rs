//! The parts of the operator CLI (`qemu-liveupgrade`) that are more than argument handling:
//! the rollout over many VMs and what the package's dpkg trigger runs.
//!
//! - [`rollout`]: `upgrade --all`: N at a time, a line per VM, a summary table or JSON;
//! - [`policy`]: the config file's `"rollout"` section;
//! - [`apply_policy`]: the trigger's background job: wait for dpkg, then apply the policy;
//! - [`dpkg`]: waiting for dpkg's and apt's locks; [`log`]: the rollout log;
//! - [`versions`]: the version of a QEMU binary on disk; [`table`]: plain-text tables;
//! - [`supervisor`]: `upgrade --supervisor`: launchers handed over to a new build in place.

pub mod apply_policy;
pub mod dpkg;
pub mod log;
pub mod policy;
pub mod rollout;
pub mod supervisor;
pub mod table;
pub mod versions;
