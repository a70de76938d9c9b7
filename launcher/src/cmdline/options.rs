//! The table of QEMU system-emulator options: which take an argument, what syntax that
//! argument has, and which key QEMU gives a keyless first value.
//!
//! Built from the union of the `qemu_options[]` tables compiled into Debian's
//! qemu-system-x86_64 7.2.22 and 10.0.2 (read out of the binaries) and `qemu-options.hx` of
//! QEMU 10.2, so every option of 7.2, 10.0 and the versions between is known. The table holds every
//! target's options, not only x86's: QEMU itself knows them all and refuses foreign ones only
//! after parsing ("Option not supported for this target"), so they group the same way.
//!
//! QEMU matches an option by its whole token (`lookup_opt()` in `system/vl.c` compares with
//! `strcmp` after dropping one leading `-` of `--`), so `-m=256` is no option at all; QEMU
//! 7.2 answers `-m=256: invalid option`.

/// What kind of argument an option takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// No argument (`-S`, `-nographic`).
    None,
    /// A path, a name or free text that QEMU uses whole (`-kernel`, `-append`, `-incoming`):
    /// it has no `key=value` structure and commas in it are not escaped.
    Raw,
    /// A comma-separated `key=value` list (QemuOpts or keyval), whose keyless first element,
    /// if any, is the value of the named key (`-m 256` is `size=256`).
    List(Option<&'static str>),
}

/// Where a `help` or `?` element makes QEMU print a list or option help and exit instead of
/// starting a VM. Measured with qemu-system-x86_64 7.2.22 and 10.0.2 (each case run with
/// `-machine none -nodefaults -display none -S` after it: a help case exits, the others keep
/// running) and read in QEMU 10.2's `vl.c`. Where the versions differ, the entry follows the
/// one that prints help if the other exits with an error, as neither starts a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelpAt {
    /// `help` never makes this option print help.
    Never,
    /// The whole argument is `help` or `?` (`-cpu help`; `-cpu qemu64,help` is an error).
    Whole,
    /// The first element is `help` or `?` (`-netdev help,id=x` lists backends,
    /// `-netdev user,help` is an error).
    First,
    /// A keyless `help` or `?` at any position (`-device virtio-net-pci,help`, `-rtc help`).
    Anywhere,
    /// A keyless `help` after the first element only, because the first is a name or value
    /// of its own: `-name help` names the guest "help", `-name foo,help` prints the options.
    AfterFirst,
}

/// One option of QEMU's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionSpec {
    /// The name without dashes, as QEMU spells it.
    pub name: &'static str,
    /// The name this option is known by in [`super::Opt::name`]; differs only for aliases.
    pub canonical: &'static str,
    /// The argument it takes.
    pub arg: ArgKind,
    /// Whether and where a `help` element asks for help.
    pub help: HelpAt,
}

impl OptionSpec {
    /// Whether QEMU consumes the next token as this option's argument.
    pub fn takes_arg(&self) -> bool {
        self.arg != ArgKind::None
    }

    /// The key of a keyless first element, for `List` options.
    pub fn implied_key(&self) -> Option<&'static str> {
        match self.arg {
            ArgKind::List(key) => key,
            _ => None,
        }
    }
}

use ArgKind::{List, None as NoArg, Raw};
use HelpAt::{AfterFirst, Anywhere, First, Never, Whole};

const fn o(name: &'static str, arg: ArgKind, help: HelpAt) -> OptionSpec {
    OptionSpec {
        name,
        canonical: name,
        arg,
        help,
    }
}

const fn alias(name: &'static str, canonical: &'static str, arg: ArgKind) -> OptionSpec {
    OptionSpec {
        name,
        canonical,
        arg,
        help: Never,
    }
}

