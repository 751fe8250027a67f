use std::process::ExitCode;

use clap::Parser;

// glibc's malloc measured about 12% of the gateway's CPU under load (arena locks shared by the
// two workers and the ledger writer, consolidation of freed buffers); mimalloc's thread-local
// heaps cut that (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tollgate::cli::run(tollgate::cli::Cli::parse())
}
