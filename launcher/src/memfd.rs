//! Guest RAM the launcher owns, so that no generation has to copy it.
//!
//! At first launch the launcher creates one memfd per guest RAM region and rewrites the
//! command line so that QEMU maps each one as a named shared file:
//! `memory-backend-file,mem-path=/proc/self/fd/N,share=on`. Every generation gets the same
//! memfd at the same N, so all of them map the same pages. With the migration capability
//! `x-ignore-shared` set on both sides, QEMU then skips those RAM blocks entirely.
//!
//! Why a *file* backend and not `memory-backend-memfd`: since QEMU 8.1, `x-ignore-shared` skips
//! only blocks backed by a named file (`RAM_NAMED_FILE`); memfd-backed RAM is sent in full
//! (see ../shared/FACTS.md). A path under /proc/self/fd is a named file to QEMU.

use std::ffi::CString;
use std::os::fd::{OwnedFd, RawFd};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde_json::Value;

use crate::cmdline::{CmdLine, Item, OptArg};
use crate::resources::parse_size;

/// Id of the backend the launcher adds when the command line only has `-m`, for machine types
/// whose own id it does not know (see [`default_ram_id`]).
pub const RAM_ID: &str = "qemu-liveupgrade.ram";

/// The id QEMU gives the RAM backend it makes for `-m` on `machine` (the machine class's
/// `default_ram_id`; `None`: no `-machine`, x86's `pc`). It names the RAM block in the
/// migration stream, so the launcher's backend takes it too: a save file or a live migration
/// of the VM then carries what QEMU's would, and a QEMU on the other side, plain or under the
/// launcher, accepts it (QEMU refuses a stream naming a RAM block it lacks: "Unknown ramblock").
pub fn default_ram_id(machine: Option<&str>) -> &'static str {
    let Some(machine) = machine else {
        return "pc.ram";
    };
    let is = |prefix: &str| machine.starts_with(prefix);
    if is("pc") || is("q35") || is("isapc") || is("xenfv") {
        "pc.ram"
    } else if is("microvm") {
        "microvm.ram"
    } else if is("pseries") {
        "ppc_spapr.ram"
    } else if is("s390-ccw-virtio") {
        "s390.ram"
    } else {
        RAM_ID
    }
}

/// QEMU's default RAM for x86 machines when no `-m` is given.
const DEFAULT_RAM: u64 = 128 << 20;

/// A failure creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create guest RAM {id} of {size} bytes")]
    Create {
        /// The backend id.
        id: String,
        /// Its size.
        size: u64,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

/// One RAM region the launcher will own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The memory backend id, kept from the command line or the machine's [`default_ram_id`].
    pub id: String,
    /// Bytes.
    pub size: u64,
    /// Backed by huge pages (`MFD_HUGETLB`), because the command line asked for them.
    pub hugetlb: bool,
    /// The huge page size in bytes: `hugetlbsize=` of a memfd backend, or the page size of
    /// the hugetlbfs mount a file backend names (`pagesize=` of that mount: libvirt's
    /// `/dev/hugepages1G/...`). 0 means the kernel's default huge page size.
    pub page_size: u64,
    /// Where the backend is on the command line.
    origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// `-m` alone: a backend object is added and named by `-machine memory-backend=`.
    MachineRam,
    /// The `-object` at this index of the command line's items is rewritten.
    Object(usize),
}

/// Why guest RAM cannot be shared; such a VM's RAM goes through the migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unshareable(pub String);

