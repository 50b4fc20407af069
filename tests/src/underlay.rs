//! What crosses the underlay: tcpdump in the fabric namespace while a step runs, read back as
//! TCP segments, so tests and the demo can show which ports carried the traffic and whether any
//! payload was readable.

use std::{
    fs, io,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

use crate::{Process, Topology, pcap};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Captures started by this process, to name each one's files.
static CAPTURES: AtomicU32 = AtomicU32::new(0);

/// A running capture of every TCP packet on the fabric's interfaces.
pub struct UnderlayCapture {
    process: Process,
    file: PathBuf,
}

impl UnderlayCapture {
    pub fn start(topo: &Topology) -> io::Result<Self> {
        // A log of its own per capture: waiting for "listening on" in a log an earlier capture
        // wrote would start the step before this tcpdump listens.
        let n = CAPTURES.fetch_add(1, Ordering::Relaxed);
        let file = topo.dir().join(format!("underlay-{}-{n}.pcap", std::process::id()));
        let path = file.to_string_lossy().into_owned();
        // `-Z root`: write the file as root (the topology directory is root's); immediate mode so
        // nothing captured is still buffered when it stops.
        let args = ["-i", "any", "-Z", "root", "--immediate-mode", "-U", "-n", "-w", &path, "tcp"];
        let process = topo.fabric().spawn(&format!("tcpdump-{n}"), "tcpdump", &args, &[])?;
        process.wait_for_log("listening on", START_TIMEOUT)?;
        Ok(Self { process, file })
    }

    /// Stops the capture and returns the TCP segments it saw.
    pub fn finish(self) -> io::Result<Vec<pcap::Segment>> {
        // Late packets of the last exchange are still on their way.
        thread::sleep(Duration::from_millis(300));
        self.process.terminate(libc::SIGINT)?;
        self.process.wait_exit(START_TIMEOUT);
        let bytes = fs::read(&self.file)?;
        let _ = fs::remove_file(&self.file);
        pcap::tcp_segments(&bytes).map_err(io::Error::other)
    }
}
