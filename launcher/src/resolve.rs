//! Finding the real QEMU binary behind the shim.
//!
//! The shim stands at the path a QEMU package installed (`/usr/bin/qemu-system-x86_64`), so the
//! real binary lives elsewhere. It is looked up, in this order:
//!
//! 1. the environment variable `QEMU_LIVEUPGRADE_BINARY`;
//! 2. the JSON config file, `/etc/qemu-liveupgrade/config.json` or the path in
//!    `QEMU_LIVEUPGRADE_CONFIG`. libvirt starts the emulator with an environment of only
//!    `LC_ALL` and `PATH`, so this file is how a libvirt host configures the shim:
//!    ```json
//!    { "binary": "/usr/bin/qemu-system-x86_64.real",
//!      "binaries": { "qemu-system-aarch64": "/opt/qemu/bin/qemu-system-aarch64" } }
//!    ```
//!    `binaries` is keyed by the name the shim was invoked as and wins over `binary`;
//! 3. `<path the shim was invoked as>.real`, which is where `dpkg-divert --rename` moves the
//!    packaged binary when the shim is diverted over it (or, for a symlink such as Debian's
//!    `/usr/bin/kvm`, the `.real` beside each path the symlink leads through).
//!
//! Resolution runs again for every generation: a package upgrade replaces the file at the
//! resolved path, and the next generation must run the new one.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Environment variable naming the real QEMU binary; wins over everything else.
pub const ENV_BINARY: &str = "QEMU_LIVEUPGRADE_BINARY";
/// Environment variable naming the config file, for tests and unusual layouts.
pub const ENV_CONFIG: &str = "QEMU_LIVEUPGRADE_CONFIG";
/// Where the config file lives by default.
pub const DEFAULT_CONFIG: &str = "/etc/qemu-liveupgrade/config.json";

/// Why no real QEMU binary could be used.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The config file exists but cannot be read or is not the expected JSON.
    #[error("cannot use config file {path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Every place was tried and none holds an executable QEMU.
    #[error("no real QEMU binary found (tried: {tried}); set {ENV_BINARY} or \"binary\" in {config}, or install QEMU as {fallback}")]
    NotFound {
        /// What was tried, in order, with the outcome of each.
        tried: String,
        /// The config file consulted.
        config: String,
        /// The `.real` path next to the shim.
        fallback: String,
    },
    /// The binary named by the environment or the config file cannot be executed.
    #[error("{path} (from {from}): {reason}")]
    Unusable {
        /// The binary.
        path: PathBuf,
        /// Which setting named it.
        from: String,
        /// Why it cannot be executed.
        reason: String,
    },
    /// Nothing resolves and the path the shim was started as holds another program now: the
    /// shim was taken away (the package removed, the diversion undone) under a running VM.
    #[error("{path} is no longer the qemu-liveupgrade shim (was qemu-liveupgrade removed?) and there is no {fallback}: this VM stays on its QEMU until it is restarted")]
    ShimRemoved {
        /// The path the shim was started as.
        path: PathBuf,
        /// The `.real` path it looked for.
        fallback: PathBuf,
    },
    /// The resolved binary is the shim itself, which would recurse forever.
    #[error("{path} is the qemu-liveupgrade shim itself, not QEMU")]
    IsShim {
        /// The offending path.
        path: PathBuf,
    },
}

/// Where the real binary came from, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `QEMU_LIVEUPGRADE_BINARY`.
    Env,
    /// The config file.
    Config,
    /// `<invoked path>.real`.
    Sibling,
    /// Named by the operator for one upgrade (`qemu-liveupgrade upgrade --to`).
    Request,
}

/// A real QEMU binary ready to be executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    /// Absolute or invoked-relative path of the executable.
    pub path: PathBuf,
    /// Which rule found it.
    pub source: Source,
}

/// A binary as a supervisor handover writes it ([`crate::handover`]).
impl Binary {
    /// Its part of the handed-over state.
    pub(crate) fn export(&self) -> crate::handover::state::Binary {
        let source = match self.source {
            Source::Env => "env",
            Source::Config => "config",
            Source::Sibling => "sibling",
            Source::Request => "request",
        };
        crate::handover::state::Binary {
            path: crate::handover::state::Text::path(&self.path),
            source: source.into(),
        }
    }

    /// The binary a handover named. A source this build does not know reads as a request,
    /// the rule that says least about where the file came from.
    pub(crate) fn import(s: &crate::handover::state::Binary) -> Binary {
        let source = match s.source.as_str() {
            "env" => Source::Env,
            "config" => Source::Config,
            "sibling" => Source::Sibling,
            _ => Source::Request,
        };
        Binary {
            path: s.path.to_path(),
            source,
        }
    }
}

