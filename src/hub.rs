//! Where model files come from: a local folder in the Hub layout, or a Hub repo through
//! hf-hub and the standard HF cache. The only module that touches the network.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::error::{InputError, ModelError};

/// A diffusers pipeline folder (`model_index.json`, `prior/`, `text_encoder/`, ...), local or
/// on the Hub. Paths are relative to the folder's root, with `/` separators.
pub trait FileSource: Send + Sync {
    /// The file's local path, fetching it first if needed; `Ok(None)` when the source
    /// does not have it.
    fn get(&self, rel_path: &str) -> Result<Option<PathBuf>>;
    /// How to name this source in messages (a folder path or `repo@revision`).
    fn describe(&self) -> String;
    /// The commit a Hub revision resolved to, once known (recorded with every image).
    fn commit(&self) -> Option<String> {
        None
    }

    /// The error for `component`'s file `rel_path`, which this source lacks.
    fn missing(&self, component: &str, rel_path: &str) -> ModelError {
        ModelError::MissingFile {
            component: component.to_string(),
            path: Path::new(&self.describe()).join(rel_path),
        }
    }

    /// [`FileSource::get`] for a file `component` cannot do without.
    fn require(&self, component: &str, rel_path: &str) -> Result<PathBuf> {
        self.get(rel_path)?
            .ok_or_else(|| self.missing(component, rel_path).into())
    }
}

/// `component`'s file `rel_path` in `src` with its text parsed by `parse`, and its path;
/// `None` when the source does not have it. A file that cannot be read as text, or whose text
/// `parse` rejects (its message says why), is the component's bad file.
pub fn read_parsed<T>(
    src: &dyn FileSource,
    component: &str,
    rel_path: &str,
    parse: impl FnOnce(&str) -> std::result::Result<T, String>,
) -> Result<Option<(PathBuf, T)>> {
    let Some(path) = src.get(rel_path)? else {
        return Ok(None);
    };
    let bad = |message| ModelError::bad_file(component, &path, message);
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let value = parse(&text).map_err(bad)?;
    Ok(Some((path, value)))
}

/// A local folder with the Hub layout.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl FileSource for LocalDir {
    fn get(&self, rel_path: &str) -> Result<Option<PathBuf>> {
        let path = self.root.join(rel_path);
        Ok(path.is_file().then_some(path))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// The Hub: hf-hub 1.0 and the standard cache.
// ---------------------------------------------------------------------------------------------

/// `https://huggingface.co`, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch used when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

/// Where the Hub is and how to use it. [`HubOptions::from_env`] is the only place in this
/// crate that reads the environment; everything else takes a `HubOptions`.
#[derive(Clone)]
pub struct HubOptions {
    /// Base URL of the Hub, without a trailing `/` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The cache folder that holds `models--owner--name/{blobs,snapshots,refs}`
    /// (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), shared with
    /// Python's huggingface_hub.
    pub cache_dir: PathBuf,
    /// Access token. `None` lets hf-hub look one up itself (`HF_TOKEN`, `HF_TOKEN_PATH`,
    /// `$HF_HOME/token`, unless `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set): the one environment
    /// read this module leaves to hf-hub, as there is no way to tell it "no token".
    pub token: Option<String>,
    /// Cached files only, never the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Retries after a failed request (connection refused, timeout, 5xx, 429). `None` keeps
    /// hf-hub's default: 5 retries, exponential backoff from 200 ms with jitter (≤ 6.2 s).
    pub retries: Option<usize>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("retries", &self.retries)
            .finish()
    }
}

impl HubOptions {
    /// The public Hub, online, with the cache at `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            retries: None,
        }
    }

    /// The settings huggingface_hub derives from the environment: `HF_ENDPOINT`,
    /// `HF_HUB_CACHE` / `HUGGINGFACE_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME`, and
    /// `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`, any case).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Not hf-hub's `resolve_cache_dir` / `HFClient::new`: they read the process environment
    /// directly (untestable here), take an empty variable as set, and know no `HF_HUB_OFFLINE`.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        // huggingface_hub/constants.py: HF_HOME defaults to $XDG_CACHE_HOME/huggingface or
        // ~/.cache/huggingface; HF_HUB_CACHE (legacy HUGGINGFACE_HUB_CACHE) to $HF_HOME/hub.
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let home = var("HOME").or_else(|| var("USERPROFILE")).unwrap_or_else(|| ".".into());
                Path::new(&home).join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir,
            token: None,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v)),
            retries: None,
        }
    }
}

