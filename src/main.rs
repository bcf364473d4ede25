//! `wuerstchen`: parse the command line, run it, map the outcome to an exit code
//! (0 success, 2 bad input, 130 interrupted, 1 anything else).

use std::process::ExitCode;

use clap::Parser;
use wuerstchen::error::{InputError, Interrupted};

fn main() -> ExitCode {
    let cli = wuerstchen::cli::Cli::parse();
    match wuerstchen::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            exit_code(&err)
        }
    }
}

fn exit_code(err: &anyhow::Error) -> ExitCode {
    let is = |f: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool| err.chain().any(f);
    if is(&|e| e.is::<Interrupted>()) {
        ExitCode::from(130)
    } else if is(&|e| e.is::<InputError>()) {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
