//! The Hub side of `FileSource` against a local stand-in for the Hub (tests/it/hub_support.rs): no
//! network, no HF_* variables (every setting, the token included, is passed explicitly
//! through `HubOptions`), one server and one temporary cache per test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hub_support::{HubServer, Serve};
use wuerstchen::error::{InputError, ModelError};
use wuerstchen::hub::{resolve, resolve_with, DownloadProgress, FileSource, HubError, HubOptions, HubRepo};

const REPO: &str = "owner/name";
const TOKEN: &str = "hf_test_token";

fn options(server: &HubServer, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: server.url(),
        token: Some(TOKEN.to_string()),
        retries: Some(0),
        ..HubOptions::new(cache)
    }
}

fn offline(opts: &HubOptions) -> HubOptions {
    HubOptions {
        offline: true,
        ..opts.clone()
    }
}

/// Deterministic bytes, large enough to arrive in several chunks.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn repo_folder(cache: &Path) -> PathBuf {
    cache.join("models--owner--name")
}

/// Every file (not folder) under `dir`, recursively; symlinks count as files.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The whole chain, as `main` prints it (shown with `--nocapture`).
fn err_text(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    eprintln!("error: {text}");
    text
}

#[test]
fn downloads_into_the_standard_cache_layout() {
    let server = HubServer::start();
    let commit = server.add_repo(REPO);
    let small = br#"{"_class_name": "WuerstchenPrior"}"#.to_vec();
    let big = payload(300_000);
    let small_sha = server.add_file(REPO, "prior/config.json", &small, Serve::Plain);
    let big_sha = server.add_file(REPO, "prior/model.safetensors", &big, Serve::Lfs);
    let cache = tempfile::tempdir().unwrap();
    let repo = HubRepo::new(REPO, None, &options(&server, cache.path())).unwrap();
    assert_eq!(repo.describe(), "owner/name@main");

    let path = repo.get("prior/config.json").unwrap().expect("file exists");
    let folder = repo_folder(cache.path());
    assert_eq!(path, folder.join("snapshots").join(&commit).join("prior/config.json"));
    assert_eq!(std::fs::read(&path).unwrap(), small);
    // snapshots/<commit>/<path> points at blobs/<etag>; refs/main holds the commit.
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    assert_eq!(
        std::fs::canonicalize(&path).unwrap(),
        std::fs::canonicalize(folder.join("blobs").join(&small_sha)).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/main")).unwrap().trim(),
        commit
    );
    // One file, plain: a HEAD (metadata), then a GET (body). Nothing else.
    assert_eq!(
        server.request_lines(),
        [
            "HEAD /owner/name/resolve/main/prior/config.json",
            "GET /owner/name/resolve/main/prior/config.json"
        ]
    );
    assert!(server
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some(&format!("Bearer {TOKEN}"))));

    // LFS-style: the HEAD's 302 is not followed (its X-Linked-* headers are read), the GET
    // follows it to the CDN.
    let n = server.count();
    let path = repo.get("prior/model.safetensors").unwrap().expect("file exists");
    assert_eq!(std::fs::read(&path).unwrap(), big);
    assert_eq!(
        std::fs::canonicalize(&path).unwrap(),
        std::fs::canonicalize(folder.join("blobs").join(&big_sha)).unwrap()
    );
    assert_eq!(
        server.request_lines()[n..],
        [
            "HEAD /owner/name/resolve/main/prior/model.safetensors".to_string(),
            "GET /owner/name/resolve/main/prior/model.safetensors".to_string(),
            format!("GET /cdn/{big_sha}"),
        ]
    );
}

#[test]
fn a_cached_file_is_not_downloaded_again() {
    let server = HubServer::start();
    let commit = server.add_repo(REPO);
    let content = payload(50_000);
    let sha = server.add_file(REPO, "decoder/config.json", &content, Serve::Plain);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let repo = HubRepo::new(REPO, None, &opts).unwrap();

    let first = repo.get("decoder/config.json").unwrap().unwrap();
    let n = server.count();
    // The Hub answers the conditional HEAD with 304.
    let second = repo.get("decoder/config.json").unwrap().unwrap();
    assert_eq!(first, second);
    let reqs = server.requests();
    assert_eq!(reqs.len(), n + 1, "{:?}", server.request_lines());
    assert_eq!(reqs[n].method, "HEAD");
    assert_eq!(reqs[n].header("if-none-match"), Some(format!("\"{sha}\"").as_str()));

    // A server that ignores If-None-Match: the blob is found by its ETag, still no GET.
    server.ignore_if_none_match(true);
    let third = repo.get("decoder/config.json").unwrap().unwrap();
    assert_eq!(third, first);
    assert_eq!(server.count(), n + 2);
    assert_eq!(server.requests()[n + 1].method, "HEAD");

    // Pinned to a commit, a cached file costs no request at all.
    let pinned = HubRepo::new(REPO, Some(&commit), &opts).unwrap();
    assert_eq!(pinned.get("decoder/config.json").unwrap().unwrap(), first);
    assert_eq!(server.count(), n + 2);
    assert_eq!(std::fs::read(first).unwrap(), content);
}