/// Implied keys come from each option's `QemuOptsList.implied_opt_name` or the implied key
/// passed to `keyval_parse()` / `qobject_input_visitor_new_str()`. Two are this crate's own
/// names for a value QEMU parses without a key: `model` for `-cpu` (model name, then
/// features), and `dev` for the legacy character-device strings of `-serial`, `-qmp` and
/// friends (`unix:/p,server=on,wait=off`, `mon:stdio`).
static OPTIONS: &[OptionSpec] = &[
    // Standard options.
    alias("h", "help", NoArg),
    o("help", NoArg, Never),
    o("version", NoArg, Never),
    o("machine", List(Some("type")), Anywhere),
    alias("M", "machine", List(Some("type"))),
    o("cpu", List(Some("model")), Whole),
    o("accel", List(Some("accel")), First),
    o("smp", List(Some("cpus")), Anywhere),
    o("numa", List(Some("type")), Never),
    o("add-fd", List(None), Anywhere),
    o("set", List(None), Never),
    o("global", List(None), Anywhere),
    o("boot", List(Some("order")), Anywhere),
    o("m", List(Some("size")), AfterFirst),
    o("mem-path", Raw, Never),
    o("mem-prealloc", NoArg, Never),
    o("k", Raw, Never),
    o("audio-help", NoArg, Never),
    o("audio", List(Some("driver")), Anywhere),
    o("audiodev", List(Some("driver")), Whole),
    o("device", List(Some("driver")), Anywhere),
    o("name", List(Some("guest")), AfterFirst),
    o("uuid", Raw, Never),
    // Block devices.
    o("fda", Raw, Never),
    o("fdb", Raw, Never),
    o("hda", Raw, Never),
    o("hdb", Raw, Never),
    o("hdc", Raw, Never),
    o("hdd", Raw, Never),
    o("cdrom", Raw, Never),
    o("blockdev", List(Some("driver")), Never),
    o("drive", List(None), Never),
    o("mtdblock", Raw, Never),
    o("sd", Raw, Never),
    o("pflash", Raw, Never),
    o("snapshot", NoArg, Never),
    o("fsdev", List(Some("fsdriver")), AfterFirst),
    o("virtfs", List(Some("fsdriver")), AfterFirst),
    o("iscsi", List(None), Anywhere),
    // USB and display.
    o("usb", NoArg, Never),
    o("usbdevice", Raw, Never),
    o("display", List(Some("type")), Whole),
    o("nographic", NoArg, Never),
    o("spice", List(None), Anywhere),
    o("portrait", NoArg, Never),
    o("rotate", Raw, Never),
    // `-vga help` lists cards; 7.2 answers `-vga ?` with "unknown vga type", also no VM.
    o("vga", Raw, Whole),
    o("full-screen", NoArg, Never),
    o("g", Raw, Never),
    o("vnc", List(Some("vnc")), Anywhere),
    // i386 target.
    o("win2k-hack", NoArg, Never),
    o("no-fd-bootchk", NoArg, Never),
    o("no-acpi", NoArg, Never),
    o("no-hpet", NoArg, Never),
    o("acpitable", List(Some("data")), Never),
    o("smbios", List(None), Never),
    // Network, character and TPM devices.
    o("netdev", List(Some("type")), First),
    // `-nic help` lists backends from 10.0 on; 7.2 rejects it, also without a VM.
    o("nic", List(Some("type")), First),
    o("net", List(Some("type")), Never),
    o("chardev", List(Some("backend")), Anywhere),
    o("tpmdev", List(Some("type")), Whole),
    // Boot.
    o("bios", Raw, Never),
    o("kernel", Raw, Never),
    o("shim", Raw, Never),
    o("append", Raw, Never),
    o("initrd", Raw, Never),
    o("dtb", Raw, Never),
    o("compat", List(None), Never),
    o("fw_cfg", List(Some("name")), AfterFirst),
    // Debug and expert options.
    o("serial", List(Some("dev")), Never),
    o("parallel", List(Some("dev")), Never),
    o("monitor", List(Some("dev")), Never),
    o("qmp", List(Some("dev")), Never),
    o("qmp-pretty", List(Some("dev")), Never),
    o("mon", List(Some("chardev")), AfterFirst),
    o("debugcon", List(Some("dev")), Never),
    o("pidfile", Raw, Never),
    o("singlestep", NoArg, Never),
    o("preconfig", NoArg, Never),
    o("S", NoArg, Never),
    o("overcommit", List(None), Anywhere),
    o("gdb", List(Some("dev")), Never),
    o("s", NoArg, Never),
    o("d", List(None), First),
    o("D", Raw, Never),
    o("dfilter", Raw, Never),
    o("seed", Raw, Never),
    o("L", Raw, Whole),
    o("enable-kvm", NoArg, Never),
    o("xen-domid", Raw, Never),
    o("xen-attach", NoArg, Never),
    o("xen-domid-restrict", NoArg, Never),
    o("no-reboot", NoArg, Never),
    o("no-shutdown", NoArg, Never),
    o("action", List(None), Anywhere),
    o("loadvm", Raw, Never),
    o("daemonize", NoArg, Never),
    o("option-rom", List(Some("romfile")), AfterFirst),
    o("rtc", List(None), Anywhere),
    o("icount", List(Some("shift")), AfterFirst),
    o("watchdog-action", Raw, Never),
    o("echr", Raw, Never),
    o("incoming", Raw, Never),
    o("only-migratable", NoArg, Never),
    o("nodefaults", NoArg, Never),
    o("chroot", Raw, Never),
    o("runas", Raw, Never),
    o("prom-env", Raw, Never),
    o("semihosting", NoArg, Never),
    o("semihosting-config", List(Some("enable")), Never),
    o("old-param", NoArg, Never),
    o("sandbox", List(Some("enable")), AfterFirst),
    o("readconfig", Raw, Never),
    o("no-user-config", NoArg, Never),
    o("trace", List(Some("enable")), Anywhere),
    // `-plugin help` lists plugin options from 10.0 on; 7.2 fails to load "help.so".
    o("plugin", List(Some("file")), Whole),
    o("qtest", List(Some("dev")), Never),
    o("qtest-log", Raw, Never),
    o("async-teardown", NoArg, Never),
    o("run-with", List(None), Anywhere),
    o("msg", List(None), Anywhere),
    o("dump-vmstate", Raw, Never),
    o("enable-sync-profile", NoArg, Never),
    o("perfmap", NoArg, Never),
    o("jitdump", NoArg, Never),
    o("object", List(Some("qom-type")), Anywhere),
];

