//! `qemu-liveupgrade`: the operator's command.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use launcher::cmdline::CmdLine;
use launcher::discover;
use launcher::plan::Plan;
use serde_json::{json, Value};

/// Live-upgrade QEMU under running VMs.
#[derive(Debug, Parser)]
#[command(name = "qemu-liveupgrade", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what the shim would run for a QEMU command line, and what it keeps stable.
    Plan {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The name the shim would be invoked as (decides the real binary it resolves).
        #[arg(long, default_value = "qemu-system-x86_64")]
        emulator: OsString,
        /// Also plan an upgrade to this QEMU binary: the argv generation 2 would get there,
        /// translated, and whether it would accept the VM.
        #[arg(long)]
        to: Option<PathBuf>,
        /// QEMU's arguments, after `--`.
        #[arg(last = true, required = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Move a running VM onto the QEMU binary now installed (or --to PATH). Exits 0 only once
    /// the guest runs on the new QEMU.
    Upgrade {
        /// The VM: the pid libvirt or the script tracks, or its -name.
        vm: String,
        /// The new QEMU binary; by default the shim resolves it as at start.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Wait for the result, printing progress (the default).
        #[arg(long, conflicts_with = "no_wait")]
        wait: bool,
        /// Return once the launcher has taken the request.
        #[arg(long)]
        no_wait: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Preflight a running VM: start the new QEMU exactly as an upgrade would (translated
    /// argv, pinned machine type, -incoming defer, hot-plugged devices replayed), confirm it
    /// takes the VM, then end it. The guest keeps running throughout. Exits 1 if any VM could
    /// not be upgraded, naming why.
    Check {
        /// The VM: pid or -name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vm: Option<String>,
        /// Every VM under the shim.
        #[arg(long)]
        all: bool,
        /// The new QEMU binary; by default the one an upgrade would resolve now.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Print one JSON report per VM.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's QEMU version, binary, generation, uptime and last upgrade.
    Status {
        /// The VM: pid or -name.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the VMs running under the shim.
    List {
        /// Print JSON, one object per VM.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("qemu-liveupgrade: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Plan {
            json,
            emulator,
            to,
            args,
        } => {
            let cmd = CmdLine::parse(&args).map_err(|e| launcher::error_chain(&e))?;
            let mut plan = Plan::new(&emulator, &cmd);
            if let Some(to) = to {
                plan.upgrade_to(&to);
            }
            if json {
                println!("{}", pretty(&plan.to_json()));
            } else {
                print!("{}", plan.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Upgrade {
            vm,
            to,
            wait: _,
            no_wait,
            json,
        } => {
            let target = discover::scan().find(&vm)?;
            let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
            let req =
                json!({ "execute": "upgrade", "to": to.map(|p| p.to_string_lossy().into_owned()) });
            if no_wait {
                // The launcher acts on a request once it has read it; nothing more is awaited.
                let fail = |e: std::io::Error| format!("{}: {e}", target.shown().display());
                let stream = target.connect().map_err(fail)?;
                let mut line = serde_json::to_vec(&req).unwrap_or_default();
                line.push(b'\n');
                std::io::Write::write_all(&mut &stream, &line).map_err(fail)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut report = None;
            target.request(&req, |line| match line.get("progress") {
                Some(step) if !json => eprintln!("{vm}: {}", step.as_str().unwrap_or("")),
                Some(_) => {}
                None => report = Some(line.clone()),
            })?;
            let report = report.ok_or("the launcher closed the connection without a report")?;
            if json {
                println!("{report}");
            } else {
                println!("{}", describe_upgrade(&report));
            }
            Ok(if report["result"] == "ok" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Check {
            vm,
            all: _,
            to,
            json,
        } => {
            let scan = discover::scan();
            let vms = match vm {
                Some(vm) => vec![scan.find(&vm)?],
                None => live(&scan).into_iter().map(|(v, _)| v).collect(),
            };
            let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
            let req =
                json!({ "execute": "check", "to": to.map(|p| p.to_string_lossy().into_owned()) });
            let mut all_ok = true;
            for target in vms {
                let name = target
                    .status()
                    .ok()
                    .and_then(|s| {
                        s["name"]
                            .as_str()
                            .map(str::to_owned)
                            .or(Some(s["pid"].to_string()))
                    })
                    .unwrap_or_else(|| target.shown().display().to_string());
                let mut report = None;
                target.request(&req, |line| {
                    if line.get("progress").is_none() {
                        report = Some(line.clone());
                    }
                })?;
                let mut report =
                    report.ok_or("the launcher closed the connection without a report")?;
                all_ok &= report["ok"] == true;
                if json {
                    report["vm"] = name.into();
                    println!("{report}");
                } else {
                    println!("{}", describe_check(&name, &report));
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Status { vm, json } => {
            let status = discover::scan().find(&vm)?.status()?;
            if json {
                println!("{}", pretty(&status));
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List { json } => {
            let vms = live(&discover::scan());
            if json {
                for (_, s) in &vms {
                    println!("{s}");
                }
            } else {
                println!(
                    "{:>8} {:<16} {:<10} {:>4} {:>8}  BINARY",
                    "PID", "NAME", "VERSION", "GEN", "UPTIME"
                );
                for (_, s) in &vms {
                    println!(
                        "{:>8} {:<16} {:<10} {:>4} {:>7}s  {}",
                        s["pid"],
                        s["name"].as_str().unwrap_or("-"),
                        s["version"].as_str().unwrap_or("?"),
                        s["generation"],
                        s["uptime_s"],
                        s["binary"].as_str().unwrap_or("?"),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every VM whose launcher answers, with its status; directories the scan did not trust are
/// named on stderr.
fn live(scan: &discover::Scan) -> Vec<(discover::Vm, Value)> {
    for refused in &scan.refused {
        eprintln!("qemu-liveupgrade: skipped {refused}");
    }
    scan.live()
}

fn print_status(s: &Value) {
    println!("pid:        {}", s["pid"]);
    println!("name:       {}", s["name"].as_str().unwrap_or("-"));
    println!(
        "qemu:       {} (pid {})",
        s["version"].as_str().unwrap_or("?"),
        s["qemu_pid"]
    );
    println!("binary:     {}", s["binary"].as_str().unwrap_or("?"));
    println!("machine:    {}", s["machine"].as_str().unwrap_or("-"));
    println!("guest RAM:  {}", s["ram"].as_str().unwrap_or("?"));
    println!(
        "generation: {} (for {}s; VM up {}s)",
        s["generation"], s["generation_uptime_s"], s["uptime_s"]
    );
    match s.get("last_upgrade").filter(|v| !v.is_null()) {
        Some(u) => println!("last upgrade: {}", describe_upgrade(u)),
        None => println!("last upgrade: none"),
    }
}

fn describe_upgrade(r: &Value) -> String {
    if r["result"] == "ok" {
        format!(
            "upgraded {} -> {} (generation {}): guest paused {} ms, {} bytes sent, {} ms in all",
            r["from"]["version"].as_str().unwrap_or("?"),
            r["to"]["version"].as_str().unwrap_or("?"),
            r["to"]["generation"],
            r["downtime_ms"],
            r["ram_bytes"],
            r["total_ms"],
        )
    } else {
        format!(
            "upgrade failed, guest still on {} (generation {}): {}",
            r["from"]["version"].as_str().unwrap_or("?"),
            r["generation"],
            r["reason"].as_str().unwrap_or("unknown reason"),
        )
    }
}

fn describe_check(name: &str, r: &Value) -> String {
    let target = format!(
        "QEMU {} at {}",
        r["version"].as_str().unwrap_or("?"),
        r["binary"].as_str().unwrap_or("?")
    );
    if r["ok"] == true {
        let translated: Vec<&str> = r["translations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["was"].as_str())
            .collect();
        let mut line = format!("{name}: ok: {target} takes it");
        if !translated.is_empty() {
            line.push_str(&format!(" (translated: {})", translated.join(", ")));
        }
        return line;
    }
    let reasons: Vec<String> = r["verdict"]["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{}: {}",
                x["option"].as_str().unwrap_or("?"),
                x["why"].as_str().unwrap_or("?")
            )
        })
        .collect();
    format!(
        "{name}: cannot be upgraded to {target}: {}",
        reasons.join("; ")
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
