//! Entry point: everything lives in the library; this only runs the command line.

/// mimalloc rather than glibc's malloc: a call allocates and frees a few dozen small buffers,
/// and its ledger record is freed on the writer thread. Under bench/run.sh, glibc's malloc and
/// free were about 7 % of a non-streamed call's CPU; with mimalloc the call costs 1.7 µs
/// (7 %) less. Built without transparent huge pages (`no_thp` in Cargo.toml): with them its
/// arenas doubled the peak RSS of 1,000 open streams (47 to 94 MiB).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mantlegate::cli::main()
}