/// huggingface_hub's `_is_true`: `1`, `true`, `yes`, `on`, in any case (hf-hub has no offline switch).
fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// Told about each file download. `start` and `advance` are called from hf-hub's runtime thread
/// while bytes arrive, so they must not block. Files served from the cache produce no calls.
pub trait DownloadProgress: Send + Sync {
    /// A download of `file` (repo-relative path) begins; `total_bytes` is the size the Hub
    /// announced, 0 if it announced none.
    fn start(&self, file: &str, total_bytes: u64);
    /// `bytes` more bytes of `file` arrived (a delta, not a running total).
    fn advance(&self, file: &str, bytes: u64);
    /// The download of `file` ended, successfully or not; called exactly once after `start`.
    fn finish(&self, file: &str);
}

/// Hub failures a user can act on. Each names the repo (`owner/name@revision`) and, where
/// one file is concerned, the file; hf-hub's `HFError` names neither the revision nor a remedy.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{repo}: `{file}` is not in the local cache ({}) and HF_HUB_OFFLINE is set; run once \
         online to download it{}",
        .cache_dir.display(), folder_hint(.no_local_folder)
    )]
    NotCached {
        repo: String,
        file: String,
        cache_dir: PathBuf,
        /// The spec, when it looks meant as a local folder that does not exist.
        no_local_folder: Option<String>,
    },
    #[error(
        "{repo}: could not reach the Hub at {endpoint} to fetch `{file}`, and it is not in the \
         local cache ({}){}",
        .cache_dir.display(), folder_hint(.no_local_folder)
    )]
    Unreachable {
        repo: String,
        file: String,
        endpoint: String,
        cache_dir: PathBuf,
        no_local_folder: Option<String>,
        #[source]
        source: hf_hub::HFError,
    },
    #[error(
        "{repo}: no such repository or revision on the Hub at {endpoint} (asked for `{file}`; a \
         private or gated repo needs a token: log in or set HF_TOKEN){}",
        folder_hint(.no_local_folder)
    )]
    RepoNotFound {
        repo: String,
        file: String,
        endpoint: String,
        no_local_folder: Option<String>,
        #[source]
        source: Option<hf_hub::HFError>,
    },
    #[error(
        "{repo}: the Hub refused access to `{file}`: a gated or private repo needs a token with \
         access (accept the conditions on the repo page, then log in or set HF_TOKEN)"
    )]
    AccessDenied {
        repo: String,
        file: String,
        #[source]
        source: hf_hub::HFError,
    },
    #[error(
        "{repo}: `{file}` has {got} bytes after downloading, but the Hub announced {expected}; \
         the bad copy was removed, run again to retry"
    )]
    SizeMismatch {
        repo: String,
        file: String,
        expected: u64,
        got: u64,
    },
    #[error("{repo}: could not download `{file}`")]
    Download {
        repo: String,
        file: String,
        #[source]
        source: hf_hub::HFError,
    },
}

fn folder_hint(no_local_folder: &Option<String>) -> String {
    match no_local_folder {
        Some(spec) => format!("; there is no local folder `{spec}` either"),
        None => String::new(),
    }
}

/// A model repo on the Hub at one revision, its files fetched through hf-hub into the standard
/// cache (the layout Python's huggingface_hub uses, so either reuses the other's downloads).
///
/// Online, each `get` costs one HEAD request (with `If-None-Match` when the file is cached, so
/// a cached file is never fetched again); with a commit hash as revision, or offline, cached
/// files cost no request at all.
pub struct HubRepo {
    repo: hf_hub::HFRepositorySync<hf_hub::RepoTypeModel>,
    repo_id: String,
    revision: String,
    options: HubOptions,
    progress: Option<Arc<dyn DownloadProgress>>,
    /// The spec this repo came from, when it could also have named a local folder (set by
    /// `resolve`, which found no such folder).
    no_local_folder: Option<String>,
}