#[test]
fn a_missing_file_is_none_and_a_missing_repo_an_error() {
    let server = HubServer::start();
    let commit = server.add_repo(REPO);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let repo = HubRepo::new(REPO, None, &opts).unwrap();

    assert_eq!(repo.get("tokenizer/tokenizer.json").unwrap(), None);
    // The 404 named the commit: the absence is recorded, as huggingface_hub does.
    assert!(repo_folder(cache.path())
        .join(".no_exist")
        .join(&commit)
        .join("tokenizer/tokenizer.json")
        .exists());

    let missing = HubRepo::new("owner/other", None, &opts).unwrap();
    let err = missing.get("model_index.json").unwrap_err();
    assert!(
        matches!(err.downcast_ref::<HubError>(), Some(HubError::RepoNotFound { .. })),
        "{err:#}"
    );
    let text = err_text(&err);
    assert!(
        text.contains("owner/other@main") && text.contains("model_index.json"),
        "{text}"
    );

    // What the Hub tells anonymous users about a repo it does not have (or hides).
    server.anonymous(true);
    let err = missing.get("model_index.json").unwrap_err();
    assert!(
        matches!(err.downcast_ref::<HubError>(), Some(HubError::RepoNotFound { .. })),
        "{err:#}"
    );
    assert!(err_text(&err).contains("owner/other@main"), "{err:#}");

    let bad_rev = HubRepo::new(REPO, Some("no-such-branch"), &opts).unwrap();
    let err = bad_rev.get("model_index.json").unwrap_err();
    assert!(err_text(&err).contains("owner/name@no-such-branch"), "{err:#}");
}

#[test]
fn offline_uses_the_cache_only() {
    let server = HubServer::start();
    server.add_repo(REPO);
    let content = payload(10_000);
    server.add_file(REPO, "prior/config.json", &content, Serve::Plain);
    server.add_file(REPO, "prior/other.json", b"{}", Serve::Plain);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let online = HubRepo::new(REPO, None, &opts).unwrap();
    let cached = online.get("prior/config.json").unwrap().unwrap();
    assert_eq!(online.get("prior/absent.json").unwrap(), None);
    let n = server.count();

    let repo = HubRepo::new(REPO, None, &offline(&opts)).unwrap();
    assert_eq!(repo.get("prior/config.json").unwrap(), Some(cached));
    // The recorded 404 still counts offline.
    assert_eq!(repo.get("prior/absent.json").unwrap(), None);
    let err = repo.get("prior/other.json").unwrap_err();
    assert!(
        matches!(err.downcast_ref::<HubError>(), Some(HubError::NotCached { .. })),
        "{err:#}"
    );
    let text = err_text(&err);
    for needle in [
        "owner/name@main",
        "prior/other.json",
        "not in the local cache",
        "HF_HUB_OFFLINE",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert_eq!(
        server.count(),
        n,
        "offline made requests: {:?}",
        &server.request_lines()[n..]
    );

    // Nothing cached for this repo at all.
    let never = HubRepo::new("owner/never", None, &offline(&opts)).unwrap();
    let text = err_text(&never.get("model_index.json").unwrap_err());
    assert!(
        text.contains("owner/never@main") && text.contains("model_index.json"),
        "{text}"
    );
    assert_eq!(server.count(), n);
}

/// A port nothing listens on: connections are refused.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn an_unreachable_hub_falls_back_to_the_cache() {
    let server = HubServer::start();
    server.add_repo(REPO);
    let content = payload(1_000);
    server.add_file(REPO, "prior/config.json", &content, Serve::Plain);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let cached = HubRepo::new(REPO, None, &opts)
        .unwrap()
        .get("prior/config.json")
        .unwrap()
        .unwrap();

    let dead = HubOptions {
        endpoint: dead_endpoint(),
        ..opts
    };
    let repo = HubRepo::new(REPO, None, &dead).unwrap();
    let t = Instant::now();
    assert_eq!(repo.get("prior/config.json").unwrap(), Some(cached));
    let err = repo.get("prior/missing.json").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(
        matches!(err.downcast_ref::<HubError>(), Some(HubError::Unreachable { .. })),
        "{err:#}"
    );
    let text = err_text(&err);
    for needle in ["owner/name@main", "prior/missing.json", "could not reach the Hub"] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
}

