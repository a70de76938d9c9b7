//! Guest RAM on huge pages, at first launch and across upgrades 7.2.22 -> 10.0.2 -> 7.2.22:
//! `memory-backend-memfd,hugetlb=on,hugetlbsize=` on two NUMA nodes, libvirt's
//! `<memoryBacking><hugepages/>` (a `memory-backend-file` on a hugetlbfs mount), and 1 GiB
//! pages. The pages are reserved by each test through sysfs and given back after; every
//! QEMU generation's mapping of guest RAM is checked to have the page size asked for.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::unistd::Pid;
use qemu_liveupgrade_tests::liveupgrade::UpgradeVm;
use qemu_liveupgrade_tests::shim::qemu_child;
use qemu_liveupgrade_tests::{guest_argv, tempdir};
use serde_json::Value;

/// The tests share the machine's huge page pools: one at a time in this process.
static POOLS: Mutex<()> = Mutex::new(());

/// Huge pages of one size reserved for a test, given back when dropped.
struct Reserved {
    file: PathBuf,
    before: u64,
}

impl Reserved {
    /// Adds `pages` pages of `kib` KiB to the pool, or says why that could not be done.
    fn add(kib: u64, pages: u64) -> Result<Reserved, String> {
        let file = PathBuf::from(format!(
            "/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
        ));
        let read = |f: &Path| -> Result<u64, String> {
            let text = fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            text.trim()
                .parse()
                .map_err(|e| format!("{}: {e}", f.display()))
        };
        let before = read(&file)?;
        let reserved = Reserved { file, before };
        fs::write(&reserved.file, (before + pages).to_string())
            .map_err(|e| format!("{}: {e}", reserved.file.display()))?;
        let now = read(&reserved.file)?;
        if now < before + pages {
            return Err(format!(
                "the kernel gave {} of {pages} huge pages of {kib} KiB (memory too fragmented)",
                now - before
            ));
        }
        Ok(reserved)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let _ = fs::write(&self.file, self.before.to_string());
    }
}

/// A hugetlbfs mount in a directory of its own, unmounted when dropped.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn hugetlbfs(dir: &Path, pagesize: &str) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o"])
            .arg(format!("pagesize={pagesize}"))
            .arg("hugetlbfs")
            .arg(dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t hugetlbfs failed: {status}");
        Mount {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// The kernel page size, in KiB, of the QEMU's mapping of the launcher's memfd for `id`.
fn ram_page_kib(qemu: Pid, id: &str) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{qemu}/smaps")).expect("smaps");
    let name = format!("memfd:qemu-liveupgrade:{id}");
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        if !line.contains(&name) {
            continue;
        }
        for field in lines.by_ref() {
            if let Some(v) = field.strip_prefix("KernelPageSize:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("QEMU {qemu} has no mapping of {name}");
}

/// Upgrades `vm` along `versions` (the first is where it runs), checking after each step that
/// the guest is healthy and every region in `ram` is mapped with `kib` KiB pages.
fn upgrade_through(vm: &UpgradeVm, versions: &[&str], ram: &[&str], kib: u64) {
    let check = |vm: &UpgradeVm| {
        let qemu = qemu_child(vm.vm.pid()).expect("a QEMU");
        for id in ram {
            assert_eq!(ram_page_kib(qemu, id), kib, "{id} in QEMU {qemu}");
        }
        vm.assert_guest_healthy(300);
    };
    check(vm);
    for pair in versions.windows(2) {
        vm.install(pair[1]);
        let report = vm.upgrade();
        assert_eq!(report["result"], "ok", "{report}");
        assert_eq!(report["to"]["version"], pair[1], "{report}");
        assert_eq!(report["ram"], "shared", "{report}");
        let sent = report["ram_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(sent < 16 << 20, "{sent} bytes of RAM sent: {report}");
        check(vm);
    }
}

#[test]
fn memfd_2m_pages_on_two_numa_nodes() {
    let _one = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let _pages = Reserved::add(2048, 128 + 8).expect("2 MiB huge pages for the test");
    let vm = UpgradeVm::start(
        "7.2.22",
        256,
        &[
            "-object",
            "memory-backend-memfd,id=m0,size=128M,hugetlb=on,hugetlbsize=2M",
            "-object",
            r#"{"qom-type":"memory-backend-memfd","id":"m1","size":134217728,"hugetlb":true,"hugetlbsize":2097152}"#,
            "-numa",
            "node,nodeid=0,cpus=0,memdev=m0",
            "-numa",
            "node,nodeid=1,memdev=m1",
        ],
    );
    upgrade_through(&vm, &["7.2.22", "10.0.2", "7.2.22"], &["m0", "m1"], 2048);
}

#[test]
fn libvirt_hugepages_file_backend_on_hugetlbfs() {
    let _one = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let _pages = Reserved::add(2048, 128 + 8).expect("2 MiB huge pages for the test");
    let dir = tempdir();
    let mount = Mount::hugetlbfs(&dir.join("hugepages2M"), "2M");
    // As libvirt writes <memoryBacking><hugepages/> (tests/qemuxmlconfdata/hugepages-default).
    let path = mount.dir.join("libvirt/qemu/1-hp");
    fs::create_dir_all(&path).unwrap();
    let object = serde_json::json!({
        "qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": path,
        "x-use-canonical-path-for-ramblock-id": false, "prealloc": true, "size": 256u64 << 20,
    });
    let vm = UpgradeVm::start_with(
        "7.2.22",
        guest_argv(256),
        &[
            "-machine",
            "memory-backend=pc.ram",
            "-object",
            &object.to_string(),
        ],
        &[],
    );
    upgrade_through(&vm, &["7.2.22", "10.0.2", "7.2.22"], &["pc.ram"], 2048);
    drop(vm);
    // QEMU never made a file of its own there: the launcher's memfd stood in for it.
    assert_eq!(fs::read_dir(&path).unwrap().count(), 0);
}

#[test]
fn memfd_1g_pages() {
    let _one = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let pages = match Reserved::add(1048576, 1) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED memfd_1g_pages: no 1 GiB huge page to be had here: {why}");
            return;
        }
    };
    let vm = UpgradeVm::start(
        "7.2.22",
        1024,
        &[
            "-object",
            "memory-backend-memfd,id=ram1g,size=1G,hugetlb=on,hugetlbsize=1G",
            "-machine",
            "memory-backend=ram1g",
        ],
    );
    upgrade_through(&vm, &["7.2.22", "10.0.2"], &["ram1g"], 1048576);
    drop(vm);
    drop(pages);
}

#[test]
fn plan_shows_the_page_size() {
    let p = qemu_liveupgrade_tests::shim::cli_json(
        {
            let mut cmd = std::process::Command::new(qemu_liveupgrade_tests::cli_bin());
            cmd.args(["plan", "--json", "--", "-m", "2G", "-object"])
                .arg("memory-backend-memfd,id=m,size=2G,hugetlb=on,hugetlbsize=1G")
                .args(["-machine", "q35,memory-backend=m"])
                .env(
                    "QEMU_LIVEUPGRADE_BINARY",
                    qemu_liveupgrade_tests::system_qemu(),
                );
            cmd
        },
        "plan",
    );
    let memfd: &Value = &p["guest_ram"]["memfds"][0];
    assert_eq!(memfd["huge_page_size"], 1u64 << 30, "{p}");
}
