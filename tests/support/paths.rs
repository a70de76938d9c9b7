//! Where the binaries, the guest and the QEMU builds under test live.
//!
//! Integration tests run as `target/<profile>/deps/<test>-<hash>`, so the
//! workspace's own binaries are two directories up, built by the same `cargo`
//! invocation profile. `cargo test -p qemu-liveupgrade-tests` does not build the
//! other packages' binaries, hence the hint to run `cargo build --workspace`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Default directory of `scripts/fetch-qemu`; `QEMU_BUILDS_DIR` overrides it.
const QEMU_BUILDS_DIR: &str = "/var/cache/qemu-liveupgrade/qemu";

/// The repository root (this package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, the directory holding the test executable's `deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| {
            panic!(
                "test executable {} is not in target/<profile>/deps",
                exe.display()
            )
        })
        .to_path_buf()
}

fn workspace_bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} not found at {}: run cargo build --workspace first (with the same profile as the tests)",
            path.display()
        );
    }
    path
}

/// The drop-in supervisor, `qemu-liveupgrade-shim`.
pub fn shim_bin() -> PathBuf {
    workspace_bin("qemu-liveupgrade-shim")
}

/// The operator CLI, `qemu-liveupgrade`.
pub fn cli_bin() -> PathBuf {
    workspace_bin("qemu-liveupgrade")
}

/// The heartbeat guest ELF, built (or brought up to date) by
/// `scripts/build-guest` into `target/guest/` once per test process.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let (script, out_dir, _) = build("build-guest", "guest", "the heartbeat guest");
        let elf = out_dir.join("heartbeat.elf");
        assert!(
            elf.is_file(),
            "{} did not produce {}",
            script.display(),
            elf.display()
        );
        elf
    })
    .clone()
}

/// Runs `scripts/<name> target/<out>` and returns the script, the output directory and what
/// it printed; panics with the script's output, naming `what` is missing, if it fails.
pub fn build(name: &str, out: &str, what: &str) -> (PathBuf, PathBuf, String) {
    let out_dir = profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target"))
        .join(out);
    let script = repo_root().join("scripts").join(name);
    let output = Command::new(&script)
        .arg(&out_dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if !output.status.success() {
        panic!(
            "{} failed ({}); {what} is missing. Its output:\n{}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (
        script,
        out_dir,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Directory holding the side-by-side QEMU builds of `scripts/fetch-qemu`.
pub fn qemu_builds_dir() -> PathBuf {
    std::env::var_os("QEMU_BUILDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(QEMU_BUILDS_DIR))
}

/// The wrapper that runs QEMU `version` (`"7.2.18"`, `"7.2.22"`, `"10.0.2"`),
/// unpacked by `scripts/fetch-qemu`.
pub fn qemu_build(version: &str) -> PathBuf {
    let path = qemu_builds_dir()
        .join(version)
        .join("bin/qemu-system-x86_64");
    if !path.is_file() {
        panic!(
            "QEMU build {version} is missing ({} does not exist): run {} as root to install it",
            path.display(),
            repo_root().join("scripts/fetch-qemu").display()
        );
    }
    path
}

/// The distribution's QEMU, `/usr/bin/qemu-system-x86_64`.
pub fn system_qemu() -> PathBuf {
    let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if !path.is_file() {
        panic!(
            "{} is missing: apt-get install qemu-system-x86",
            path.display()
        );
    }
    path
}
