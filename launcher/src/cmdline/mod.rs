//! QEMU's command-line grammar, parsed losslessly and printed back.
//!
//! The launcher stands where `qemu-system-x86_64` stood, so every command line it receives was
//! written for QEMU, and every generation it starts must get that command line back with only
//! the launcher's own edits. Parsing therefore keeps each token as given: `--m` stays `--m`,
//! an unknown option stays where it was, and [`CmdLine::to_args`] returns exactly the tokens
//! [`CmdLine::parse`] was given.
//!
//! The grammar is QEMU's own (`lookup_opt()` in `system/vl.c`):
//! - a token not starting with `-` is a positional argument, a disk image;
//! - otherwise one leading `-` of `--` is dropped and the rest must equal an option name
//!   exactly (`-m=256` is not `-m`; QEMU calls it an invalid option);
//! - an option that takes an argument always consumes the next token, even one starting
//!   with `-` (`-append -quiet` hands `-quiet` to the kernel).
//!
//! The option table is in [`options`]; structured arguments are read with [`OptArg`].

mod arg;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod keyval;
pub mod options;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

pub use arg::OptArg;
pub use keyval::{Element, KeyVal};
pub use options::OptionSpec;

/// A command line the launcher cannot take.
#[derive(Debug, thiserror::Error)]
pub enum CmdLineError {
    /// `-readconfig` reads options from a file the launcher would have to follow for every
    /// generation, and a config file can hold objects and fds it never sees.
    #[error(
        "-readconfig is not supported under qemu-liveupgrade: pass the options on the command line"
    )]
    ReadConfig,
    /// The last token is an option that needs an argument (QEMU: "requires an argument").
    #[error("{option}: requires an argument")]
    MissingArgument {
        /// The option as spelled, `-m` or `--m`.
        option: String,
    },
}

impl CmdLineError {
    /// Whether this is the launcher refusing a command line QEMU itself would accept, as
    /// opposed to a command line QEMU would reject too (better left for QEMU to report).
    pub fn is_refusal(&self) -> bool {
        matches!(self, CmdLineError::ReadConfig)
    }
}

/// One option with its argument, if it takes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Opt {
    /// The token as given: `-m` or `--m`.
    pub spelling: OsString,
    /// The canonical name without dashes, aliases mapped (`-M` is `machine`, `-h` is `help`).
    /// For an option not in the table, the token without its dashes.
    pub name: String,
    /// The argument token, for options that take one.
    pub arg: Option<OsString>,
}

/// One element of a command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An option and its argument.
    Opt(Opt),
    /// A token that does not start with `-`: QEMU opens it as the first hard disk.
    Positional(OsString),
}

/// A parsed QEMU command line, without argv\[0\].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CmdLine {
    /// The items in command-line order.
    pub items: Vec<Item>,
}

impl CmdLine {
    /// Parses `args` (without argv\[0\]).
    ///
    /// An option not in the table (from a newer QEMU, or a typo QEMU will reject) is kept as
    /// it is. It is taken to have an argument when the next token exists and does not start
    /// with `-`. That guess only decides how tokens are grouped into [`Item`]s; the printed
    /// argv is the same either way.
    pub fn parse(args: &[OsString]) -> Result<CmdLine, CmdLineError> {
        let mut items = Vec::with_capacity(args.len());
        let mut rest = args.iter().peekable();
        while let Some(token) = rest.next() {
            let bytes = token.as_bytes();
            if bytes.first() != Some(&b'-') {
                items.push(Item::Positional(token.clone()));
                continue;
            }
            let bare = bytes
                .strip_prefix(b"--")
                .unwrap_or(bytes.get(1..).unwrap_or_default());
            let spec = std::str::from_utf8(bare).ok().and_then(options::lookup);
            let takes_arg = match spec {
                Some(spec) if spec.canonical == "readconfig" => {
                    return Err(CmdLineError::ReadConfig)
                }
                Some(spec) => spec.takes_arg(),
                None => rest
                    .peek()
                    .is_some_and(|next| !next.as_bytes().starts_with(b"-")),
            };
            let arg = match (takes_arg, rest.next_if(|_| takes_arg)) {
                (true, None) => {
                    return Err(CmdLineError::MissingArgument {
                        option: token.to_string_lossy().into_owned(),
                    })
                }
                (_, arg) => arg.cloned(),
            };
            let name = match spec {
                Some(spec) => spec.canonical.to_owned(),
                None => String::from_utf8_lossy(bare).into_owned(),
            };
            items.push(Item::Opt(Opt {
                spelling: token.clone(),
                name,
                arg,
            }));
        }
        Ok(CmdLine { items })
    }