impl std::fmt::Debug for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRepo")
            .field("repo_id", &self.repo_id)
            .field("revision", &self.revision)
            .field("options", &self.options)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl HubRepo {
    /// `repo_id` is `owner/name`; `revision` a branch, tag or commit hash (default `main`).
    /// Builds the HTTP client but makes no request.
    pub fn new(repo_id: &str, revision: Option<&str>, options: &HubOptions) -> Result<Self> {
        if let Err(why) = check_repo_id(repo_id) {
            return Err(InputError::new(format!("`{repo_id}` is not a Hub repo id: {why}")).into());
        }
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        if revision.trim().is_empty() {
            return Err(InputError::new(format!("{repo_id}: the revision is empty")).into());
        }
        let mut builder = hf_hub::HFClient::builder()
            .endpoint(options.endpoint.clone())
            .cache_dir(options.cache_dir.clone())
            .user_agent(format!("wuerstchen/{} (hf-hub)", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &options.token {
            builder = builder.token(token.clone());
        }
        if let Some(retries) = options.retries {
            builder = builder.retry_max_attempts(retries);
        }
        let client = builder.build_sync().map_err(|e| match e {
            hf_hub::HFError::Url(e) => anyhow::Error::new(InputError::new(format!(
                "the Hub endpoint `{}` is not a valid URL: {e}",
                options.endpoint
            ))),
            e => anyhow::Error::new(e).context("creating the Hub client"),
        })?;
        let (owner, name) = hf_hub::split_id(repo_id);
        Ok(Self {
            repo: client.model(owner, name),
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            options: options.clone(),
            progress: None,
            no_local_folder: None,
        })
    }

    /// Reports downloads to `progress`.
    pub fn with_progress(mut self, progress: Option<Arc<dyn DownloadProgress>>) -> Self {
        self.progress = progress;
        self
    }

    /// `owner/name`.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    /// Whether the Hub said `rel_path` does not exist at this revision. hf-hub reports every 404
    /// as EntryNotFound, but writes the `.no_exist` marker only when the 404 named a commit (a
    /// missing file, not a missing repo); its cache-only lookup tells the two apart.
    fn absence_recorded(&self, rel_path: &str) -> bool {
        let cached = self
            .repo
            .download_file()
            .filename(rel_path)
            .revision(self.revision.clone())
            .local_files_only(true)
            .send();
        matches!(cached, Err(hf_hub::HFError::EntryNotFound { .. }))
    }

    /// The commit the revision resolved to: the revision itself when it is a commit hash, else
    /// the snapshot hf-hub's cache-only lookup finds through `refs/<revision>`.
    fn resolved_commit(&self) -> Option<String> {
        if is_commit_hash(&self.revision) {
            return Some(self.revision.clone());
        }
        let snapshot = self
            .repo
            .snapshot_download()
            .revision(self.revision.clone())
            .local_files_only(true)
            .send()
            .ok()?;
        // An empty `refs/<revision>` makes hf-hub return `snapshots/` itself.
        let commit = snapshot.file_name()?.to_str()?;
        is_commit_hash(commit).then(|| commit.to_string())
    }

    /// hf-hub's errors -> [`HubError`]; `Ok(None)` for a file the Hub said is not there.
    fn classify(&self, rel_path: &str, err: hf_hub::HFError) -> Result<Option<PathBuf>> {
        use hf_hub::HFError as E;
        let repo = self.describe();
        let file = rel_path.to_string();
        let endpoint = self.options.endpoint.clone();
        // A repo that is not found may well have been meant as a folder; for a cache miss
        // that is likely only when the folder's parent exists (`models/` for `models/tiny`),
        // and would be noise for the default `warp-ai/...` ids.
        let no_local_folder = self.no_local_folder.clone();
        let parent_exists = |spec: &String| {
            Path::new(spec)
                .parent()
                .is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir())
        };
        let cache_miss_hint = self.no_local_folder.clone().filter(parent_exists);
        let repo_not_found = |source| HubError::RepoNotFound {
            repo: repo.clone(),
            file: file.clone(),
            endpoint: endpoint.clone(),
            no_local_folder: no_local_folder.clone(),
            source,
        };
        let err = match err {
            E::EntryNotFound { .. } if self.absence_recorded(rel_path) => return Ok(None),
            // hf-hub turns every 404 of the HEAD request into EntryNotFound, dropping the
            // `X-Error-Code`; without a recorded commit it was the repo or revision that is
            // missing, and hf-hub's "Entry not found" would only mislead.
            E::EntryNotFound { .. } => repo_not_found(None),
            e @ E::RepoNotFound { .. } | e @ E::RevisionNotFound { .. } => repo_not_found(Some(e)),
            E::LocalEntryNotFound { .. } => HubError::NotCached {
                repo,
                file,
                cache_dir: self.options.cache_dir.clone(),
                no_local_folder: cache_miss_hint,
            },
            E::Request { ref source, .. } if source.is_connect() || source.is_timeout() => HubError::Unreachable {
                repo,
                file,
                endpoint,
                cache_dir: self.options.cache_dir.clone(),
                no_local_folder: cache_miss_hint,
                source: err,
            },
            // Anonymous requests for a missing repo get 401 with `X-Error-Code: RepoNotFound`.
            // (The type of `context` is not exported by hf-hub, hence the inline test.)
            E::AuthRequired { ref context }
                if matches!(context.error_code.as_deref(), Some("RepoNotFound" | "RevisionNotFound")) =>
            {
                repo_not_found(Some(err))
            }
            e @ E::AuthRequired { .. } | e @ E::Forbidden { .. } => HubError::AccessDenied { repo, file, source: e },
            e => HubError::Download { repo, file, source: e },
        };
        Err(err.into())
    }

    /// hf-hub neither checks the GET's status nor compares the finished download with the
    /// size the HEAD announced (huggingface_hub does the latter): an error page (a 503 after
    /// the retries) or a body cut short without a Content-Length would otherwise stay in the
    /// cache as the file.
    fn check_size(&self, rel_path: &str, path: &Path, bridge: &ProgressBridge) -> Result<()> {
        let Some(expected) = bridge.downloaded_size() else {
            return Ok(());
        };
        let got = std::fs::metadata(path)
            .with_context(|| format!("{}: reading the downloaded `{rel_path}`", self.describe()))?
            .len();
        if got == expected {
            return Ok(());
        }
        if let Ok(blob) = std::fs::canonicalize(path) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(path);
        Err(HubError::SizeMismatch {
            repo: self.describe(),
            file: rel_path.to_string(),
            expected,
            got,
        }
        .into())
    }
}

impl FileSource for HubRepo {
    fn get(&self, rel_path: &str) -> Result<Option<PathBuf>> {
        check_rel_path(rel_path)
            .map_err(|why| anyhow::anyhow!("{}: refusing to fetch `{rel_path}`: {why}", self.describe()))?;
        let bridge = Arc::new(ProgressBridge::new(self.progress.clone()));
        let result = self
            .repo
            .download_file()
            .filename(rel_path)
            .revision(self.revision.clone())
            .local_files_only(self.options.offline)
            .progress(hf_hub::progress::Progress::from(Arc::clone(&bridge)))
            .send();
        bridge.close(rel_path);
        match result {
            Ok(path) => {
                self.check_size(rel_path, &path, &bridge)?;
                Ok(Some(path))
            }
            Err(err) => self.classify(rel_path, err),
        }
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.repo_id, self.revision)
    }

    fn commit(&self) -> Option<String> {
        self.resolved_commit()
    }
}