/// Finds the RAM regions of a command line, or why they cannot be owned by the launcher.
pub fn regions(cmd: &CmdLine) -> Result<Vec<Region>, Unshareable> {
    if cmd.has("mem-path") {
        return Err(Unshareable(
            "-mem-path maps RAM from a file only QEMU knows".into(),
        ));
    }
    let machine = cmd.opts("machine").last().and_then(|o| o.parse_arg());
    if machine.as_ref().and_then(|m| m.get("type")).as_deref() == Some("none") {
        return Err(Unshareable("machine none has no RAM".into()));
    }
    let mut regions = Vec::new();
    for (index, item) in cmd.items.iter().enumerate() {
        let Item::Opt(opt) = item else { continue };
        if opt.name != "object" {
            continue;
        }
        let Some(arg) = opt.parse_arg() else { continue };
        let Some(kind) = arg.get("qom-type") else {
            continue;
        };
        let id = arg.get("id").unwrap_or_default();
        let size = arg.get("size").and_then(|s| parse_size(&s, false));
        let mut page_size = 0;
        let hugetlb = match kind.as_str() {
            "memory-backend-ram" => false,
            "memory-backend-memfd" => {
                page_size = arg
                    .get("hugetlbsize")
                    .and_then(|s| parse_size(&s, false))
                    .unwrap_or(0);
                is_on(arg.get("hugetlb"))
            }
            "memory-backend-file" => {
                let path = arg.get("mem-path").unwrap_or_default();
                let hugetlbfs = hugetlbfs_page_size(&path);
                let on_hugetlbfs = hugetlbfs.is_some();
                page_size = hugetlbfs.unwrap_or(0);
                // A regular file that QEMU already maps shared is a named shared file: every
                // generation maps it by path and x-ignore-shared skips it as it is.
                if !on_hugetlbfs && is_on(arg.get("share")) {
                    continue;
                }
                if !on_hugetlbfs {
                    return Err(Unshareable(format!(
                        "memory backend {id} maps {path} privately (share=off)"
                    )));
                }
                true
            }
            _ => continue,
        };
        let Some(size) = size else {
            return Err(Unshareable(format!("memory backend {id} has no size")));
        };
        regions.push(Region {
            id,
            size,
            hugetlb,
            page_size: if hugetlb { page_size } else { 0 },
            origin: Origin::Object(index),
        });
    }
    let has_backend = machine
        .as_ref()
        .and_then(|m| m.get("memory-backend"))
        .is_some();
    let numa_memdev = cmd
        .opts("numa")
        .filter_map(|o| o.parse_arg())
        .any(|a| a.get("memdev").is_some());
    if !has_backend && !numa_memdev {
        let size = match cmd.opts("m").last().and_then(|o| o.parse_arg()) {
            Some(m) => m
                .get("size")
                .and_then(|s| parse_size(&s, true))
                .ok_or_else(|| Unshareable("-m has no size the launcher understands".into()))?,
            None => DEFAULT_RAM,
        };
        let machine_type = machine.as_ref().and_then(|m| m.get("type"));
        regions.push(Region {
            id: default_ram_id(machine_type.as_deref()).to_owned(),
            size,
            hugetlb: false,
            page_size: 0,
            origin: Origin::MachineRam,
        });
    }
    Ok(regions)
}

fn is_on(v: Option<String>) -> bool {
    matches!(v.as_deref(), Some("on" | "true" | "yes" | "y"))
}

/// The huge page size of the hugetlbfs `path` is on, or `None` when it is not on one. A
/// mem-path naming a directory means QEMU creates (and unlinks) its own file there, which is
/// how hugetlbfs is used; that file is invisible to the next generation, so the launcher
/// backs such RAM with a memfd of the same page size instead. hugetlbfs reports its page
/// size as the block size (`statfs(2)`).
fn hugetlbfs_page_size(path: &str) -> Option<u64> {
    const HUGETLBFS_MAGIC: i64 = 0x958458f6;
    if path.is_empty() {
        return None;
    }
    let fs = nix::sys::statfs::statfs(path).ok()?;
    (fs.filesystem_type().0 == HUGETLBFS_MAGIC).then(|| fs.block_size() as u64)
}

/// `memfd_create(2)` flags for huge pages of `page_size` bytes: `MFD_HUGETLB`, with the page
/// size's log2 in the bits at `MFD_HUGE_SHIFT` (26) when it is not the default, as
/// `MFD_HUGE_2MB` and `MFD_HUGE_1GB` are defined.
fn hugetlb_flags(page_size: u64) -> MemFdCreateFlag {
    const MFD_HUGE_SHIFT: u32 = 26;
    let mut flags = MemFdCreateFlag::MFD_HUGETLB;
    if page_size.is_power_of_two() {
        let log2 = page_size.trailing_zeros();
        flags |= MemFdCreateFlag::from_bits_retain((log2 << MFD_HUGE_SHIFT) as libc::c_uint);
    }
    flags
}

/// Creates the memfd for a region, sized; close-on-exec until placed into a generation.
pub fn create(region: &Region) -> Result<OwnedFd, MemfdError> {
    let fail = |source| MemfdError::Create {
        id: region.id.clone(),
        size: region.size,
        source,
    };
    let name = CString::new(format!("qemu-liveupgrade:{}", region.id)).unwrap_or_default();
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC;
    if region.hugetlb {
        flags |= hugetlb_flags(region.page_size);
    }
    let fd = memfd_create(&name, flags).map_err(fail)?;
    nix::unistd::ftruncate(&fd, region.size as i64).map_err(fail)?;
    Ok(fd)
}

