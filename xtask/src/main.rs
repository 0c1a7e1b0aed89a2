//! `cargo xtask <command>`: see [`xtask::Task`] or `cargo xtask help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    xtask::run(xtask::Cli::parse())
}
