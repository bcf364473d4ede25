//! Progress reporting, as a trait the pipeline calls: terminal bars in the binary, nothing in
//! tests and library use.

/// Told about each stage and each step of it.
pub trait Progress {
    /// A new stage (`"prior"`, `"decoder"`, `"vqgan"`) of `total` steps begins.
    fn start(&mut self, stage: &str, total: usize);
    /// One step of the current stage is done.
    fn step(&mut self);
    /// The current stage is done.
    fn finish(&mut self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self) {}
    fn finish(&mut self) {}
}

/// Progress bars on stderr (indicatif), one per stage; hidden when stderr is not a terminal.
pub struct TerminalProgress {
    bar: Option<indicatif::ProgressBar>,
    hidden: bool,
    started: std::time::Instant,
    /// (stage, seconds) of the finished stages
    pub timings: Vec<(String, f64)>,
}

impl TerminalProgress {
    /// `quiet` hides the bars; so does a stderr that is not a terminal.
    pub fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            bar: None,
            hidden: quiet || !std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
            timings: Vec::new(),
        }
    }
}

impl Progress for TerminalProgress {
    fn start(&mut self, stage: &str, total: usize) {
        self.started = std::time::Instant::now();
        let bar = if self.hidden {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total as u64)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        self.timings.push((stage.to_string(), 0.0));
        self.bar = Some(bar);
    }

    fn step(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(last) = self.timings.last_mut() {
            last.1 = self.started.elapsed().as_secs_f64();
        }
    }
}

/// Diagnostics go to stderr through `tracing`: info by default, warnings only with `--quiet`,
/// debug/trace with -v/-vv; `RUST_LOG` overrides.
pub fn init_logging(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,wuerstchen={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