/// Turns hf-hub's download events for one file into [`DownloadProgress`] calls, and remembers
/// the size the Hub announced for the size check. hf-hub sends running totals, and a `Complete`
/// for cache hits too; `DownloadProgress` wants one start, deltas and one finish per download.
struct ProgressBridge {
    sink: Option<Arc<dyn DownloadProgress>>,
    state: Mutex<BridgeState>,
}

#[derive(Default)]
struct BridgeState {
    /// From `DownloadEvent::Start`, sent after the HEAD request (also for cache hits).
    announced: Option<u64>,
    /// A body transfer began (`FileStatus::Started` / `InProgress`).
    started: bool,
    done: u64,
}

impl ProgressBridge {
    fn new(sink: Option<Arc<dyn DownloadProgress>>) -> Self {
        Self {
            sink,
            state: Mutex::new(BridgeState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BridgeState> {
        // A panicking sink poisons the lock; the counts inside stay usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn file_event(&self, st: &mut BridgeState, file: &hf_hub::progress::FileProgress) {
        if !st.started {
            // Also sent, without a start, when the blob was already cached: no bar for that.
            if file.status == hf_hub::progress::FileStatus::Complete {
                return;
            }
            st.started = true;
            if let Some(sink) = &self.sink {
                sink.start(&file.filename, file.total_bytes);
            }
        }
        if file.bytes_completed > st.done {
            let delta = file.bytes_completed - st.done;
            st.done = file.bytes_completed;
            if let Some(sink) = &self.sink {
                sink.advance(&file.filename, delta);
            }
        }
    }

    /// After the call, whether hf-hub completed the download or failed: a started one ends.
    fn close(&self, rel_path: &str) {
        if let (true, Some(sink)) = (self.lock().started, &self.sink) {
            sink.finish(rel_path);
        }
    }

    /// The announced size of a file whose body was downloaded by this call.
    fn downloaded_size(&self) -> Option<u64> {
        let st = self.lock();
        st.announced.filter(|&n| st.started && n > 0)
    }
}

impl hf_hub::progress::ProgressHandler for ProgressBridge {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent, ProgressEvent};
        let mut st = self.lock();
        match event {
            ProgressEvent::Download(DownloadEvent::Start { total_bytes, .. }) => st.announced = Some(*total_bytes),
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                for file in files {
                    self.file_event(&mut st, file);
                }
            }
            _ => {}
        }
    }
}