/// Rewrites `cmd` so that region `i` is mapped from `/proc/self/fd/<fds[i]>`.
pub fn rewrite(cmd: &CmdLine, regions: &[Region], fds: &[RawFd]) -> CmdLine {
    let mut cmd = cmd.clone();
    for (region, fd) in regions.iter().zip(fds) {
        let path = format!("/proc/self/fd/{fd}");
        match region.origin {
            Origin::Object(index) => {
                let Some(Item::Opt(opt)) = cmd.items.get_mut(index) else {
                    continue;
                };
                let Some(mut arg) = opt.parse_arg() else {
                    continue;
                };
                as_shared_file(&mut arg, &path);
                opt.set_arg(&arg);
            }
            Origin::MachineRam => {
                let size = region.size.to_string();
                let object = format!(
                    "memory-backend-file,id={},size={size},mem-path={path},share=on",
                    region.id
                );
                cmd.push("object", Some(&object));
                set_machine_key(&mut cmd, "memory-backend", &region.id);
            }
        }
    }
    cmd
}

/// Turns a memory-backend-{ram,memfd,file} into a shared file backend on `path`, keeping its
/// id and every property a file backend also has.
fn as_shared_file(arg: &mut OptArg, path: &str) {
    arg.set("qom-type", "memory-backend-file");
    // Properties only memory-backend-memfd knows; the memfd itself now carries huge pages.
    for key in ["hugetlb", "hugetlbsize", "seal"] {
        arg.remove(key);
    }
    arg.set("mem-path", path);
    match arg {
        OptArg::Json(map) => {
            map.insert("share".into(), Value::Bool(true));
        }
        OptArg::KeyVal(_) => arg.set("share", "on"),
    }
}

