//! Cross-version command lines: the argv a later generation gets when its QEMU is another
//! version than the one the VM was started with.
//!
//! Every generation is started from the user's argv, which was written for the first QEMU. A
//! newer QEMU may have removed an option (QEMU 9.0 removed `-no-hpet` and `-no-acpi`, which
//! libvirt 9.0 still emits for QEMU 7.2) and an older one may lack a newer spelling
//! (`-run-with`, 8.1). [`translate`] rewrites each such option into the equivalent the new
//! binary accepts, with the same guest ABI, and refuses, naming the option, what has no
//! equivalent. What the binary accepts is asked of the binary itself ([`probe`]), not read
//! off its version number. The first generation always gets the user's argv as given.
//!
//! The equivalents come from QEMU's `docs/about/removed-features.rst` and `deprecated.rst`
//! (5.0 to 10.2); each rule is written in both directions where both forms ever existed
//! ([`rules`]).

pub mod probe;
mod rules;

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::cmdline::{CmdLine, Item, Opt, OptArg};
use crate::verdict::{describe, Reason, Verdict};
pub use probe::{Capabilities, Questions};

/// One option rewritten for the new binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What the argv had: `-no-hpet`, `-accel tcg,one-insn-per-tb=on`.
    pub was: String,
    /// What the new generation gets instead; empty when the option is dropped.
    pub now: String,
    /// Why, with the QEMU version that made the difference.
    pub why: String,
}

impl Change {
    /// `{"was", "now", "why"}`.
    pub fn to_json(&self) -> Value {
        json!({ "was": self.was, "now": self.now, "why": self.why })
    }
}

/// A command line translated for one binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// What the new generation runs.
    pub cmd: CmdLine,
    /// Every rewrite, in command-line order.
    pub changes: Vec<Change>,
}

/// Device drivers known by a second name that is not the `-pci` form QEMU's other aliases take
/// (`qdev_alias_table` in QEMU's `qdev-monitor.c`). The probe asks by QOM type name.
const DEVICE_ALIASES: &[(&str, &str)] = &[
    ("e1000-82540em", "e1000"),
    ("lsi", "lsi53c895a"),
    ("ahci", "ich9-ahci"),
    ("ac97", "AC97"),
    ("es1370", "ES1370"),
];

/// The QOM type a `-device` driver name stands for, aliases resolved where they are not the
/// `-pci` form.
fn device_type(driver: &str) -> &str {
    DEVICE_ALIASES
        .iter()
        .find(|(alias, _)| *alias == driver)
        .map_or(driver, |(_, t)| t)
}

/// What a probe of the new binary must ask to judge `cmd` started with machine type `machine`.
pub fn questions(cmd: &CmdLine, machine: Option<&str>) -> Questions {
    let machine = machine.map(str::to_owned).or_else(|| {
        cmd.opts("machine")
            .filter_map(|o| o.parse_arg()?.get("type"))
            .last()
    });
    let arg = |o: &Opt, key: &str| o.parse_arg().and_then(|a| a.get(key));
    let devices = cmd
        .opts("device")
        .filter_map(|o| arg(o, "driver"))
        .filter(|d| !d.is_empty() && d != "help")
        .map(|d| device_type(&d).to_owned())
        .collect();
    let mut objects: BTreeSet<String> = cmd
        .opts("object")
        .filter_map(|o| arg(o, "qom-type"))
        .collect();
    objects.extend(
        cmd.opts("accel")
            .filter_map(|o| arg(o, "accel"))
            .map(|a| format!("{a}-accel")),
    );
    Questions {
        machine,
        devices,
        objects,
    }
}

/// The versioned machine type `asked` (a type, an alias such as `pc`, or `None` for the
/// default) stands for in the binary `caps` describes: what every later generation is pinned to.
pub fn pinned_machine(asked: Option<&str>, caps: &Capabilities) -> Option<String> {
    caps.machines
        .iter()
        .find(|m| match asked {
            Some(t) => m.name == t || m.alias.as_deref() == Some(t),
            None => m.default,
        })
        .map(|m| m.name.clone())
}

/// Translates `cmd` (a generation's whole command line) for the binary `caps` describes.
/// Returns the command line to run, or a verdict naming every option that cannot be given to
/// that binary in any form.
pub fn translate(cmd: &CmdLine, caps: &Capabilities) -> Result<Translated, Verdict> {
    let mut t = Translation {
        caps,
        out: Vec::with_capacity(cmd.items.len()),
        changes: Vec::new(),
        verdict: Verdict::default(),
        machine_sets: Vec::new(),
        accel_sets: Vec::new(),
        run_with: Vec::new(),
        pending: Vec::new(),
    };
    for item in &cmd.items {
        match item {
            Item::Positional(_) => t.out.push(item.clone()),
            Item::Opt(opt) => t.option(opt),
        }
    }
    t.finish(cmd)
}

