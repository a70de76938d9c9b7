//! `qemu-liveupgrade`: the operator's command.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::rollout;
use launcher::cmdline::CmdLine;
use launcher::discover;
use launcher::json::JsonExt;
use launcher::placer;
use launcher::plan::Plan;
use serde_json::{json, Value};

/// Live-upgrade QEMU under running VMs.
#[derive(Debug, Parser)]
#[command(
    name = "qemu-liveupgrade",
    version,
    after_help = "The config file, the package's diversions and trigger, and the rollout policy: man 8 qemu-liveupgrade."
)]
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
    /// Move a running VM (or --all of them) onto the QEMU binary now installed (or --to PATH).
    /// Exits 0 only once the guest runs on the new QEMU; with --all, only if no VM failed.
    Upgrade {
        /// The VM: the pid libvirt or the script tracks, or its -name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vm: Option<String>,
        /// Every VM on this host, at most --max-parallel at a time: a line per VM as it ends,
        /// then a table (VM, from, to, pause, result, reason). VMs that fail stay on their QEMU.
        #[arg(long, conflicts_with = "no_wait")]
        all: bool,
        /// Upgrade the VM's supervisor (its qemu-liveupgrade launcher) instead of its QEMU:
        /// the launcher hands itself over in place to the binary now at the path it started
        /// from (or --to PATH); pid, QEMU and every connection stay. The new binary first
        /// checks it can take the VM; if not, the VM stays on its launcher, which says why.
        /// With --all, one VM at a time.
        #[arg(long, conflicts_with_all = ["max_parallel", "no_wait"])]
        supervisor: bool,
        /// With --all: only the VMs whose QEMU is not the installed binary (replaced or removed
        /// since they started, or another one); with --supervisor --all, only those whose
        /// launcher is not the installed qemu-liveupgrade-shim.
        #[arg(long, requires = "all")]
        outdated: bool,
        /// With --all: upgrades running at once [default: the config's rollout.max_parallel,
        /// else 2].
        #[arg(long, requires = "all", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_parallel: Option<u32>,
        /// The new QEMU binary; by default the shim resolves it as at start. With --supervisor:
        /// the new qemu-liveupgrade-shim binary.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Wait for the result, printing progress (the default).
        #[arg(long, conflicts_with = "no_wait")]
        wait: bool,
        /// Return once the launcher has taken the request.
        #[arg(long)]
        no_wait: bool,
        /// Print the report as JSON (with --all: one document for the whole rollout).
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
    /// Run the placer service (as root): after an upgrade, moves the new vCPU threads and
    /// iothreads of VMs whose launcher is not root into the cgroups the old ones were in.
    /// Listens on /run/qemu-liveupgrade/placer.sock until killed.
    Placer,
    /// List the VMs running under the shim, and whether each runs the installed QEMU.
    List {
        /// Print JSON: an array with each VM's status.
        #[arg(long)]
        json: bool,
    },
    /// What the package's dpkg trigger runs after a QEMU package changed, and its postinst
    /// after the package itself was installed or upgraded: apply the config's rollout policy
    /// (log the outdated VMs, or upgrade them all) and log what happened.
    ApplyPolicy {
        /// Wait until dpkg and apt are done first (they hold their locks until then).
        #[arg(long)]
        wait_for_dpkg: bool,
        /// This package was upgraded from VERSION: apply the policy's after_self_upgrade
        /// (hand the VMs' launchers over to the installed shim) before the QEMU rollout.
        #[arg(long, value_name = "VERSION")]
        upgraded_from: Option<String>,
        /// The log file.
        #[arg(long, default_value = cli::log::DEFAULT_LOG)]
        log: PathBuf,
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
            supervisor: true,
            vm,
            all,
            outdated,
            to,
            json,
            ..
        } => upgrade_supervisors(vm, all, outdated, to, json),
        Command::Upgrade {
            all: true,
            to: Some(_),
            ..
        } => Err("--to names one QEMU binary: with --all, only --supervisor takes it".into()),
        Command::Upgrade {
            all: true,
            outdated,
            max_parallel,
            json,
            ..
        } => upgrade_all(outdated, max_parallel, json),
        Command::Upgrade {
            vm,
            to,
            wait: _,
            no_wait,
            json,
            ..
        } => {
            let vm = vm.ok_or("name a VM, or --all")?;
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
            Ok(if report.at("/result") == "ok" {
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
                        s.at("/name")
                            .as_str()
                            .map(str::to_owned)
                            .or(Some(s.at("/pid").to_string()))
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
                all_ok &= report.at("/ok") == true;
                if json {
                    report.put("vm", name);
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
        Command::Placer => {
            let listener = placer::bind().map_err(|e| launcher::error_chain(&e))?;
            eprintln!(
                "qemu-liveupgrade placer: listening on {}/{}",
                launcher::rundir::BASE,
                placer::SOCKET
            );
            let err = placer::serve(listener, Default::default());
            Err(format!("placer: accept: {err}"))
        }
        Command::List { json } => {
            let vms = with_installed_versions(live(&discover::scan()));
            if json {
                let all: Vec<&Value> = vms.iter().map(|(_, s)| s).collect();
                println!("{}", pretty(&json!(all)));
            } else {
                print!("{}", list_text(&vms));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ApplyPolicy {
            wait_for_dpkg,
            upgraded_from,
            log,
        } => {
            let opts = cli::apply_policy::Options {
                wait_for_dpkg,
                log: &log,
                upgraded_from: upgraded_from.as_deref(),
            };
            let ok = cli::apply_policy::run(&opts, rollout_vms)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// `upgrade --all`: progress lines on stderr, the table (or JSON) on stdout.
fn upgrade_all(outdated: bool, max_parallel: Option<u32>, json: bool) -> Result<ExitCode, String> {
    let max_parallel = match max_parallel {
        Some(n) => n as usize,
        None => cli::policy::read(&cli::policy::config_path())?.max_parallel,
    };
    let (vms, left) = rollout::select(rollout_vms(), outdated);
    let total = vms.len();
    let outcomes = rollout::run(&vms, max_parallel, |o, done| {
        eprintln!("{}", o.progress_line(done, total));
    });
    if json {
        println!(
            "{}",
            pretty(&rollout::to_json(&outcomes, &left, max_parallel))
        );
    } else {
        print!("{}", rollout::table(&outcomes, &left));
    }
    Ok(if rollout::succeeded(&outcomes) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `upgrade --supervisor`: one line per VM (progress on stderr) and, with --all, a closing
/// line; or JSON.
fn upgrade_supervisors(
    vm: Option<String>,
    all: bool,
    outdated: bool,
    to: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode, String> {
    let progress = |label: &str, step: &str| {
        if !json {
            eprintln!("{label}: {step}");
        }
    };
    let (reports, left) = match vm {
        Some(vm) if !all => {
            let target = discover::scan().find(&vm)?;
            let asked = [(&target as &dyn rollout::Reach, vm)];
            (
                cli::supervisor::run(asked, to, progress, |_, _| {}),
                Vec::new(),
            )
        }
        _ => {
            let (vms, left) = cli::supervisor::select(rollout_vms(), outdated);
            let asked = vms.iter().map(|v| (&*v.reach, v.label()));
            (cli::supervisor::run(asked, to, progress, |_, _| {}), left)
        }
    };
    if json {
        println!("{}", cli::supervisor::to_json(&reports, &left, !all));
    } else {
        for (label, r) in &reports {
            println!("{}", cli::supervisor::describe(label, r));
        }
        if all {
            println!("{}", cli::supervisor::summary(&reports, &left));
        }
    }
    Ok(if cli::supervisor::succeeded(&reports) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Every VM, as the rollout takes them.
fn rollout_vms() -> Vec<rollout::Vm> {
    live(&discover::scan())
        .into_iter()
        .map(|(vm, status)| rollout::Vm {
            reach: Box::new(vm),
            status,
        })
        .collect()
}

/// Each VM's status with `installed_version`: what its installed binary says it is.
fn with_installed_versions(vms: Vec<(discover::Vm, Value)>) -> Vec<(discover::Vm, Value)> {
    let mut versions = cli::versions::Versions::default();
    vms.into_iter()
        .map(|(vm, mut s)| {
            let v = s
                .at("/installed_binary")
                .as_str()
                .and_then(|b| versions.of(std::path::Path::new(b)));
            s.put("installed_version", json!(v));
            (vm, s)
        })
        .collect()
}

/// The `list` table, and a closing line on the VMs that need an upgrade.
fn list_text(vms: &[(discover::Vm, Value)]) -> String {
    use cli::table::cell;
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|(_, s)| {
            let installed = match s.at("/runs_installed").as_bool() {
                Some(true) => "yes".to_owned(),
                Some(false) => format!("no: {}", cell(s.at("/installed_version"))),
                None => "unknown".to_owned(),
            };
            let deleted = if s.at("/binary_deleted") == true {
                " (deleted)"
            } else {
                ""
            };
            let supervisor = format!(
                "{} {}{}",
                cell(s.at("/supervisor/version")),
                cell(s.at("/supervisor/build")),
                match cli::supervisor::runs_installed(s) {
                    Some(true) => "",
                    Some(false) => ", outdated",
                    None => ", unknown",
                }
            );
            vec![
                cell(s.at("/pid")),
                cell(s.at("/name")),
                cell(s.at("/version")),
                cell(s.at("/generation")),
                format!("{}s", cell(s.at("/uptime_s"))),
                installed,
                supervisor,
                format!("{}{deleted}", cell(s.at("/binary"))),
            ]
        })
        .collect();
    let mut text = cli::table::render(
        &[
            "PID",
            "NAME",
            "QEMU",
            "GEN",
            "UPTIME",
            "INSTALLED",
            "SUPERVISOR",
            "BINARY",
        ],
        &rows,
        &["PID", "GEN", "UPTIME"],
    );
    let outdated = vms
        .iter()
        .filter(|(_, s)| s.at("/runs_installed") == false)
        .count();
    let deleted = vms
        .iter()
        .filter(|(_, s)| s.at("/binary_deleted") == true)
        .count();
    if outdated > 0 {
        text.push_str(&format!(
            "{outdated} of {} VMs run an outdated QEMU ({deleted} a binary no longer on disk): qemu-liveupgrade upgrade --all --outdated\n",
            vms.len()
        ));
    }
    let old_supervisors = vms
        .iter()
        .filter(|(_, s)| cli::supervisor::runs_installed(s) == Some(false))
        .count();
    if old_supervisors > 0 {
        text.push_str(&format!(
            "{old_supervisors} of {} VMs run an outdated supervisor (not the installed qemu-liveupgrade-shim): qemu-liveupgrade upgrade --supervisor --all --outdated\n",
            vms.len()
        ));
    }
    for (_, s) in vms
        .iter()
        .filter(|(_, s)| s.at("/runs_installed").is_null())
    {
        text.push_str(&format!(
            "{}: {}\n",
            rollout::label(s),
            s.at("/installed_error")
                .as_str()
                .unwrap_or("its launcher cannot tell which QEMU is installed")
        ));
    }
    text
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
    println!("pid:        {}", s.at("/pid"));
    println!("name:       {}", s.at("/name").as_str().unwrap_or("-"));
    println!(
        "qemu:       {} (pid {})",
        s.at("/version").as_str().unwrap_or("?"),
        s.at("/qemu_pid")
    );
    println!("binary:     {}", s.at("/binary").as_str().unwrap_or("?"));
    println!(
        "supervisor: qemu-liveupgrade {} (build {}) at {}, {}; {} supervisor upgrade(s)",
        s.at("/supervisor/version").as_str().unwrap_or("?"),
        s.at("/supervisor/build").as_str().unwrap_or("?"),
        s.at("/supervisor/exe").as_str().unwrap_or("?"),
        match cli::supervisor::runs_installed(s) {
            Some(true) => "the installed one".to_owned(),
            Some(false) => format!(
                "outdated (not the installed shim): qemu-liveupgrade upgrade --supervisor {}",
                s.at("/name")
                    .as_str()
                    .map_or_else(|| s.at("/pid").to_string(), str::to_owned)
            ),
            None => "whether it is the installed one is unknown".to_owned(),
        },
        s.at("/supervisor/upgrades"),
    );
    println!("machine:    {}", s.at("/machine").as_str().unwrap_or("-"));
    println!("guest RAM:  {}", s.at("/ram").as_str().unwrap_or("?"));
    println!(
        "generation: {} (for {}s; VM up {}s)",
        s.at("/generation"),
        s.at("/generation_uptime_s"),
        s.at("/uptime_s")
    );
    match s.get("last_upgrade").filter(|v| !v.is_null()) {
        Some(u) => println!("last upgrade: {}", describe_upgrade(u)),
        None => println!("last upgrade: none"),
    }
}

fn describe_upgrade(r: &Value) -> String {
    if r.at("/result") == "ok" {
        let mut line = format!(
            "upgraded {} -> {} (generation {}): guest paused {} ms, {} bytes sent, {} ms in all",
            r.at("/from/version").as_str().unwrap_or("?"),
            r.at("/to/version").as_str().unwrap_or("?"),
            r.at("/to/generation"),
            r.at("/downtime_ms"),
            r.at("/ram_bytes"),
            r.at("/total_ms"),
        );
        // What vCPU placement could not carry over (a cgroup with no placer to move into it).
        let unplaced: Vec<&str> = r
            .at("/threads/problems")
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !unplaced.is_empty() {
            line.push_str(&format!("; not placed: {}", unplaced.join("; ")));
        }
        line
    } else {
        format!(
            "upgrade failed, guest still on {} (generation {}): {}",
            r.at("/from/version").as_str().unwrap_or("?"),
            r.at("/generation"),
            r.at("/reason").as_str().unwrap_or("unknown reason"),
        )
    }
}

fn describe_check(name: &str, r: &Value) -> String {
    let target = format!(
        "QEMU {} at {}",
        r.at("/version").as_str().unwrap_or("?"),
        r.at("/binary").as_str().unwrap_or("?")
    );
    if r.at("/ok") == true {
        let translated: Vec<&str> = r
            .at("/translations")
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.at("/was").as_str())
            .collect();
        let mut line = format!("{name}: ok: {target} takes it");
        if !translated.is_empty() {
            line.push_str(&format!(" (translated: {})", translated.join(", ")));
        }
        return line;
    }
    let reasons: Vec<String> = r
        .at("/verdict/reasons")
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{}: {}",
                x.at("/option").as_str().unwrap_or("?"),
                x.at("/why").as_str().unwrap_or("?")
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