#[test]
fn a_download_cut_short_leaves_no_snapshot_and_a_retry_succeeds() {
    let server = HubServer::start();
    server.add_repo(REPO);
    let content = payload(200_000);
    let sha = server.add_file(REPO, "decoder/model.safetensors", &content, Serve::CutOnce);
    let cache = tempfile::tempdir().unwrap();
    let repo = HubRepo::new(REPO, None, &options(&server, cache.path())).unwrap();
    let folder = repo_folder(cache.path());

    let err = repo.get("decoder/model.safetensors").unwrap_err();
    let text = err_text(&err);
    assert!(
        text.contains("owner/name@main") && text.contains("decoder/model.safetensors"),
        "{text}"
    );
    assert_eq!(files_under(&folder.join("snapshots")), Vec::<PathBuf>::new());
    assert!(!folder.join("blobs").join(&sha).exists());

    let path = repo.get("decoder/model.safetensors").unwrap().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let blobs = files_under(&folder.join("blobs"));
    assert_eq!(blobs, [folder.join("blobs").join(&sha)], "leftovers in blobs/");
}

#[test]
fn a_body_shorter_than_announced_is_rejected() {
    let server = HubServer::start();
    server.add_repo(REPO);
    let content = payload(100_000);
    server.add_file(REPO, "vqgan/model.safetensors", &content, Serve::ShortBody);
    let cache = tempfile::tempdir().unwrap();
    let repo = HubRepo::new(REPO, None, &options(&server, cache.path())).unwrap();

    let err = repo.get("vqgan/model.safetensors").unwrap_err();
    match err.downcast_ref::<HubError>() {
        Some(HubError::SizeMismatch { expected, got, .. }) => {
            assert_eq!((*expected, *got), (100_000, 50_000));
        }
        _ => panic!("expected SizeMismatch, got {err:#}"),
    }
    let folder = repo_folder(cache.path());
    assert_eq!(files_under(&folder.join("snapshots")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&folder.join("blobs")), Vec::<PathBuf>::new());

    // hf-hub does not check the GET's status: an error page would become the file.
    server.add_file(REPO, "vqgan/config.json", &payload(5_000), Serve::GetFails);
    let err = repo.get("vqgan/config.json").unwrap_err();
    assert!(
        matches!(err.downcast_ref::<HubError>(), Some(HubError::SizeMismatch { .. })),
        "{err:#}"
    );
    assert!(err_text(&err).contains("vqgan/config.json"));
    assert_eq!(files_under(&folder.join("snapshots")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&folder.join("blobs")), Vec::<PathBuf>::new());
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(String, u64),
    Advance(String, u64),
    Finish(String),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl DownloadProgress for Recorder {
    fn start(&self, file: &str, total_bytes: u64) {
        self.0.lock().unwrap().push(Event::Start(file.into(), total_bytes));
    }
    fn advance(&self, file: &str, bytes: u64) {
        self.0.lock().unwrap().push(Event::Advance(file.into(), bytes));
    }
    fn finish(&self, file: &str) {
        self.0.lock().unwrap().push(Event::Finish(file.into()));
    }
}

fn check_events(events: &[Event], file: &str, size: u64) {
    assert_eq!(events.first(), Some(&Event::Start(file.into(), size)), "{events:?}");
    assert_eq!(events.last(), Some(&Event::Finish(file.into())), "{events:?}");
    let middle = &events[1..events.len() - 1];
    let mut sum = 0;
    for e in middle {
        match e {
            Event::Advance(f, n) if f == file && *n > 0 => sum += n,
            other => panic!("unexpected {other:?} in {events:?}"),
        }
    }
    assert_eq!(sum, size, "{events:?}");
}

#[test]
fn progress_events_arrive() {
    let server = HubServer::start();
    server.add_repo(REPO);
    let plain = payload(300_000);
    let lfs = payload(123_457);
    let cut = payload(64_000);
    server.add_file(REPO, "prior/model.safetensors", &plain, Serve::Plain);
    server.add_file(REPO, "decoder/model.safetensors", &lfs, Serve::Lfs);
    server.add_file(REPO, "vqgan/model.safetensors", &cut, Serve::CutOnce);
    let cache = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let repo = HubRepo::new(REPO, None, &options(&server, cache.path()))
        .unwrap()
        .with_progress(Some(recorder.clone()));

    repo.get("prior/model.safetensors").unwrap().unwrap();
    let events = recorder.take();
    check_events(&events, "prior/model.safetensors", 300_000);
    assert!(events.len() > 3, "expected several chunks: {events:?}");

    repo.get("decoder/model.safetensors").unwrap().unwrap();
    check_events(&recorder.take(), "decoder/model.safetensors", 123_457);

    // Cache hits and missing files report nothing.
    repo.get("prior/model.safetensors").unwrap().unwrap();
    assert_eq!(repo.get("nope.json").unwrap(), None);
    assert_eq!(recorder.take(), []);

    // A failed download still ends what it started.
    repo.get("vqgan/model.safetensors").unwrap_err();
    let events = recorder.take();
    assert_eq!(
        events.first(),
        Some(&Event::Start("vqgan/model.safetensors".into(), 64_000))
    );
    assert_eq!(events.last(), Some(&Event::Finish("vqgan/model.safetensors".into())));
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Finish(_))).count(), 1);
}

