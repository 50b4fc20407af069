//! `strait demo`: a live mesh on network namespaces (OPS-1).

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the demo is being built")
}
