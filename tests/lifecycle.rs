//! Everything libvirt does to a VM, done to the same domain under plain QEMU (Debian's
//! packaged binary as `<emulator>`) and under the shim, and compared row by row: virsh's
//! result, `virsh domstate --reason`, how the guest came out of it from inside (its status
//! lines went on, went back or began a new boot; its memory check still passes; its CPUs and
//! RAM), and what the operation itself showed. A third pass does every operation on the shim
//! right after an upgrade of its QEMU.
//!
//! libvirtd runs with Debian's packaged qemu.conf (`scripts/libvirtd`). One domain runs at a
//! time: `libvirt-guests` suspends every running domain on the host.

use qemu_liveupgrade_tests::libvirt::ensure_libvirtd;
use qemu_liveupgrade_tests::lifecycle_domain::{LcDomain, Runner};
use qemu_liveupgrade_tests::lifecycle_ops::{perform, Outcome, OPS};

/// The passes: who runs the domain, and whether each operation comes right after an upgrade.
const PASSES: [(Runner, bool, &str); 3] = [
    (Runner::Plain, false, "plain QEMU"),
    (Runner::Shim, false, "shim"),
    (Runner::Shim, true, "shim, after an upgrade"),
];

#[test]
fn every_libvirt_operation_is_the_same_under_the_shim() {
    ensure_libvirtd();
    let mut passes: Vec<Vec<Outcome>> = Vec::new();
    for (runner, upgrade_first, label) in PASSES {
        let mut dom = LcDomain::define(runner);
        dom.boot();
        let mut outcomes = Vec::new();
        for op in OPS {
            let started = std::time::Instant::now();
            let outcome = perform(op, &mut dom, upgrade_first);
            let took = started.elapsed().as_secs_f64();
            eprintln!("lifecycle: {label}: {} ({took:.1} s): {outcome}", op.name);
            outcomes.push(outcome);
        }
        passes.push(outcomes);
    }

    let mut table = String::from("| operation | pass | result | domstate --reason | guest | detail |\n|---|---|---|---|---|---|\n");
    let mut different = Vec::new();
    for (i, op) in OPS.iter().enumerate() {
        for (pass, (_, _, label)) in passes.iter().zip(PASSES) {
            let o = &pass[i];
            table.push_str(&format!(
                "| {} | {label} | {} | {} | {}, memory {}, cpus {}, {} MiB | {} |\n",
                op.name,
                o.result,
                o.state,
                o.guest.course,
                o.guest.memory,
                o.guest.cpus,
                o.guest.ram_mib,
                o.detail
            ));
        }
        let plain = &passes[0][i];
        if passes.iter().any(|p| &p[i] != plain) {
            different.push(op.name);
        }
    }
    eprintln!("{table}");

    // Plain QEMU itself behaved as the suite expects, so that agreeing with it means
    // something.
    for (op, o) in OPS.iter().zip(&passes[0]) {
        assert_eq!(o.result, "ok", "{}: plain QEMU: {o}", op.name);
        assert_eq!(o.guest.course, op.course, "{}: plain QEMU: {o}", op.name);
        assert_eq!(o.guest.memory, "intact", "{}: plain QEMU: {o}", op.name);
    }
    assert!(
        different.is_empty(),
        "operations whose outcome under the shim differs from plain QEMU's: {different:?}\n{table}"
    );
}
