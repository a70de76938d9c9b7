//! What an upgrade learns before it starts anything: what the new binary accepts, and the
//! argv a later generation gets there ([`crate::translate`]), asked through a probe the
//! supervisor's loop drives so that monitors and consoles are served meanwhile.

use std::path::Path;

use mio::unix::SourceFd;
use mio::Interest;

use crate::generation::{generation_cmdline, GenArgs};
use crate::supervisor::{Supervisor, Token};
use crate::translate::probe::{FileKey, Probe, PROBE_TIMEOUT};
use crate::translate::{self, Capabilities, Translated};
use crate::verdict::Verdict;

impl Supervisor {
    /// What `binary` accepts for this VM's argv and machine type, asked once per binary file.
    pub(crate) fn capabilities(&mut self, binary: &Path) -> Result<Capabilities, String> {
        let args = GenArgs {
            machine: self.machine.clone(),
            incoming: true,
            target: None,
        };
        let cmd = generation_cmdline(&self.config.base, &args);
        let questions = translate::questions(&cmd, self.machine.as_deref());
        let key = FileKey::of(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
        if let Some(caps) = self.probes.get(&key, &questions) {
            return Ok(caps.clone());
        }
        // As long as a new QEMU gets to start: a binary that hangs here would hang there too.
        let timeout = crate::upgrade::start_timeout().min(PROBE_TIMEOUT);
        let signals = &self.config.signals;
        let probe = Probe::start(binary, &self.config.argv0, &questions, signals, timeout)
            .map_err(|e| crate::error_chain(&e))?;
        let fds = probe.fds();
        for fd in &fds {
            // Both pipes wake the same handler, which reads both.
            let _ = self.poll.registry().register(
                &mut SourceFd(fd),
                Token::Probe.to_mio(),
                Interest::READABLE,
            );
        }
        let deadline = probe.deadline();
        self.probes.active = Some(probe);
        let _ = self.wait_until("the new QEMU's answers", deadline, |s| {
            s.probes.active.as_ref().is_none_or(Probe::is_done)
        });
        for fd in &fds {
            let _ = self.poll.registry().deregister(&mut SourceFd(fd));
        }
        let probe = self.probes.active.take().ok_or("the probe went missing")?;
        // Its processes are reaped by the supervisor's SIGCHLD handling, like any child.
        let caps = probe.finish().map_err(|e| crate::error_chain(&e))?;
        self.probes.insert(key, questions, caps.clone());
        Ok(caps)
    }

    /// Reads what a probe's pipes hold.
    pub(crate) fn on_probe(&mut self) {
        if let Some(probe) = self.probes.active.as_mut() {
            probe.on_readable();
        }
    }

    /// The argv a generation started with `args` gets on the binary `args.target` describes,
    /// or every option that binary cannot be given.
    pub(crate) fn translated(&self, args: &GenArgs) -> Result<Option<Translated>, Verdict> {
        let Some(caps) = &args.target else {
            return Ok(None);
        };
        let plain = GenArgs {
            target: None,
            ..args.clone()
        };
        translate::translate(&generation_cmdline(&self.config.base, &plain), caps).map(Some)
    }
}
