//! The `branchline-load` binary: parses flags, runs one scenario on one tokio runtime, prints
//! the table, writes the JSON report, and exits 0 (passed), 1 (a stream broke or a
//! connection failed) or 2 (the run could not be set up). `summary` prints the bench table.

use std::process::ExitCode;

use branchline_load::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Summary { dir, strict }) => summary(&dir, strict),
        None => run(&cli.run),
    }
}

fn summary(dir: &std::path::Path, strict: bool) -> ExitCode {
    match branchline_load::summary::summarize(dir) {
        Ok(s) => {
            print!("{}", s.table);
            println!(
                "\n{} run(s) failed their stream checks, {} target(s) missed",
                s.failed_runs, s.missed
            );
            if s.failed_runs > 0 || (strict && s.missed > 0) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("branchline-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &branchline_load::RunArgs) -> ExitCode {
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(2)
        .max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("branchline-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match runtime.block_on(branchline_load::run(args)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("branchline-load: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.report {
        if let Err(e) = report.write(path) {
            eprintln!("branchline-load: {e:#}");
            return ExitCode::from(2);
        }
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