/// Resolves the real binary for a shim invoked as `argv0`, reading the process environment.
pub fn resolve(argv0: &OsStr) -> Result<Binary, ResolveError> {
    let env_binary = std::env::var_os(ENV_BINARY).filter(|v| !v.is_empty());
    let config = std::env::var_os(ENV_CONFIG)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let path_var = std::env::var_os("PATH");
    resolve_with(argv0, env_binary.as_deref(), &config, path_var.as_deref())
}

/// [`resolve`] with its inputs explicit, so tests need not touch the process environment.
pub fn resolve_with(
    argv0: &OsStr,
    env_binary: Option<&OsStr>,
    config: &Path,
    path_var: Option<&OsStr>,
) -> Result<Binary, ResolveError> {
    // A binary named explicitly (environment or config) is used or refused; falling through
    // to another rule would quietly run a QEMU the operator did not ask for.
    if let Some(p) = env_binary {
        let path = PathBuf::from(p);
        return match check_executable(&path) {
            Ok(()) => not_self(Binary {
                path,
                source: Source::Env,
            }),
            Err(e) => Err(ResolveError::Unusable {
                path,
                from: ENV_BINARY.to_owned(),
                reason: e,
            }),
        };
    }
    let mut tried = vec![format!("{ENV_BINARY} unset")];
    match read_config(config, invoked_name(argv0))? {
        Some(path) => {
            return match check_executable(&path) {
                Ok(()) => not_self(Binary {
                    path,
                    source: Source::Config,
                }),
                Err(e) => Err(ResolveError::Unusable {
                    path,
                    from: config.display().to_string(),
                    reason: e,
                }),
            }
        }
        None if config.exists() => tried.push(format!("{} names no binary", config.display())),
        None => tried.push(format!("no {}", config.display())),
    }

    let invoked = invoked_path(argv0, path_var);
    let sibling = real_beside(&invoked);
    for link in symlink_chain(&invoked) {
        let candidate = real_beside(&link);
        match check_executable(&candidate) {
            Ok(()) => {
                return not_self(Binary {
                    path: candidate,
                    source: Source::Sibling,
                })
            }
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    if is_other_program(&invoked) {
        return Err(ResolveError::ShimRemoved {
            path: invoked,
            fallback: sibling,
        });
    }
    Err(ResolveError::NotFound {
        tried: tried.join("; "),
        config: config.display().to_string(),
        fallback: sibling.display().to_string(),
    })
}

/// `PATH.real`.
fn real_beside(path: &Path) -> PathBuf {
    let mut real = path.as_os_str().to_owned();
    real.push(".real");
    PathBuf::from(real)
}

/// `path`, then each symlink it leads through, relative targets taken from the link's
/// directory: Debian's `/usr/bin/kvm` is a symlink to `qemu-system-x86_64`, whose `.real` is
/// the QEMU to run. Stops after a few links (a loop, or a long chain, is not followed).
fn symlink_chain(path: &Path) -> Vec<PathBuf> {
    let mut chain = vec![path.to_owned()];
    while chain.len() < 8 {
        let Some(last) = chain.last() else {
            break;
        };
        let Ok(target) = fs::read_link(last) else {
            break;
        };
        let next = match last.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
        if chain.contains(&next) {
            break;
        }
        chain.push(next);
    }
    chain
}

/// The basename QEMU itself would use in its messages (`qemu-system-x86_64`).
pub fn invoked_name(argv0: &OsStr) -> &OsStr {
    let bytes = argv0.as_bytes();
    match bytes.iter().rposition(|&b| b == b'/') {
        Some(i) => OsStr::from_bytes(bytes.get(i + 1..).unwrap_or_default()),
        None => argv0,
    }
}

/// The path the shim was started as: argv[0] if it has a slash, else its PATH match, the way
/// execvp(3) found it.
fn invoked_path(argv0: &OsStr, path_var: Option<&OsStr>) -> PathBuf {
    if argv0.as_bytes().contains(&b'/') {
        return PathBuf::from(argv0);
    }
    if let Some(dirs) = path_var {
        for dir in std::env::split_paths(dirs) {
            let candidate = dir.join(argv0);
            if check_executable(&candidate).is_ok() {
                return candidate;
            }
        }
    }
    PathBuf::from(argv0)
}

/// Reads the config file; `Ok(None)` when it is absent or names no binary for this shim.
fn read_config(path: &Path, name: &OsStr) -> Result<Option<PathBuf>, ResolveError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(config_error(path, e.to_string())),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| config_error(path, e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| config_error(path, "expected a JSON object".into()))?;
    let name = name.to_string_lossy();
    if let Some(map) = obj.get("binaries") {
        let map = map
            .as_object()
            .ok_or_else(|| config_error(path, "\"binaries\" must be an object".into()))?;
        if let Some(p) = map.get(name.as_ref()) {
            let p = p.as_str().ok_or_else(|| {
                config_error(path, format!("\"binaries\".\"{name}\" must be a string"))
            })?;
            return Ok(Some(PathBuf::from(p)));
        }
    }
    match obj.get("binary") {
        None => Ok(None),
        Some(serde_json::Value::String(p)) => Ok(Some(PathBuf::from(p))),
        Some(_) => Err(config_error(path, "\"binary\" must be a string".into())),
    }
}

fn config_error(path: &Path, reason: String) -> ResolveError {
    ResolveError::Config {
        path: path.to_owned(),
        reason,
    }
}

fn check_executable(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| short_io(&e))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).map_err(|e| e.desc().to_string())
}

