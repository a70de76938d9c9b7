//! `plan --json` gives a verdict on every libvirt-style command line in
//! `tests/fixtures/libvirt/` (graphics, hugepages, vfio, vhost-user, TCP chardevs): upgradable
//! or not, with the reasons each file says, and with `--to` the 10.0.2 build, the translations
//! it says.

use std::path::PathBuf;
use std::process::Command;

use qemu_liveupgrade_tests::shim::cli_json;
use qemu_liveupgrade_tests::{cli_bin, qemu_build, repo_root_path};
use serde_json::Value;

/// One fixture: its arguments and what `plan` must say about them.
struct Fixture {
    name: String,
    args: Vec<String>,
    upgradable: bool,
    reasons: Vec<String>,
    translates: Vec<String>,
}

fn fixtures() -> Vec<Fixture> {
    let dir: PathBuf = repo_root_path().join("tests/fixtures/libvirt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "args"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "fixtures missing in {}", dir.display());
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let mut f = Fixture {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                args: Vec::new(),
                upgradable: false,
                reasons: Vec::new(),
                translates: Vec::new(),
            };
            let mut expect = None;
            for line in text.lines() {
                if let Some(meta) = line.strip_prefix("# ") {
                    if let Some(v) = meta.strip_prefix("expect: ") {
                        expect = Some(v == "upgradable");
                    } else if let Some(v) = meta.strip_prefix("reason: ") {
                        f.reasons.push(v.to_owned());
                    } else if let Some(v) = meta.strip_prefix("to 10.0.2 translates: ") {
                        f.translates.push(v.to_owned());
                    }
                } else if !line.is_empty() {
                    f.args.push(line.to_owned());
                }
            }
            f.upgradable = expect.unwrap_or_else(|| panic!("{}: no '# expect:' line", f.name));
            f
        })
        .collect()
}

fn plan(args: &[String], to: Option<PathBuf>) -> Value {
    let mut cmd = Command::new(cli_bin());
    cmd.args(["plan", "--json"]);
    if let Some(to) = to {
        cmd.arg("--to").arg(to);
    }
    cmd.arg("--")
        .args(args)
        .env("QEMU_LIVEUPGRADE_BINARY", qemu_build("7.2.22"))
        .env("QEMU_LIVEUPGRADE_CONFIG", "/nonexistent");
    cli_json(cmd, "plan")
}

fn options(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|r| r["option"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn every_libvirt_fixture_gets_a_verdict_with_its_reasons() {
    for f in fixtures() {
        let p = plan(&f.args, None);
        let verdict = &p["verdict"];
        assert_eq!(verdict["upgradable"], f.upgradable, "{}: {verdict}", f.name);
        assert_eq!(
            options(&verdict["reasons"]),
            f.reasons,
            "{}: {verdict}",
            f.name
        );
        for reason in verdict["reasons"].as_array().unwrap() {
            assert!(
                reason["why"].as_str().is_some_and(|w| w.len() > 20),
                "{}: a reason without an explanation: {reason}",
                f.name
            );
        }
        println!("{}: {}", f.name, verdict);
    }
}

#[test]
fn plan_to_10_0_translates_what_libvirt_9_wrote_for_7_2() {
    for f in fixtures() {
        let p = plan(&f.args, Some(qemu_build("10.0.2")));
        let next = &p["next_generation"];
        assert_eq!(next["version"], "10.0.2", "{}: {next}", f.name);
        let translated: Vec<String> = next["translations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["was"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(translated, f.translates, "{}: {next}", f.name);
        // What 10.0.2 adds to the verdict is its own say; the argv's own reasons stay first.
        let reasons = options(&p["verdict"]["reasons"]);
        assert_eq!(reasons[..f.reasons.len()], f.reasons[..], "{}", f.name);
        if !f.reasons.is_empty() || reasons.len() > f.reasons.len() {
            println!("{} -> 10.0.2: {}", f.name, p["verdict"]);
        } else {
            let argv: Vec<&str> = next["argv"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                !argv.contains(&"-no-hpet") && !argv.contains(&"-no-acpi"),
                "{argv:?}"
            );
        }
    }
}
