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
            if let Some(hint) = hint(&err) {
                eprintln!("hint: {hint}");
            }
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

/// What to try next, for failures with a known remedy.
fn hint(err: &anyhow::Error) -> Option<&'static str> {
    let text = format!("{err:#}").to_ascii_lowercase();
    if text.contains("out of memory") || text.contains("out_of_memory") {
        Some(
            "the device ran out of memory: try --dtype bf16 (or f16), --low-memory to hold one stage \
             at a time, or a smaller size / fewer --num-images",
        )
    } else {
        None
    }
}
