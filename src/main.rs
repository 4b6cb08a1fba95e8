//! Entry point: everything lives in the library; this only runs the command line.

/// mimalloc rather than glibc's malloc: a call allocates and frees a few dozen small buffers,
/// and its ledger record is freed on the writer thread: glibc's malloc and free were a visible
/// share of a call's CPU, and mimalloc costs less (bench/HISTORY.md has the A/B runs). Built
/// without transparent huge pages (`no_thp` in Cargo.toml): with them its arenas doubled the
/// peak RSS of many open streams.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mantlegate::cli::main()
}
