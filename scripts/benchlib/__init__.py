"""The parts of scripts/bench, the benchmark of this project's live upgrade against QEMU's plain
migration and cpr-transfer: processes, the guest's output, QMP, memory, heartbeat analysis, the
methods, the machine, the report."""