/// Options that make QEMU print something and exit whatever else is given: `-help`/`-h`,
/// `-version`, 7.2's `-audio-help`, and `-dump-vmstate FILE`, which writes the vmstate
/// description and exits after building the machine, without running it.
pub const INFO_ONLY: &[&str] = &["help", "version", "audio-help", "dump-vmstate"];

/// `key=help` settings that list choices and exit: `-device driver=help`,
/// `-object qom-type=help`, `-trace enable=help`, `-audio driver=help`, `-audio model=help`,
/// and `-nic model=help` / `-net nic,model=help` (the latter two on a machine with NICs).
/// `-machine type=help` is not one: 7.2 starts the default machine.
pub const KEYED_HELP: &[(&str, &str)] = &[
    ("device", "driver"),
    ("object", "qom-type"),
    ("trace", "enable"),
    ("audio", "driver"),
    ("audio", "model"),
    ("nic", "model"),
    ("net", "model"),
];

/// Looks an option up by its name without dashes (`"m"`, `"M"`, `"qmp-pretty"`).
pub fn lookup(name: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|spec| spec.name == name)
}

/// Every option in the table.
pub fn all() -> &'static [OptionSpec] {
    OPTIONS
}

/// Whether QEMU's `is_help_option()` accepts `s`.
pub fn is_help_word(s: &str) -> bool {
    s == "help" || s == "?"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in OPTIONS.iter().enumerate() {
            assert!(
                OPTIONS[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }

    #[test]
    fn aliases_map_to_known_options() {
        for spec in OPTIONS {
            let canonical = lookup(spec.canonical).expect(spec.canonical);
            assert_eq!(canonical.arg, spec.arg, "{}", spec.name);
        }
        assert_eq!(lookup("M").map(|s| s.canonical), Some("machine"));
    }

    #[test]
    fn arguments_match_qemu() {
        // Flags and argument-takers as `qemu_options[]` of 7.2 and 10.2 define them.
        for flag in [
            "S",
            "daemonize",
            "nographic",
            "nodefaults",
            "no-user-config",
            "snapshot",
            "enable-kvm",
            "mem-prealloc",
            "no-shutdown",
            "no-reboot",
            "preconfig",
            "s",
            "usb",
            "only-migratable",
            "async-teardown",
            "perfmap",
            "version",
            "help",
            "h",
        ] {
            assert!(!lookup(flag).unwrap().takes_arg(), "{flag}");
        }
        for with_arg in [
            "M",
            "m",
            "L",
            "d",
            "D",
            "k",
            "g",
            "smp",
            "qmp",
            "qmp-pretty",
            "mon",
            "incoming",
            "add-fd",
            "sandbox",
            "msg",
            "run-with",
            "dump-vmstate",
            "watchdog-action",
            "readconfig",
            "xen-domid",
            "shim",
            "iscsi",
            "fw_cfg",
            "object",
            "compat",
            "action",
        ] {
            assert!(lookup(with_arg).unwrap().takes_arg(), "{with_arg}");
        }
        assert!(lookup("writeconfig").is_none(), "7.2 has no -writeconfig");
    }
}
