//! The `tidemark` binary: `up`, `site` and the admin commands.

use std::process::ExitCode;

use clap::Parser;
use tidemark::cli::{Cli, Cmd};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a site's log file (`up`
    // pipes its stderr there) and a journal get plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

/// Keeps freed I/O buffers (NBD payloads up to 32 MiB, replication frames up
/// to 40 MiB) in the allocator instead of handing them back to the kernel on
/// every free: otherwise each 1 MiB write faults in 256 fresh pages, which
/// cost more CPU than copying the data (measured with perf; ARCHITECTURE.md).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        // Allocations up to 32 MiB (the most glibc allows) come from the
        // heap, not from mmap ...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // ... and up to 256 MiB of free memory stays there.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// `up` starts its sites through a descriptor of its own executable
/// (`/proc/self/fd/N`), so the kernel names them `N`; `pgrep tidemark`,
/// `pidof` and `ps -C` would miss them. The process takes the name of its
/// argv[0] instead (which `up` sets to the executable's path), as any
/// process started by path has.
fn name_process() {
    let Some(arg0) = std::env::args_os().next() else { return };
    let base = std::path::Path::new(&arg0).file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
    // The kernel keeps 15 bytes and a NUL.
    let mut name: Vec<u8> = base.into_iter().filter(|&b| b != 0).take(15).collect();
    if name.is_empty() {
        return;
    }
    name.push(0);
    // SAFETY: a NUL-terminated buffer that outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// Sites hold a file per log segment and a socket per connection: take the
/// whole hard limit on open files, not the customary soft 1024.
fn raise_open_files_limit() {
    match tidemark::util::raise_open_files_limit() {
        Ok((before, after)) if after > before => tracing::debug!("open files limit raised from {before} to {after}"),
        Ok((now, _)) => tracing::debug!("open files limit {now}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

/// clap's error in one line: its first paragraph, whose first line may be
/// followed by the items it names, one per line ("the following required
/// arguments were not provided:" then `<NAME>`, `--size <SIZE>`).
fn usage_problem(text: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty()).take_while(|l| !l.trim().is_empty()).map(str::trim);
    let first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
    let items: Vec<&str> = lines.collect();
    if items.is_empty() {
        first
    } else {
        format!("{} {}", first, items.join(", "))
    }
}

fn main() -> ExitCode {
    tune_allocator();
    name_process();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
            // One line naming the problem, exit 2.
            eprintln!("tidemark: {} (see tidemark --help)", usage_problem(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let res = match &cli.cmd {
        Cmd::Up { port_base, dr_sites, volumes, mode } => {
            init_logging();
            raise_open_files_limit();
            tidemark::up::run(tidemark::up::UpArgs {
                dir: cli.dir.clone().unwrap_or_else(|| "./tidemark-data".into()),
                port_base: *port_base,
                dr_sites: *dr_sites,
                volumes: volumes.clone(),
                mode: mode.clone(),
                json: cli.json,
            })
        }
        Cmd::Init { dir, sites, port_base, mode } => tidemark::up::init(dir, sites, *port_base, mode.clone()),
        Cmd::Site { config } => {
            init_logging();
            tidemark::util::stop_process_on_panic();
            raise_open_files_limit();
            tidemark::site::config::SiteConfig::load(config).and_then(tidemark::site::run)
        }
        _ => {
            // An admin command whose reader went away (`tidemark status |
            // head -1`) ends as `cat` or `ls` would, by SIGPIPE, not with
            // a panic about a failed print. `up` and `site` keep ignoring
            // it: they handle a failed write themselves (`outlet`).
            // SAFETY: restores the default disposition; no handler runs.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            tidemark::cli::run_admin(&cli)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<tidemark::up::AlreadySaid>() => ExitCode::from(1),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "tidemark: {e:#}");
            ExitCode::from(1)
        }
    }
}