fn short_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// Whether `path` is an executable that is not this process's own: what the package's removal
/// leaves where the shim stood (the real QEMU renamed back). `/proc/self/exe` of a shim whose
/// file was replaced or removed reads `PATH (deleted)` (proc(5)); the path still counts as
/// the shim's, as after the package's own upgrade.
fn is_other_program(path: &Path) -> bool {
    if !path.is_absolute() || check_executable(path).is_err() {
        return false;
    }
    let Ok(me) = fs::read_link("/proc/self/exe") else {
        return false;
    };
    let me = me.as_os_str().as_bytes();
    let me = Path::new(OsStr::from_bytes(
        me.strip_suffix(b" (deleted)").unwrap_or(me),
    ));
    fs::canonicalize(path).is_ok_and(|it| it != me)
}

/// Refuses a binary that is this very executable: the config pointing back at the shim would
/// otherwise fork itself until the machine runs out of processes.
fn not_self(binary: Binary) -> Result<Binary, ResolveError> {
    let me = fs::canonicalize("/proc/self/exe").ok();
    let it = fs::canonicalize(&binary.path).ok();
    if me.is_some() && me == it {
        return Err(ResolveError::IsShim { path: binary.path });
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qlu-resolve-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn exe(path: &Path) {
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn env_wins_over_config_and_sibling() {
        let d = tmpdir("env");
        let (a, b) = (d.join("a"), d.join("b"));
        exe(&a);
        exe(&b);
        exe(&d.join("qemu-system-x86_64.real"));
        let cfg = d.join("config.json");
        fs::write(&cfg, format!(r#"{{"binary":"{}"}}"#, b.display())).unwrap();
        let argv0 = d.join("qemu-system-x86_64");
        let got = resolve_with(argv0.as_os_str(), Some(a.as_os_str()), &cfg, None).unwrap();
        assert_eq!(
            got,
            Binary {
                path: a,
                source: Source::Env
            }
        );
        let got = resolve_with(argv0.as_os_str(), None, &cfg, None).unwrap();
        assert_eq!(
            got,
            Binary {
                path: b,
                source: Source::Config
            }
        );
        fs::remove_file(&cfg).unwrap();
        let got = resolve_with(argv0.as_os_str(), None, &cfg, None).unwrap();
        assert_eq!(got.source, Source::Sibling);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn config_binaries_are_keyed_by_invoked_name() {
        let d = tmpdir("keyed");
        let (a, b) = (d.join("a"), d.join("b"));
        exe(&a);
        exe(&b);
        let cfg = d.join("config.json");
        let text = format!(
            r#"{{"binary":"{}","binaries":{{"qemu-system-aarch64":"{}"}}}}"#,
            a.display(),
            b.display()
        );
        fs::write(&cfg, text).unwrap();
        let got = resolve_with(OsStr::new("/x/qemu-system-aarch64"), None, &cfg, None).unwrap();
        assert_eq!(got.path, b);
        let got = resolve_with(OsStr::new("/x/qemu-system-x86_64"), None, &cfg, None).unwrap();
        assert_eq!(got.path, a);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sibling_found_through_path_for_bare_argv0() {
        let d = tmpdir("path");
        exe(&d.join("qemu-system-x86_64"));
        exe(&d.join("qemu-system-x86_64.real"));
        let got = resolve_with(
            OsStr::new("qemu-system-x86_64"),
            None,
            &d.join("none.json"),
            Some(d.as_os_str()),
        )
        .unwrap();
        assert_eq!(got.path, d.join("qemu-system-x86_64.real"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_to_a_diverted_emulator_finds_its_real_binary() {
        // /usr/bin/kvm -> qemu-system-x86_64 -> (the shim); qemu-system-x86_64.real is QEMU.
        let d = tmpdir("kvm");
        let shim = d.join("shim");
        exe(&shim);
        std::os::unix::fs::symlink(&shim, d.join("qemu-system-x86_64")).unwrap();
        exe(&d.join("qemu-system-x86_64.real"));
        std::os::unix::fs::symlink("qemu-system-x86_64", d.join("kvm")).unwrap();
        let got =
            resolve_with(d.join("kvm").as_os_str(), None, &d.join("none.json"), None).unwrap();
        assert_eq!(got.path, d.join("qemu-system-x86_64.real"));
        // A link loop ends the walk instead of hanging it.
        std::os::unix::fs::symlink("loop-b", d.join("loop-a")).unwrap();
        std::os::unix::fs::symlink("loop-a", d.join("loop-b")).unwrap();
        let err = resolve_with(
            d.join("loop-a").as_os_str(),
            None,
            &d.join("none.json"),
            None,
        );
        assert!(matches!(err, Err(ResolveError::NotFound { .. })), "{err:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nothing_found_names_every_attempt() {
        let d = tmpdir("none");
        let err = resolve_with(
            d.join("qemu-system-x86_64").as_os_str(),
            None,
            &d.join("none.json"),
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("QEMU_LIVEUPGRADE_BINARY unset"), "{text}");
        assert!(text.contains("none.json"), "{text}");
        assert!(
            text.contains("qemu-system-x86_64.real: No such file"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_named_binary_that_is_missing_is_an_error_not_a_fallback() {
        let d = tmpdir("named");
        exe(&d.join("qemu-system-x86_64.real"));
        let argv0 = d.join("qemu-system-x86_64");
        let err = resolve_with(
            argv0.as_os_str(),
            Some(OsStr::new("/nonexistent/qemu")),
            &d.join("c.json"),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/nonexistent/qemu (from QEMU_LIVEUPGRADE_BINARY): No such file or directory"
        );
        let cfg = d.join("c.json");
        fs::write(&cfg, r#"{"binary":"/nonexistent/q2"}"#).unwrap();
        let err = resolve_with(argv0.as_os_str(), None, &cfg, None).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/q2 (from "),
            "{err}"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unreadable_or_bad_config_is_an_error() {
        let d = tmpdir("bad");
        let cfg = d.join("config.json");
        fs::write(&cfg, "{not json").unwrap();
        let err = resolve_with(OsStr::new("/x/q"), None, &cfg, None).unwrap_err();
        assert!(matches!(err, ResolveError::Config { .. }), "{err}");
        fs::write(&cfg, r#"{"binary": 7}"#).unwrap();
        let err = resolve_with(OsStr::new("/x/q"), None, &cfg, None).unwrap_err();
        assert!(err.to_string().contains("\"binary\" must be a string"));
        // A directory where the file should be cannot be read.
        fs::remove_file(&cfg).unwrap();
        fs::create_dir(&cfg).unwrap();
        let err = resolve_with(OsStr::new("/x/q"), None, &cfg, None).unwrap_err();
        assert!(matches!(err, ResolveError::Config { .. }), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_program_where_the_shim_stood_says_the_shim_was_removed() {
        let d = tmpdir("removed");
        let argv0 = d.join("qemu-system-x86_64");
        // The real QEMU, renamed back over the shim's symlink by `dpkg-divert --remove`.
        exe(&argv0);
        let err = resolve_with(argv0.as_os_str(), None, &d.join("none.json"), None).unwrap_err();
        assert!(
            matches!(&err, ResolveError::ShimRemoved { path, .. } if *path == argv0),
            "{err}"
        );
        assert!(err.to_string().contains("stays on its QEMU"), "{err}");
        // This very executable there (the shim itself) is the ordinary "nothing found".
        fs::remove_file(&argv0).unwrap();
        std::os::unix::fs::symlink(fs::read_link("/proc/self/exe").unwrap(), &argv0).unwrap();
        let err = resolve_with(argv0.as_os_str(), None, &d.join("none.json"), None).unwrap_err();
        assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn invoked_name_is_basename() {
        assert_eq!(
            invoked_name(OsStr::new("/usr/bin/qemu-system-x86_64")),
            "qemu-system-x86_64"
        );
        assert_eq!(invoked_name(OsStr::new("qemu-kvm")), "qemu-kvm");
    }
}