/// hf-hub's `is_commit_hash` is crate-private: a pinned commit is known before anything is cached.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Hub naming rules for `owner/name` (huggingface_hub's `validate_repo_id`, owner required):
/// ASCII letters, digits, `-`, `_`, `.`; each part 1..=96 characters, starting and ending with
/// a letter or digit or `_`; no `--` or `..` (`--` separates the parts of cache folder names);
/// not ending in `.git`. hf-hub checks nothing (`split_id` takes any string).
pub fn check_repo_id(id: &str) -> std::result::Result<(), &'static str> {
    let Some((owner, name)) = id.split_once('/') else {
        return Err("expected `owner/name`");
    };
    if name.contains('/') {
        return Err("expected exactly one `/`, as in `owner/name`");
    }
    for part in [owner, name] {
        if part.is_empty() {
            return Err("the owner and the name must not be empty");
        }
        if part.len() > 96 {
            return Err("the owner and the name may have at most 96 characters each");
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err("the owner and the name must not start or end with `-` or `.`");
        }
    }
    if id.contains("--") || id.contains("..") {
        return Err("`--` and `..` are not allowed");
    }
    if id.ends_with(".git") {
        return Err("the name must not end in `.git`");
    }
    Ok(())
}

/// A repo-relative file path must stay inside the snapshot folder it is joined to (hf-hub joins
/// it unchecked, so `../` would escape the cache).
fn check_rel_path(rel_path: &str) -> std::result::Result<(), &'static str> {
    if rel_path.is_empty() {
        return Err("empty path");
    }
    if rel_path.starts_with('/') || rel_path.contains('\\') || rel_path.contains(':') {
        return Err("not a relative path with `/` separators");
    }
    if rel_path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err("empty, `.` or `..` path segment");
    }
    Ok(())
}

/// Whether a spec that is neither a folder nor a repo id was meant as a local path.
fn looks_like_path(spec: &str) -> bool {
    spec.starts_with(['.', '/', '~']) || spec.contains('\\') || spec.matches('/').count() > 1
}

/// A model spec -> its files: an existing folder is a [`LocalDir`] (`revision` ignored),
/// `owner/name` a [`HubRepo`] at `revision` (settings from the environment, see
/// [`HubOptions::from_env`]); anything else is an [`InputError`]. Makes no request.
pub fn resolve(
    spec: &str,
    revision: Option<&str>,
    progress: Option<Arc<dyn DownloadProgress>>,
) -> Result<Box<dyn FileSource>> {
    resolve_with(spec, revision, &HubOptions::from_env(), progress)
}

