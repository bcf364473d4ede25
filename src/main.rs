//! `wuerstchen`: parse the command line (`cli`), run it, map the outcome to an exit code
//! (0 success, 2 bad input, 130 interrupted, 1 anything else).

use std::process::ExitCode;

use wuerstchen::error::{InputError, Interrupted};

mod cli;

/// Lets CPU weights live in their files' mappings instead of copies (see `mapping.rs`).
#[global_allocator]
static ALLOCATOR: wuerstchen::mapping::MappingAware = wuerstchen::mapping::MappingAware;

fn main() -> ExitCode {
    wuerstchen::mapping::keep_freed_memory();
    park_idle_workers();
    match cli::run(cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            if let Some(hint) = hint(&err) {
                eprintln!("hint: {hint}");
            }
            exit_code(&err)
        }
    }
}

/// candle runs elementwise ops on a thread pool of its own, whose idle workers spin for a
/// while before sleeping, while matrix products and our kernels run on rayon's: the spinning
/// took cores from the working threads (mid-size model, 2 cores: 5.6-6.0 s -> 4.8-5.2 s per
/// image with the spinning off). A value the user sets wins.
fn park_idle_workers() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // before any thread exists (edition 2021: set_var is safe to call)
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
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

/// The error and its causes on one line. candle appends a backtrace to some of its errors'
/// messages; only their first lines are kept.
fn message(err: &anyhow::Error) -> String {
    let parts: Vec<String> = err.chain().map(|e| first_line(&e.to_string()).to_string()).collect();
    parts.join(": ")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_hints() {
        let input = anyhow::Error::new(InputError::new("bad")).context("while planning");
        assert_eq!(exit_code(&input), ExitCode::from(2));
        assert_eq!(exit_code(&anyhow::Error::new(Interrupted)), ExitCode::from(130));
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), ExitCode::from(1));
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("decoder");
        assert!(hint(&oom).is_some_and(|h| h.contains("--low-memory") && h.contains("--dtype")));
        assert!(hint(&anyhow::anyhow!("something else")).is_none());
        let with_trace = anyhow::anyhow!("cuInit failed\n   0: candle_core::error::Error::bt\n   1: main")
            .context("cannot open CUDA device 0");
        assert_eq!(message(&with_trace), "cannot open CUDA device 0: cuInit failed");
    }
}