/// Sets `key=value` on the last `-machine` (the one QEMU honours), or adds `-machine`.
pub fn set_machine_key(cmd: &mut CmdLine, key: &str, value: &str) {
    let last = cmd.items.iter_mut().rev().find_map(|item| match item {
        Item::Opt(o) if o.name == "machine" => Some(o),
        _ => None,
    });
    match last {
        Some(opt) => match opt.parse_arg() {
            Some(mut arg) => {
                arg.set(key, value);
                opt.set_arg(&arg);
            }
            None => cmd.push("machine", Some(&format!("{key}={value}"))),
        },
        None => cmd.push("machine", Some(&format!("{key}={value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::testing::{parse, strings};

    #[test]
    fn plain_m_gets_a_file_backend_and_machine_memory_backend() {
        let cmd = parse(&["-machine", "pc,accel=tcg", "-m", "256"]);
        let r = regions(&cmd).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].id.as_str(), r[0].size, r[0].hugetlb),
            ("pc.ram", 256 << 20, false)
        );
        let out = strings(&rewrite(&cmd, &r, &[9]));
        assert_eq!(
            out,
            [
                "-machine",
                "pc,accel=tcg,memory-backend=pc.ram",
                "-m",
                "256",
                "-object",
                "memory-backend-file,id=pc.ram,size=268435456,mem-path=/proc/self/fd/9,share=on",
            ]
        );
    }

    #[test]
    fn the_backend_takes_the_id_qemu_gives_the_machine_s_ram() {
        for (machine, id) in [
            ("q35,accel=tcg", "pc.ram"),
            ("pc-q35-7.2", "pc.ram"),
            ("microvm", "microvm.ram"),
            ("type=pseries", "ppc_spapr.ram"),
            ("virt", RAM_ID),
        ] {
            let r = regions(&parse(&["-machine", machine, "-m", "64"])).unwrap();
            assert_eq!(r[0].id, id, "{machine}");
        }
    }

    #[test]
    fn no_m_means_the_default_and_adds_a_machine_option() {
        let cmd = parse(&["-nographic"]);
        let r = regions(&cmd).unwrap();
        assert_eq!(r[0].size, 128 << 20);
        let out = strings(&rewrite(&cmd, &r, &[5]));
        assert!(out.contains(&"memory-backend=pc.ram".to_owned()), "{out:?}");
    }

    #[test]
    fn libvirt_json_ram_object_keeps_id_and_properties() {
        let cmd = parse(&[
            "-machine",
            "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
            "-m",
            "256",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#,
        ]);
        let r = regions(&cmd).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].id.as_str(), r[0].size), ("pc.ram", 268435456));
        let out = strings(&rewrite(&cmd, &r, &[31]));
        let obj: Value = serde_json::from_str(&out[5]).unwrap();
        assert_eq!(obj["qom-type"], "memory-backend-file");
        assert_eq!(obj["id"], "pc.ram");
        assert_eq!(obj["mem-path"], "/proc/self/fd/31");
        assert_eq!(obj["share"], true);
        assert_eq!(
            out[1],
            "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram"
        );
    }

    #[test]
    fn numa_memfd_backends_are_rewritten_without_a_machine_backend() {
        let cmd = parse(&[
            "-m",
            "1G",
            "-object",
            "memory-backend-memfd,id=m0,size=512M,hugetlb=on,prealloc=on",
            "-object",
            "memory-backend-ram,id=m1,size=512M",
            "-numa",
            "node,memdev=m0",
            "-numa",
            "node,memdev=m1",
        ]);
        let r = regions(&cmd).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.id.as_str(), r.hugetlb))
                .collect::<Vec<_>>(),
            [("m0", true), ("m1", false)]
        );
        let out = strings(&rewrite(&cmd, &r, &[7, 8]));
        assert_eq!(
            out[3],
            "memory-backend-file,id=m0,size=512M,prealloc=on,mem-path=/proc/self/fd/7,share=on"
        );
        assert_eq!(
            out[5],
            "memory-backend-file,id=m1,size=512M,mem-path=/proc/self/fd/8,share=on"
        );
        assert!(!out.iter().any(|a| a.contains("memory-backend=")));
    }

    #[test]
    fn private_file_mappings_and_mem_path_are_unshareable() {
        assert!(regions(&parse(&["-m", "1G", "-mem-path", "/dev/hugepages"])).is_err());
        assert!(regions(&parse(&[
            "-object",
            "memory-backend-file,id=r,size=1G,mem-path=/var/lib/ram.img,share=off",
            "-machine",
            "pc,memory-backend=r",
        ]))
        .is_err());
        // Already a shared named file: left alone, nothing to own.
        let shared = parse(&[
            "-object",
            "memory-backend-file,id=r,size=1G,mem-path=/var/lib/ram.img,share=on",
            "-machine",
            "pc,memory-backend=r",
        ]);
        assert_eq!(regions(&shared).unwrap(), vec![]);
    }

    #[test]
    fn huge_page_sizes_are_kept() {
        let cmd = parse(&[
            "-object",
            "memory-backend-memfd,id=m0,size=1G,hugetlb=on,hugetlbsize=1G",
            "-object",
            r#"{"qom-type":"memory-backend-memfd","id":"m1","size":1073741824,"hugetlb":true,"hugetlbsize":2097152}"#,
            "-object",
            "memory-backend-memfd,id=m2,size=1G,hugetlb=on",
            "-object",
            "memory-backend-memfd,id=m3,size=1G,hugetlbsize=2M",
            "-numa",
            "node,memdev=m0",
        ]);
        let r = regions(&cmd).unwrap();
        let got: Vec<(bool, u64)> = r.iter().map(|r| (r.hugetlb, r.page_size)).collect();
        assert_eq!(
            got,
            [(true, 1 << 30), (true, 2 << 20), (true, 0), (false, 0)]
        );
        // MFD_HUGE_2MB is 21 << 26, MFD_HUGE_1GB 30 << 26 (linux/memfd.h).
        assert_eq!(hugetlb_flags(2 << 20).bits(), 0x4 | (21 << 26));
        assert_eq!(hugetlb_flags(1 << 30).bits(), 0x4 | (30 << 26));
        assert_eq!(hugetlb_flags(0).bits(), 0x4);
        // The rewritten backend is a shared file: no memfd-only property is left.
        let out = strings(&rewrite(&cmd, &r, &[7, 8, 9, 10]));
        assert_eq!(
            out[1],
            "memory-backend-file,id=m0,size=1G,mem-path=/proc/self/fd/7,share=on"
        );
    }

    #[test]
    fn memfd_is_sized() {
        let r = Region {
            id: "t".into(),
            size: 4 << 20,
            hugetlb: false,
            page_size: 0,
            origin: Origin::MachineRam,
        };
        let fd = create(&r).unwrap();
        assert_eq!(
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
                .unwrap()
                .st_size,
            4 << 20
        );
    }
}