/// [`resolve`] with explicit Hub settings.
pub fn resolve_with(
    spec: &str,
    revision: Option<&str>,
    options: &HubOptions,
    progress: Option<Arc<dyn DownloadProgress>>,
) -> Result<Box<dyn FileSource>> {
    if spec.trim().is_empty() {
        return Err(InputError::new("the model is empty: give a folder or a Hub repo id (owner/name)").into());
    }
    let path = Path::new(spec);
    if path.is_dir() {
        // A revision only means something for Hub repos (the CLI always passes one).
        return Ok(Box::new(LocalDir::new(path)));
    }
    if path.exists() {
        return Err(InputError::new(format!("`{spec}` is a file, not a model folder")).into());
    }
    if check_repo_id(spec).is_ok() {
        let mut repo = HubRepo::new(spec, revision, options)?.with_progress(progress);
        repo.no_local_folder = Some(spec.to_string());
        return Ok(Box::new(repo));
    }
    if looks_like_path(spec) {
        // a model problem (exit 1) rather than bad usage: the folder named is not there
        let tilde = if spec.starts_with('~') {
            " (`~` is not expanded here)"
        } else {
            ""
        };
        return Err(crate::error::ModelError::MissingFolder {
            path: path.to_path_buf(),
            hint: format!(", and `{spec}` is not a Hub repo id (owner/name){tilde}"),
        }
        .into());
    }
    let msg = {
        let why = check_repo_id(spec).err().unwrap_or("invalid");
        format!("`{spec}` is not a folder and not a Hub repo id (owner/name): {why}")
    };
    Err(InputError::new(msg).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_hub_rules() {
        for ok in [
            "warp-ai/wuerstchen",
            "warp-ai/wuerstchen-prior",
            "a/b",
            "Org_1/model.v2",
            "_x/y_",
            "models/tiny",
            &format!("o/{}", "n".repeat(96)),
        ] {
            assert_eq!(check_repo_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "wuerstchen",
            "/name",
            "owner/",
            "a/b/c",
            "a b/c",
            "a/b c",
            "-a/b",
            "a-/b",
            "a/.b",
            "a/b.",
            "a/b-",
            "a/b..c",
            "a/b--c",
            "a/b.git",
            "ü/b",
            "a\\b",
            "./a",
            &format!("o/{}", "n".repeat(97)),
        ] {
            assert!(check_repo_id(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn offline_values() {
        for v in ["1", "true", "TRUE", "Yes", "on", " on "] {
            assert!(is_truthy(v), "{v}");
        }
        for v in ["", "0", "false", "no", "off", "2", "y"] {
            assert!(!is_truthy(v), "{v}");
        }
    }

    #[test]
    fn options_from_vars() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(o.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline && o.token.is_none());

        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, Path::new("/xdg/huggingface/hub"));
        let o = HubOptions::from_vars(vars(&[("HF_HOME", "/hf"), ("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, Path::new("/hf/hub"));
        let o = HubOptions::from_vars(vars(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]));
        assert_eq!(o.cache_dir, Path::new("/legacy"));
        let o = HubOptions::from_vars(vars(&[
            ("HF_HOME", "/hf"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "Yes"),
        ]));
        assert_eq!(o.cache_dir, Path::new("/c"));
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert!(o.offline);
        // Empty means unset, as in the shell idiom `HF_HOME= cmd`.
        let o = HubOptions::from_vars(vars(&[("HOME", "/h"), ("HF_HOME", ""), ("HF_HUB_OFFLINE", "")]));
        assert_eq!(o.cache_dir, Path::new("/h/.cache/huggingface/hub"));
        assert!(!o.offline);
    }

    #[test]
    fn rel_paths_stay_inside_the_snapshot() {
        for ok in [
            "model_index.json",
            "prior/config.json",
            "text_encoder/model.safetensors",
        ] {
            assert_eq!(check_rel_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "C:x",
            "a/",
        ] {
            assert!(check_rel_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn path_like_specs() {
        for p in ["./x", "../x", "/abs", "~/models", "a/b/c", "a\\b", ".hidden"] {
            assert!(looks_like_path(p), "{p}");
        }
        for p in ["owner/name", "name", "a b/c"] {
            assert!(!looks_like_path(p), "{p}");
        }
    }

    #[test]
    fn cache_folder_names() {
        // The layout hf-hub reads: <cache>/models--owner--name/{refs,snapshots,.no_exist}.
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let folder = cache.path().join("models--warp-ai--wuerstchen");
        std::fs::create_dir_all(folder.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), commit).unwrap();
        std::fs::create_dir_all(folder.join(".no_exist").join(commit)).unwrap();
        std::fs::write(folder.join(".no_exist").join(commit).join("absent.json"), "").unwrap();
        let repo = HubRepo::new("warp-ai/wuerstchen", None, &HubOptions::new(cache.path())).unwrap();
        assert_eq!(repo.commit().as_deref(), Some(commit));
        assert!(repo.absence_recorded("absent.json"));
        assert!(!repo.absence_recorded("present.json"));
        std::fs::write(folder.join("refs/empty"), "").unwrap();
        let empty_ref = HubRepo::new("warp-ai/wuerstchen", Some("empty"), &HubOptions::new(cache.path())).unwrap();
        assert_eq!(empty_ref.commit(), None);
        assert!(is_commit_hash(commit));
        assert!(!is_commit_hash("main"));
    }
}
