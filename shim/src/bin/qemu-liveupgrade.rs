//! `qemu-liveupgrade`: the operator's command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use launcher::cmdline::CmdLine;
use launcher::control;
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
            let path = find_vm(&vm)?;
            let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
            let req =
                json!({ "execute": "upgrade", "to": to.map(|p| p.to_string_lossy().into_owned()) });
            if no_wait {
                // The launcher acts on a request once it has read it; nothing more is awaited.
                let stream =
                    std::os::unix::net::UnixStream::connect(&path).map_err(|e| e.to_string())?;
                let mut line = serde_json::to_vec(&req).unwrap_or_default();
                line.push(b'\n');
                std::io::Write::write_all(&mut &stream, &line).map_err(|e| e.to_string())?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut report = None;
            control::request(&path, &req, |line| match line.get("progress") {
                Some(step) if !json => eprintln!("{vm}: {}", step.as_str().unwrap_or("")),
                Some(_) => {}
                None => report = Some(line.clone()),
            })
            .map_err(|e| format!("{}: {e}", path.display()))?;
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
            let vms = match vm {
                Some(vm) => vec![find_vm(&vm)?],
                None => all_vms().into_iter().map(|(p, _)| p).collect(),
            };
            let to = to.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
            let req =
                json!({ "execute": "check", "to": to.map(|p| p.to_string_lossy().into_owned()) });
            let mut all_ok = true;
            for path in vms {
                let name = status_of(&path)
                    .ok()
                    .and_then(|s| {
                        s["name"]
                            .as_str()
                            .map(str::to_owned)
                            .or(Some(s["pid"].to_string()))
                    })
                    .unwrap_or_else(|| path.display().to_string());
                let mut report = None;
                control::request(&path, &req, |line| {
                    if line.get("progress").is_none() {
                        report = Some(line.clone());
                    }
                })
                .map_err(|e| format!("{}: {e}", path.display()))?;
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
            let status = status_of(&find_vm(&vm)?)?;
            if json {
                println!("{}", pretty(&status));
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List { json } => {
            let vms = all_vms();
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

/// The control socket of a VM given by pid or name.
fn find_vm(vm: &str) -> Result<PathBuf, String> {
    let dir = control::run_dir();
    if let Ok(pid) = vm.parse::<u32>() {
        let path = control::socket_path(&dir, pid);
        if path.exists() {
            return Ok(path);
        }
        return Err(format!(
            "no VM with pid {pid} under qemu-liveupgrade (no {})",
            path.display()
        ));
    }
    all_vms()
        .into_iter()
        .find(|(_, s)| s["name"].as_str() == Some(vm))
        .map(|(p, _)| p)
        .ok_or_else(|| {
            format!(
                "no VM named {vm} under qemu-liveupgrade in {}",
                dir.display()
            )
        })
}

/// Every live VM's control socket and status; sockets nobody answers on are skipped.
fn all_vms() -> Vec<(PathBuf, Value)> {
    let Ok(entries) = std::fs::read_dir(control::run_dir()) else {
        return Vec::new();
    };
    let mut vms: Vec<(PathBuf, Value)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|p| status_of(&p).ok().map(|s| (p, s)))
        .collect();
    vms.sort_by_key(|(_, s)| s["pid"].as_u64());
    vms
}

fn status_of(path: &Path) -> Result<Value, String> {
    let mut status = None;
    control::request(path, &json!({"execute": "status"}), |v| {
        status = Some(v.clone())
    })
    .map_err(|e| format!("{}: {e}", path.display()))?;
    status.ok_or_else(|| format!("{}: no answer", path.display()))
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
