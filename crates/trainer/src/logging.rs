//! Log lines of the command-line tools through `tracing`, on stderr, filtered by `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Installs the stderr subscriber of the command-line tools: the directives of `RUST_LOG`
/// (`RUST_LOG=debug`, `RUST_LOG=slime_trainer=warn`), `info` and above when it is unset;
/// colours only on a terminal. Invalid directives are reported and skipped; a subscriber
/// installed earlier is kept.
pub fn init_logging() {
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    // Err only when a subscriber exists already, which then stays in charge.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