#[test]
fn resolve_picks_folder_or_repo() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let spec = dir.path().to_str().unwrap();
    let local = resolve(spec, None, None).unwrap();
    assert_eq!(local.describe(), spec);
    assert_eq!(
        local.get("model_index.json").unwrap(),
        Some(dir.path().join("model_index.json"))
    );

    let server = HubServer::start();
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let hub = resolve_with("owner/name", None, &opts, None).unwrap();
    assert_eq!(hub.describe(), "owner/name@main");
    let hub = resolve_with("owner/name", Some("v1.0"), &opts, None).unwrap();
    assert_eq!(hub.describe(), "owner/name@v1.0");
    assert_eq!(server.count(), 0, "resolving must not touch the network");

    // a folder that is not there is a model problem (exit 1), not bad usage
    for spec in ["./nope/x/y", "/nope/at/all", "~/models/x"] {
        let err = resolve(spec, None, None)
            .err()
            .unwrap_or_else(|| panic!("{spec:?} resolved"));
        assert!(
            matches!(err.downcast_ref::<ModelError>(), Some(ModelError::MissingFolder { .. })),
            "{spec:?}: {err:#}"
        );
        assert!(err_text(&err).contains("does not exist"), "{spec:?}: {err:#}");
    }
    for (spec, needle) in [
        ("nope", "not a folder and not a Hub repo id"),
        ("a b/c", "not a folder and not a Hub repo id"),
        ("", "empty"),
    ] {
        let err = resolve(spec, None, None)
            .err()
            .unwrap_or_else(|| panic!("{spec:?} resolved"));
        assert!(err.downcast_ref::<InputError>().is_some(), "{spec:?}: {err:#}");
        assert!(err_text(&err).contains(needle), "{spec:?}: {err:#}");
    }
    // An existing file is not a model folder.
    let file = dir.path().join("model_index.json");
    let err = resolve(file.to_str().unwrap(), None, None).err().unwrap();
    assert!(err.downcast_ref::<InputError>().is_some(), "{err:#}");

    assert!(HubRepo::new("not a repo", None, &opts)
        .unwrap_err()
        .downcast_ref::<InputError>()
        .is_some());
}

#[test]
fn an_ambiguous_spec_says_there_is_no_such_folder() {
    let server = HubServer::start();
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path());
    let src = resolve_with("models/tiny", None, &opts, None).unwrap();
    let text = err_text(&src.get("model_index.json").unwrap_err());
    for needle in ["models/tiny@main", "model_index.json", "no local folder `models/tiny`"] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    // A cache miss mentions the folder only when its parent exists (tests/ does, relative to
    // the crate root where tests run; models/ does not).
    let offline_src = resolve_with("tests/tiny", None, &offline(&opts), None).unwrap();
    let text = err_text(&offline_src.get("model_index.json").unwrap_err());
    assert!(text.contains("no local folder `tests/tiny`"), "{text}");
    let offline_src = resolve_with("models/tiny", None, &offline(&opts), None).unwrap();
    let text = err_text(&offline_src.get("model_index.json").unwrap_err());
    assert!(
        text.contains("not in the local cache") && !text.contains("no local folder"),
        "{text}"
    );
}

/// How long hf-hub's default retry policy takes to give up on a refused connection and on a
/// name that does not resolve. Timing only; run with
/// `cargo test --test it -- --ignored --nocapture hub::default_retry_timing`.
#[test]
#[ignore]
fn default_retry_timing() {
    let cache = tempfile::tempdir().unwrap();
    for endpoint in [dead_endpoint(), "http://hub.invalid".to_string()] {
        let opts = HubOptions {
            endpoint: endpoint.clone(),
            token: Some(TOKEN.to_string()),
            ..HubOptions::new(cache.path())
        };
        let repo = HubRepo::new(REPO, None, &opts).unwrap();
        for _ in 0..3 {
            let t = Instant::now();
            let err = repo.get("model_index.json").unwrap_err();
            eprintln!("{endpoint}: {:?}: {}", t.elapsed(), err_text(&err).len());
            assert!(matches!(
                err.downcast_ref::<HubError>(),
                Some(HubError::Unreachable { .. })
            ));
        }
    }
}