/// A translation under way.
struct Translation<'a> {
    caps: &'a Capabilities,
    out: Vec<Item>,
    changes: Vec<Change>,
    verdict: Verdict,
    /// `-machine` keys to set once every option is seen: `(key, value, was, why)`.
    machine_sets: Vec<(String, String, String, String)>,
    /// Keys to set on the `-accel tcg` option once every option is seen: `(key, value, was,
    /// why)`.
    accel_sets: Vec<(String, String, String, String)>,
    /// `-run-with` keys to gather into one option: `(key, value, was)`.
    run_with: Vec<(String, String, String)>,
    /// Options to add right after the one being translated: `(name, argument)`.
    pending: Vec<(String, Option<String>)>,
}

impl Translation<'_> {
    fn option(&mut self, opt: &Opt) {
        // An option the launcher's table does not know is QEMU's to judge, as at first start.
        let Some(spec) = opt.spec() else {
            if !rules::unknown_option(self, opt) {
                self.out.push(Item::Opt(opt.clone()));
            }
            return;
        };
        let spelled = opt.spelling.to_string_lossy();
        let bare = spelled.trim_start_matches('-');
        if !self.caps.has_option(spec.canonical) && !self.caps.has_option(bare) {
            rules::missing_option(self, opt);
            return;
        }
        let mut opt = opt.clone();
        rules::properties(self, &mut opt);
        self.out.push(Item::Opt(opt));
        for (name, arg) in std::mem::take(&mut self.pending) {
            self.push(&name, arg.as_deref());
        }
    }

    /// Records a rewrite.
    fn changed(&mut self, was: String, now: String, why: impl Into<String>) {
        self.changes.push(Change {
            was,
            now,
            why: why.into(),
        });
    }

    /// Records what cannot be translated.
    fn refuse(&mut self, opt: &Opt, why: impl Into<String>) {
        self.verdict.add(Reason::new(as_written(opt), why));
    }

    /// Appends an option of the launcher's making.
    fn push(&mut self, name: &str, arg: Option<&str>) {
        let mut cmd = CmdLine::default();
        cmd.push(name, arg);
        self.out.extend(cmd.items);
    }

    fn finish(mut self, original: &CmdLine) -> Result<Translated, Verdict> {
        if !self.run_with.is_empty() {
            let arg: Vec<String> = self
                .run_with
                .iter()
                .map(|(k, v, _)| format!("{k}={}", v.replace(',', ",,")))
                .collect();
            let arg = arg.join(",");
            self.push("run-with", Some(&arg));
            let was: Vec<String> = self.run_with.iter().map(|(_, _, w)| w.clone()).collect();
            self.changed(
                was.join(" "),
                format!("-run-with {arg}"),
                "QEMU 9.0 and 10.0 moved these into -run-with",
            );
        }
        let mut cmd = CmdLine {
            items: std::mem::take(&mut self.out),
        };
        let machine_sets = std::mem::take(&mut self.machine_sets);
        for (key, value, _, _) in &machine_sets {
            crate::memfd::set_machine_key(&mut cmd, key, value);
        }
        let machine = cmd.opts("machine").last().map(as_written);
        for (_, _, was, why) in machine_sets {
            self.changed(was, machine.clone().unwrap_or_default(), why);
        }
        for (key, value, was, why) in std::mem::take(&mut self.accel_sets) {
            self.set_on_tcg(&mut cmd, &key, &value, was, why);
        }
        if !self.verdict.upgradable() {
            return Err(self.verdict);
        }
        if self.changes.is_empty() {
            cmd = original.clone();
        }
        Ok(Translated {
            cmd,
            changes: self.changes,
        })
    }
}

impl Translation<'_> {
    /// Sets `key=value` on the command line's `-accel tcg`, which must exist and know `key`.
    fn set_on_tcg(&mut self, cmd: &mut CmdLine, key: &str, value: &str, was: String, why: String) {
        let known = match self.caps.objects.get("tcg-accel") {
            Some(Some(props)) => props.contains(key),
            _ => false,
        };
        let tcg = cmd
            .opts_mut("accel")
            .filter(|o| o.parse_arg().and_then(|a| a.get("accel")).as_deref() == Some("tcg"))
            .last();
        match tcg {
            Some(opt) if known => {
                if let Some(mut arg) = opt.parse_arg() {
                    arg.set(key, value);
                    opt.set_arg(&arg);
                }
                let now = as_written(opt);
                self.changed(was, now, why);
            }
            _ => self.verdict.add(Reason::new(
                was,
                format!(
                    "{} does not accept it; its equivalent, {key}={value}, needs an -accel tcg \
                     option that {} knows it on",
                    self.caps.describe(),
                    self.caps.binary.display()
                ),
            )),
        }
    }
}

/// An option as the user wrote it, argument included, for reasons and changes.
fn as_written(opt: &Opt) -> String {
    match opt.arg_str() {
        Some(arg) => format!("{} {arg}", opt.spelling.to_string_lossy()),
        None if opt.arg.is_some() => describe(opt),
        None => opt.spelling.to_string_lossy().into_owned(),
    }
}

/// Rewrites `opt`'s argument with `arg`, noting the change.
fn rewrite_arg(t: &mut Translation<'_>, opt: &mut Opt, arg: &OptArg, why: String) {
    let was = as_written(opt);
    opt.set_arg(arg);
    let now = as_written(opt);
    t.changed(was, now, why);
}

#[cfg(test)]
mod tests;
