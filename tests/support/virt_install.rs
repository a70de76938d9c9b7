//! The domain hosts really run: what `virt-install --print-xml --import --osinfo debian11`
//! writes at test time (Debian 12's virtinst, `scripts/libvirtd` installs it), changed only
//! where a test machine must differ, and what a test checks on it from outside.
//!
//! The changes ([`Edits`]), each asserted to find what it changes, so that a virt-install
//! that writes something else fails the test instead of slipping past it:
//! - `<kernel>`, `<initrd>`, `<cmdline>`: boot straight into the Linux test guest;
//! - `<interface type='ethernet'>` instead of the default NAT network (`type='network'`,
//!   `default`), which a test machine does not have and must not touch: libvirt makes a tap
//!   with no address, and the guest gets none, so nothing is sent anywhere;
//! - `<emulator>`: the shim;
//! - `<memory>`, `<currentMemory>`: 256 MiB instead of debian11's 1 GiB.
//!
//! virt-install is run with `--virt-type qemu`: the domain it writes for a TCG host (with KVM
//! it adds `<cpu mode='host-passthrough'>`, which TCG cannot run), so the test does not
//! depend on whether the machine has `/dev/kvm`.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::libvirt::{virsh_ok, URI};
use crate::shim::output_within;

/// Graphics as virt-install writes them: its default (SPICE) or `--graphics vnc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Graphics {
    /// `<graphics type='spice' autoport='yes'>`, with its spicevmc channel, USB redirectors
    /// and ich9 sound.
    Spice,
    /// `--graphics vnc`: `<graphics type='vnc' port='-1'>`.
    Vnc,
}

impl Graphics {
    /// The `type` of libvirt's `<graphics>` element.
    pub fn kind(self) -> &'static str {
        match self {
            Graphics::Spice => "spice",
            Graphics::Vnc => "vnc",
        }
    }
}

/// `virt-install --print-xml --import --osinfo debian11 --name NAME --disk path=DISK,format=raw
/// --virt-type qemu [--graphics vnc]`: the domain XML, as virt-install writes it.
pub fn print_xml(name: &str, disk: &Path, graphics: Graphics) -> String {
    let mut cmd = Command::new("virt-install");
    cmd.args([
        "--connect",
        URI,
        "--print-xml",
        "--import",
        "--osinfo",
        "debian11",
    ])
    .args(["--name", name])
    .arg("--disk")
    .arg(format!("path={},format=raw", disk.display()))
    .args(["--virt-type", "qemu"]);
    if graphics == Graphics::Vnc {
        cmd.args(["--graphics", "vnc"]);
    }
    let out = output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "virt-install --print-xml failed ({}); is virtinst installed (scripts/libvirtd installs it)? {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("virt-install prints UTF-8")
}

/// What a test changes in virt-install's domain.
pub struct Edits<'a> {
    /// `<emulator>`: the shim.
    pub emulator: &'a Path,
    /// `<kernel>`.
    pub kernel: &'a Path,
    /// `<initrd>`.
    pub initrd: &'a Path,
    /// `<cmdline>`.
    pub cmdline: &'a str,
    /// `<memory>` and `<currentMemory>`.
    pub mem_mib: u64,
}

/// virt-install's `xml` with `edits` made, and nothing else changed.
pub fn edit(xml: &str, edits: &Edits<'_>) -> String {
    let mut xml = xml.to_owned();
    let kib = (edits.mem_mib << 10).to_string();
    for tag in ["memory", "currentMemory"] {
        xml = replace_element_text(&xml, tag, &kib);
    }
    xml = replace_element_text(&xml, "emulator", &edits.emulator.display().to_string());
    let os_type_end = xml
        .find("hvm</type>")
        .map(|i| i + "hvm</type>".len())
        .unwrap_or_else(|| panic!("virt-install wrote no <type>hvm</type> in <os>:\n{xml}"));
    let boot = format!(
        "\n    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>",
        edits.kernel.display(),
        edits.initrd.display(),
        edits.cmdline
    );
    xml.insert_str(os_type_end, &boot);
    // The NAT network's interface: type ethernet, its <source network=.../> gone, its MAC
    // and model kept.
    let start = xml
        .find("<interface type=\"network\">")
        .unwrap_or_else(|| panic!("virt-install wrote no <interface type=\"network\">:\n{xml}"));
    let end = start
        + xml[start..]
            .find("</interface>")
            .expect("the interface element ends");
    let iface: String = xml[start..end]
        .replace(
            "<interface type=\"network\">",
            "<interface type=\"ethernet\">",
        )
        .lines()
        .filter(|l| !l.trim_start().starts_with("<source network="))
        .collect::<Vec<_>>()
        .join("\n");
    xml.replace_range(start..end, &iface);
    assert!(
        xml.starts_with("<domain type=\"qemu\">"),
        "virt-install --virt-type qemu wrote another domain type:\n{xml}"
    );
    xml
}

