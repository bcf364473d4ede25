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
    /// Whether the user asked to stop (the pipeline checks after every step).
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self) {}
    fn finish(&mut self) {}
}

/// Whether bars stay hidden: asked for (`quiet`), or stderr is not a terminal.
fn bars_hidden(quiet: bool) -> bool {
    use std::io::IsTerminal;
    quiet || !std::io::stderr().is_terminal()
}

/// Where a set of bars drawn together goes: stderr, or nowhere (see `bars_hidden`).
fn multi_progress(quiet: bool) -> indicatif::MultiProgress {
    let target = if bars_hidden(quiet) {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    indicatif::MultiProgress::with_draw_target(target)
}

/// The bars' look: `template`'s fields around a 30-wide `=>` bar.
fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Progress bars on stderr (indicatif), one per stage; hidden when stderr is not a terminal.
pub struct TerminalProgress {
    bar: Option<indicatif::ProgressBar>,
    hidden: bool,
    started: std::time::Instant,
    interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// (stage, seconds) of the stages since the last `take_timings`
    timings: Vec<(String, f64)>,
}

impl TerminalProgress {
    /// `quiet` hides the bars; so does a stderr that is not a terminal.
    /// `interrupt`: set (by a Ctrl-C handler) when the user wants to stop.
    pub fn new(quiet: bool, interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) -> Self {
        Self {
            bar: None,
            hidden: bars_hidden(quiet),
            started: std::time::Instant::now(),
            interrupt,
            timings: Vec::new(),
        }
    }

    /// The (stage, seconds) pairs recorded since the last call.
    pub fn take_timings(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.timings)
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
        bar.set_style(bar_style("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} {elapsed}"));
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

    fn cancelled(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Bars of the bytes of weights loaded, one per stage, drawn together (the stages load side
/// by side); hidden with `quiet` or when stderr is not a terminal.
#[derive(Clone)]
pub struct LoadBars {
    multi: indicatif::MultiProgress,
}

impl LoadBars {
    pub fn new(quiet: bool) -> Self {
        Self {
            multi: multi_progress(quiet),
        }
    }

    /// A bar for loading `stage`, `total` bytes of weight files.
    pub fn stage(&self, stage: &str, total: u64) -> indicatif::ProgressBar {
        let bar = self.multi.add(indicatif::ProgressBar::new(total));
        bar.set_style(bar_style(
            "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} loading",
        ));
        bar.set_prefix(stage.to_string());
        bar
    }
}

/// Download bars on stderr, one per file, for `hub::DownloadProgress`.
pub struct DownloadBars {
    multi: indicatif::MultiProgress,
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
}

impl DownloadBars {
    pub fn new(quiet: bool) -> Self {
        Self {
            multi: multi_progress(quiet),
            bars: Default::default(),
        }
    }
}

impl crate::hub::DownloadProgress for DownloadBars {
    fn start(&self, file: &str, total_bytes: u64) {
        let bar = self.multi.add(indicatif::ProgressBar::new(total_bytes));
        bar.set_style(bar_style(
            "{msg:>40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ));
        bar.set_message(file.to_string());
        tracing::info!("downloading {file} ({:.1} MB)", total_bytes as f64 / 1e6);
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(file.to_string(), bar);
        }
    }

    fn advance(&self, file: &str, bytes: u64) {
        if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(file).cloned()) {
            bar.inc(bytes);
        }
    }

    fn finish(&self, file: &str) {
        if let Some(bar) = self.bars.lock().ok().and_then(|mut b| b.remove(file)) {
            bar.finish_and_clear();
        }
    }
}

/// Diagnostics go to stderr through `tracing`: info by default, warnings only with `--quiet`,
/// debug/trace with -v/-vv; `RUST_LOG` overrides.
pub fn init_logging(quiet: bool, verbose: u8) {
    let directives = match (quiet, verbose) {
        (true, _) => "warn,hf_hub=off",
        (false, 0) => "warn,hf_hub=off,wuerstchen=info",
        (false, 1) => "info,wuerstchen=debug",
        _ => "debug,wuerstchen=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
