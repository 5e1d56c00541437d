//! `sluice`: one binary that captures events, keeps them in a durable log and lands them
//! exactly-once in Delta Lake tables you can query with SQL.

mod auth;
mod ingest;
mod metrics_setup;
mod query_cli;
mod reload;
mod replay;
mod tap;
mod send;
mod snapshot;
mod server;
mod stream_cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc instead of glibc's malloc: change capture allocates each change on the reader's
/// thread and frees it on the log's and the mirror's, where glibc's arenas contend on their
/// locks (MariaDB streaming ~40% faster; ingest and landing within noise; bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in the environment
/// overrides them). One arena instead of four per core: the lake converts each flush on
/// threads of its own, and with many arenas every flush's buffers came from another arena,
/// whose freed pages the next flush could not reuse. The 1M-event bulk run peaks at 342
/// instead of 421 MiB with ~1% less CPU (bench/RESULTS.md). Small allocations stay in each
/// thread's cache; only large ones (request bodies, Arrow buffers: thousands a second, not
/// millions) take the arena's lock.
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
#[used]
static MALLOC_CONF: &[u8; 10] = b"narenas:1\0";

#[derive(Parser)]
#[command(name = "sluice", version, about = "Events over HTTP into a durable log, landed exactly-once in Delta Lake, queryable with SQL")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the server (HTTP ingest, log, lake landing, query).
    Up {
        /// Config file (sluice.yaml). Without it: 127.0.0.1:7878, data in ./sluice-data.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file without starting anything.
    Check {
        #[arg(short, long, default_value = "sluice.yaml")]
        config: PathBuf,
    },
    /// Send NDJSON from a file (or - for stdin) to a stream, in batches.
    Send(send::SendArgs),
    /// Run SQL over the lake tables.
    Query(query_cli::QueryArgs),
    /// Make a running server re-read its config file (same as SIGHUP): pipelines added,
    /// removed and changed with no lost or duplicated records.
    Reload(reload::ReloadArgs),
    /// Run records through a pipeline again: its dead letters (--dlq), a lake table
    /// (--from-table) or a stream from an offset or time (--stream --from). Progress bar.
    Replay(replay::ReplayArgs),
    /// Print live records passing a step of a running pipeline (NDJSON).
    Tap(tap::TapArgs),
    /// Re-read tables of a change-data-capture source (all captured tables, one, or some
    /// keys) while changes keep streaming. Progress bar.
    Snapshot(snapshot::SnapshotArgs),
    /// Streams of a running server: `sluice stream stats [STREAM]` shows raw vs stored
    /// bytes per record, by codec and by compression-dictionary version.
    Stream(stream_cli::StreamArgs),
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { config } => match load_config(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(e) => Err(e),
        },
        Cmd::Up { config } => {
            let cfg = match &config {
                Some(path) => load_config(path),
                None => Ok(sluice_core::Config::default()),
            };
            cfg.and_then(|cfg| runtime().block_on(server::run(cfg, config)))
        }
        Cmd::Send(args) => runtime().block_on(send::run(args)),
        Cmd::Query(args) => runtime().block_on(query_cli::run(args)),
        Cmd::Reload(args) => runtime().block_on(reload::run_cli(args)),
        Cmd::Replay(args) => runtime().block_on(replay::run_cli(args)),
        Cmd::Tap(args) => runtime().block_on(tap::run_cli(args)),
        Cmd::Snapshot(args) => runtime().block_on(snapshot::run_cli(args)),
        Cmd::Stream(args) => runtime().block_on(stream_cli::run_cli(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and checks a config file, pipelines' SQL included: what `sluice check` reports and
/// what `sluice up` refuses to start with.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<sluice_core::Config> {
    let cfg = sluice_core::config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    sluice_pipeline::check::check_config(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cfg)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// glibc malloc, tuned before any thread starts. Since Rust's allocations go to jemalloc
/// (above), this covers only what C libraries allocate with malloc themselves (zstd's contexts,
/// among others); the reasons below are from when glibc held everything, and
/// the bounds still apply to what it holds. The lake sink allocates and frees tens of
/// MiB per flush on several threads; by default glibc gives each thread its own arena (up to
/// 8 per core) and raises its mmap threshold after every large free, so freed flushes stayed
/// in the heap: the 1M-event bulk benchmark peaked at ~560 MiB RSS. Two arenas and a fixed
/// mmap threshold (larger buffers are mapped and returned on free) keep it bounded (mimalloc
/// was measured too: faster by a little, no smaller). The threshold is 16 MiB, not lower: at
/// 1 MiB every request body and `sluice send` batch (a few MB) was mapped fresh and faulted in
/// page by page, a third of the sender's time; 16 MiB keeps those in the heap, still maps the
/// lake's flush-sized buffers, and the bulk run peaks at ~460 MiB (bench/RESULTS.md).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
    }
}