/// `<tag>TEXT</tag>` with TEXT replaced, once; panics if `tag` is missing.
fn replace_element_text(xml: &str, tag: &str, text: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("virt-install wrote no <{tag}>:\n{xml}"))
        + open.len();
    let end = start + xml[start..].find(&close).expect("the element ends");
    format!("{}{text}{}", &xml[..start], &xml[end..])
}

/// What the running domain's live XML (`virsh dumpxml`) says about the devices a test checks.
#[derive(Debug)]
pub struct LiveDevices {
    /// The console's pty, `/dev/pts/N`.
    pub console: PathBuf,
    /// The display's TCP port on 127.0.0.1.
    pub display_port: u16,
    /// The guest agent channel's unix socket.
    pub agent: PathBuf,
}

/// Reads [`LiveDevices`] from `virsh dumpxml NAME`.
pub fn live_devices(name: &str, graphics: Graphics) -> LiveDevices {
    let xml = virsh_ok(&["dumpxml", name]);
    let console = element_attr(&xml, "<console type='pty'", "tty")
        .unwrap_or_else(|| panic!("no pty console in the live XML:\n{xml}"));
    let display_port = element_attr(
        &xml,
        &format!("<graphics type='{}'", graphics.kind()),
        "port",
    )
    .and_then(|p| p.parse().ok())
    .unwrap_or_else(|| panic!("no {} port in the live XML:\n{xml}", graphics.kind()));
    let agent_at = xml
        .find("name='org.qemu.guest_agent.0'")
        .unwrap_or_else(|| panic!("no guest agent channel in the live XML:\n{xml}"));
    let channel = xml[..agent_at]
        .rfind("<channel type='unix'>")
        .expect("the agent's channel element");
    let agent = element_attr(&xml[channel..], "<source mode='bind'", "path")
        .unwrap_or_else(|| panic!("the guest agent channel has no path:\n{xml}"));
    LiveDevices {
        console: PathBuf::from(console),
        display_port,
        agent: PathBuf::from(agent),
    }
}

/// The value of `attr` in the first element starting with `start` (libvirt writes single
/// quotes).
fn element_attr(xml: &str, start: &str, attr: &str) -> Option<String> {
    let at = xml.find(start)?;
    let end = at + xml[at..].find('>')?;
    let element = &xml[at..end];
    let key = format!(" {attr}='");
    let from = element.find(&key)? + key.len();
    let len = element[from..].find('\'')?;
    Some(element[from..from + len].to_owned())
}

/// Whether the guest agent's socket takes a connection and keeps it open: the connect
/// succeeds and, with no agent in the guest to say anything, a read waits rather than
/// ending. `Err` says what went wrong.
pub fn agent_accepts(path: &Path) -> Result<(), String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => Err(format!("{} closed the connection at once", path.display())),
        // A guest agent would speak first only when asked; anything is a live peer.
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIRT_INSTALL: &str = r#"<domain type="qemu">
  <name>x</name>
  <memory>1048576</memory>
  <currentMemory>1048576</currentMemory>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <boot dev="hd"/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type="network">
      <source network="default"/>
      <mac address="52:54:00:7c:71:91"/>
      <model type="virtio"/>
    </interface>
    <console type="pty"/>
  </devices>
</domain>
"#;

    #[test]
    fn edits_only_what_it_says() {
        let xml = edit(
            VIRT_INSTALL,
            &Edits {
                emulator: Path::new("/d/bin/qemu-system-x86_64"),
                kernel: Path::new("/d/vmlinux"),
                initrd: Path::new("/d/initrd.gz"),
                cmdline: "console=ttyS0",
                mem_mib: 256,
            },
        );
        assert_eq!(
            xml,
            r#"<domain type="qemu">
  <name>x</name>
  <memory>262144</memory>
  <currentMemory>262144</currentMemory>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <kernel>/d/vmlinux</kernel>
    <initrd>/d/initrd.gz</initrd>
    <cmdline>console=ttyS0</cmdline>
    <boot dev="hd"/>
  </os>
  <devices>
    <emulator>/d/bin/qemu-system-x86_64</emulator>
    <interface type="ethernet">
      <mac address="52:54:00:7c:71:91"/>
      <model type="virtio"/>
    </interface>
    <console type="pty"/>
  </devices>
</domain>
"#
        );
    }

    #[test]
    fn reads_the_live_devices() {
        let xml = "<console type='pty' tty='/dev/pts/7'>\n<graphics type='spice' port='5901' autoport='yes'>\n\
                   <channel type='unix'>\n<source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-x/org.qemu.guest_agent.0'/>\n\
                   <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>";
        assert_eq!(
            element_attr(xml, "<console type='pty'", "tty").as_deref(),
            Some("/dev/pts/7")
        );
        assert_eq!(
            element_attr(xml, "<graphics type='spice'", "port").as_deref(),
            Some("5901")
        );
        assert_eq!(element_attr(xml, "<graphics type='vnc'", "port"), None);
    }
}