    /// The tokens of this command line; `parse(x)?.to_args() == x` for every `x` that parses.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::with_capacity(self.items.len() * 2);
        for item in &self.items {
            match item {
                Item::Opt(opt) => {
                    args.push(opt.spelling.clone());
                    args.extend(opt.arg.iter().cloned());
                }
                Item::Positional(token) => args.push(token.clone()),
            }
        }
        args
    }

    /// True when QEMU would only print something and exit, starting no VM: `-version`,
    /// `-help`, `-dump-vmstate`, or a `help`/`?` request such as `-machine help`,
    /// `-device virtio-net-pci,help` or `-cpu ?` (see [`Opt::is_info_request`]).
    pub fn is_info_only(&self) -> bool {
        self.items
            .iter()
            .any(|item| matches!(item, Item::Opt(opt) if opt.is_info_request()))
    }

    /// The options with canonical name `name`, in order.
    pub fn opts<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Opt> {
        self.items.iter().filter_map(move |item| match item {
            Item::Opt(opt) if opt.name == name => Some(opt),
            _ => None,
        })
    }

    /// The options with canonical name `name`, in order, for editing in place.
    pub fn opts_mut<'a>(&'a mut self, name: &'a str) -> impl Iterator<Item = &'a mut Opt> {
        self.items.iter_mut().filter_map(move |item| match item {
            Item::Opt(opt) if opt.name == name => Some(opt),
            _ => None,
        })
    }

    /// The positional arguments, in order.
    pub fn positionals(&self) -> impl Iterator<Item = &OsString> {
        self.items.iter().filter_map(|item| match item {
            Item::Positional(token) => Some(token),
            Item::Opt(_) => None,
        })
    }

    /// Whether an option with canonical name `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.opts(name).next().is_some()
    }

    /// Removes every option with canonical name `name` and returns them in order.
    pub fn remove_all(&mut self, name: &str) -> Vec<Opt> {
        let mut removed = Vec::new();
        self.items.retain(|item| match item {
            Item::Opt(opt) if opt.name == name => {
                removed.push(opt.clone());
                false
            }
            _ => true,
        });
        removed
    }

    /// Appends `-name arg`. `name` is spelled as given and mapped to its canonical name.
    pub fn push(&mut self, name: &str, arg: Option<&str>) {
        let canonical = options::lookup(name).map_or(name, |spec| spec.canonical);
        self.items.push(Item::Opt(Opt {
            spelling: format!("-{name}").into(),
            name: canonical.to_owned(),
            arg: arg.map(OsString::from),
        }));
    }
}

impl Opt {
    /// This option's entry in the table; `None` for an option QEMU 7.2 to 10.2 do not have.
    pub fn spec(&self) -> Option<&'static OptionSpec> {
        options::lookup(&self.name)
    }

    /// The argument as UTF-8; `None` when absent or not UTF-8.
    pub fn arg_str(&self) -> Option<&str> {
        self.arg.as_deref().and_then(|a| a.to_str())
    }

    /// A `key=value` or JSON view of the argument.
    ///
    /// `None` without a UTF-8 argument, and for options whose argument is a path, a name or
    /// free text ([`options::ArgKind::Raw`]: `-kernel`, `-append`, `-incoming fd:3`), whose
    /// commas and `=` are not syntax; those still read as JSON when they start with `{`
    /// (`-incoming` takes a JSON channel since QEMU 9.x). An unknown option's argument is read
    /// as `key=value` without an implied key.
    pub fn parse_arg(&self) -> Option<OptArg> {
        let arg = self.arg_str()?;
        if arg.starts_with('{') {
            return OptArg::parse(arg, None);
        }
        match self.spec().map(|spec| spec.arg) {
            Some(options::ArgKind::List(implied)) => OptArg::parse(arg, implied),
            Some(_) => None,
            None => OptArg::parse(arg, None),
        }
    }

    /// Replaces the argument with `arg`, printed in the syntax it has (an unchanged
    /// `key=value` element keeps its bytes).
    pub fn set_arg(&mut self, arg: &OptArg) {
        self.arg = Some(arg.to_string().into());
    }

    /// Whether this option alone makes QEMU print something and exit: the options of
    /// [`options::INFO_ONLY`], a `help` or `?` where the option's [`options::HelpAt`] says
    /// QEMU looks for one, or a `key=help` of [`options::KEYED_HELP`]. A JSON argument never
    /// asks for help (QEMU 7.2 rejects `{"driver":"help"}`), and neither does a value that
    /// merely starts with "help" (`-name help-desk`).
    pub fn is_info_request(&self) -> bool {
        use options::HelpAt;
        let Some(spec) = self.spec() else {
            return false;
        };
        if options::INFO_ONLY.contains(&spec.canonical) {
            return true;
        }
        let Some(arg) = self.arg_str().filter(|a| !a.starts_with('{')) else {
            return false;
        };
        let list = KeyVal::parse(arg, spec.implied_key());
        let keyed = options::KEYED_HELP.iter().any(|&(option, key)| {
            option == spec.canonical && list.get(key).is_some_and(|v| options::is_help_word(&v))
        });
        let mut help_at = list
            .elements()
            .enumerate()
            .filter_map(|(i, element)| match element {
                Element::Implied(word) | Element::Bare(word) if options::is_help_word(word) => {
                    Some(i)
                }
                _ => None,
            });
        keyed
            || match spec.help {
                HelpAt::Never => false,
                HelpAt::Whole => options::is_help_word(arg),
                HelpAt::First => help_at.next() == Some(0),
                HelpAt::Anywhere => help_at.next().is_some(),
                HelpAt::AfterFirst => help_at.any(|i| i > 0),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{args, libvirt, libvirt_probe, script, script_fds, script_sockets};
    use super::*;

    fn parse(s: &[&str]) -> CmdLine {
        CmdLine::parse(&args(s)).unwrap()
    }

    fn opt(name: &str, arg: Option<&str>) -> Item {
        Item::Opt(Opt {
            spelling: format!("-{name}").into(),
            name: name.into(),
            arg: arg.map(Into::into),
        })
    }

    #[test]
    fn round_trips_real_command_lines() {
        for argv in [
            libvirt(),
            libvirt_probe(),
            script(),
            script_sockets(),
            script_fds(),
        ] {
            let cmd = CmdLine::parse(&argv).unwrap();
            assert_eq!(cmd.to_args(), argv);
            assert!(!cmd.is_info_only());
            // Every token was grouped as QEMU groups it: no positional in these.
            assert_eq!(cmd.positionals().count(), 0, "{argv:?}");
        }
    }

    #[test]
    fn groups_like_qemu() {
        let cmd = parse(&[
            "-enable-kvm",
            "-m",
            "2G",
            "disk.img",
            "-S",
            "-append",
            "-quiet",
        ]);
        assert_eq!(
            cmd.items,
            [
                opt("enable-kvm", None),
                opt("m", Some("2G")),
                Item::Positional("disk.img".into()),
                opt("S", None),
                opt("append", Some("-quiet")),
            ]
        );
    }

    #[test]
    fn double_dash_and_aliases() {
        let cmd = parse(&["--m", "512", "-M", "q35", "-h"]);
        let Item::Opt(m) = &cmd.items[0] else {
            panic!()
        };
        assert_eq!((m.spelling.to_str(), m.name.as_str()), (Some("--m"), "m"));
        assert_eq!(cmd.opts("m").next().and_then(Opt::arg_str), Some("512"));
        assert_eq!(cmd.opts("machine").count(), 1);
        assert_eq!(
            cmd.opts("machine")
                .next()
                .and_then(|o| o.parse_arg()?.get("type"))
                .as_deref(),
            Some("q35")
        );
        assert!(cmd.has("help") && cmd.is_info_only());
        assert_eq!(cmd.to_args(), args(&["--m", "512", "-M", "q35", "-h"]));
    }

    #[test]
    fn unknown_options_are_kept() {
        // `-m=256` is not `-m` to QEMU; future options group with a following value.
        let argv = [
            "-m=256",
            "-future-flag",
            "-future-opt",
            "x,y=z",
            "-S",
            "---m",
            "-",
            "--",
        ];
        let cmd = parse(&argv);
        assert_eq!(cmd.to_args(), args(&argv));
        assert!(!cmd.has("m"));
        let names: Vec<_> = cmd.opts("future-opt").map(|o| o.arg_str()).collect();
        assert_eq!(names, [Some("x,y=z")]);
        assert_eq!(
            cmd.opts("future-flag").next().map(|o| o.arg.is_none()),
            Some(true)
        );
        assert_eq!(
            cmd.opts("future-opt")
                .next()
                .and_then(|o| o.parse_arg()?.get("y"))
                .as_deref(),
            Some("z")
        );
        // A trailing unknown option without a value is fine; a known one is not.
        assert_eq!(parse(&["-new"]).to_args(), args(&["-new"]));
        let err = CmdLine::parse(&args(&["-S", "-m"])).unwrap_err();
        assert_eq!(err.to_string(), "-m: requires an argument");
        assert!(!err.is_refusal());
    }

    #[test]
    fn readconfig_is_refused() {
        for argv in [
            &["-readconfig", "/etc/vm.cfg"][..],
            &["--readconfig", "x"],
            &["-readconfig"],
        ] {
            let err = CmdLine::parse(&args(argv)).unwrap_err();
            assert!(matches!(err, CmdLineError::ReadConfig) && err.is_refusal());
            assert!(err
                .to_string()
                .starts_with("-readconfig is not supported under qemu-liveupgrade"));
        }
        // As an argument it is only text.
        assert!(CmdLine::parse(&args(&["-name", "-readconfig"])).is_ok());
    }

    #[test]
    fn non_utf8_tokens_round_trip() {
        use std::os::unix::ffi::OsStringExt;
        let path = OsString::from_vec(b"/img/\xff.qcow2".to_vec());
        let argv = vec![
            "-hda".into(),
            path.clone(),
            path.clone(),
            OsString::from_vec(b"-\xfe".to_vec()),
        ];
        let cmd = CmdLine::parse(&argv).unwrap();
        assert_eq!(cmd.to_args(), argv);
        let hda = cmd.opts("hda").next().unwrap();
        assert_eq!((hda.arg_str(), hda.parse_arg()), (None, None));
    }

    #[test]
    fn edit_helpers() {
        let mut cmd = parse(&[
            "-S",
            "-pidfile",
            "/run/q.pid",
            "-daemonize",
            "-pidfile",
            "/x",
            "d.img",
        ]);
        let removed = cmd.remove_all("pidfile");
        assert_eq!(
            removed.iter().map(Opt::arg_str).collect::<Vec<_>>(),
            [Some("/run/q.pid"), Some("/x")]
        );
        cmd.push("incoming", Some("defer"));
        cmd.push("M", Some("pc"));
        assert_eq!(
            cmd.to_args(),
            args(&[
                "-S",
                "-daemonize",
                "d.img",
                "-incoming",
                "defer",
                "-M",
                "pc"
            ])
        );
        assert!(cmd.has("machine"));
        for opt in cmd.opts_mut("machine") {
            let mut arg = opt.parse_arg().unwrap();
            arg.set("type", "pc-i440fx-7.2");
            arg.set("memory-backend", "pc.ram");
            opt.set_arg(&arg);
        }
        assert_eq!(
            cmd.to_args().last().unwrap(),
            "pc-i440fx-7.2,memory-backend=pc.ram"
        );
    }

    #[test]
    fn parse_arg_by_option() {
        let cmd = CmdLine::parse(&libvirt()).unwrap();
        let get = |name: &str, key: &str| -> Vec<String> {
            cmd.opts(name)
                .filter_map(|o| o.parse_arg()?.get(key))
                .collect()
        };
        assert_eq!(get("machine", "type"), ["pc-i440fx-7.2"]);
        assert_eq!(get("m", "size"), ["256"]);
        assert_eq!(get("chardev", "backend"), ["socket", "socket", "socket"]);
        assert_eq!(get("object", "qom-type"), ["secret", "memory-backend-ram"]);
        assert_eq!(get("netdev", "type"), ["tap", "stream"]);
        assert_eq!(get("device", "driver")[0], "piix3-usb-uhci");
        assert_eq!(get("accel", "accel"), ["tcg"]);
        assert_eq!(get("mon", "chardev"), ["charmonitor"]);
        assert_eq!(get("sandbox", "enable"), ["on"]);
        assert_eq!(get("msg", "timestamp"), ["on"]);
        let script = CmdLine::parse(&script()).unwrap();
        let drive = script.opts("drive").next().unwrap().parse_arg().unwrap();
        assert_eq!(
            drive.get("file").as_deref(),
            Some("/var/lib/vm/my,disk.qcow2")
        );
        assert_eq!(script.opts("kernel").next().unwrap().parse_arg(), None);
        assert_eq!(
            script
                .opts("serial")
                .next()
                .unwrap()
                .parse_arg()
                .unwrap()
                .get("dev")
                .as_deref(),
            Some("mon:stdio")
        );
        assert_eq!(
            script
                .opts("smp")
                .next()
                .unwrap()
                .parse_arg()
                .unwrap()
                .get("cpus")
                .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn info_only() {
        let yes: &[&[&str]] = &[
            &["-version"],
            &["--version"],
            &["-help"],
            &["-h"],
            &["-S", "--help"],
            &["-dump-vmstate", "/tmp/vmstate.json"],
            &["-audio-help"],
            &["-machine", "help"],
            &["-M", "?"],
            &["-machine", "none,help"],
            &["-cpu", "help"],
            &["-cpu", "?"],
            &["-device", "help"],
            &["-device", "virtio-net-pci,help"],
            &["-device", "virtio-net-pci,?"],
            &["-device", "driver=help"],
            &["-accel", "help"],
            &["-object", "help"],
            &["-object", "memory-backend-file,help"],
            &["-object", "qom-type=help"],
            &["-display", "help"],
            &["-audiodev", "help"],
            &["-audio", "model=help"],
            &["-netdev", "help"],
            &["-netdev", "help,id=x"],
            &["-chardev", "help"],
            &["-chardev", "socket,help"],
            &["-d", "help"],
            &["-trace", "help"],
            &["-trace", "enable=help"],
            &["-smp", "2,help"],
            &["-boot", "help"],
            &["-global", "help"],
            &["-rtc", "help"],
            &["-vga", "help"],
            &["-L", "help"],
            &["-m", "256,help"],
            &["-name", "foo,help"],
            &["-nic", "model=help"],
            &["-nic", "help"],
            &["-plugin", "?"],
            &["-net", "nic,model=help"],
            &["-sandbox", "on,help"],
            &["-mon", "chardev=x,help"],
            &["-msg", "help"],
            &["-enable-kvm", "-m", "1G", "-M", "help"],
        ];
        for argv in yes {
            assert!(parse(argv).is_info_only(), "{argv:?}");
        }
        let no: &[&[&str]] = &[
            &[],
            &["-name", "help-desk"],
            &["-name", "help"],
            &["-k", "help"],
            &["-machine", "type=help"],
            &["-m", "help"],
            &["-append", "help"],
            &["-cpu", "qemu64,help"],
            &["-device", r#"{"driver":"help"}"#],
            &["-netdev", "user,help"],
            &["-pidfile", "help"],
            &["-future-option", "help"],
            &["-device", "helper-dev"],
            &["-option-rom", "help"],
            &["help"],
            &["-drive", "file=help"],
        ];
        for argv in no {
            assert!(!parse(argv).is_info_only(), "{argv:?}");
        }
    }
}

/// Shorthands for unit tests across the crate that build command lines from strings.
#[cfg(test)]
pub(crate) mod testing {
    use super::CmdLine;
    use std::ffi::OsString;

    /// Parses string arguments, panicking on a parse error.
    pub(crate) fn parse(args: &[&str]) -> CmdLine {
        CmdLine::parse(&args.iter().map(OsString::from).collect::<Vec<_>>()).unwrap()
    }

    /// The command line's arguments as strings.
    pub(crate) fn strings(cmd: &CmdLine) -> Vec<String> {
        cmd.to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }
}
