//! A tiny HTTP/1.1 server with the Hub's download endpoints, enough for hf-hub 1.0:
//! `HEAD`/`GET /{owner}/{name}/resolve/{revision}/{path}` and, for LFS-style files, the
//! absolute redirect to `/cdn/{sha256}` that the Hub answers with. One thread per connection,
//! one request per connection (`Connection: close`), every request logged.
//!
//! What hf-hub 1.0 needs from a resolve response (repository/download.rs):
//! - `X-Repo-Commit`: the commit the revision resolved to (also on an EntryNotFound 404, where
//!   it lets the client write the `.no_exist` marker);
//! - `ETag` or `X-Linked-ETag` (preferred): names the blob in `blobs/`;
//! - `Content-Length` or `X-Linked-Size` (preferred): the size announced to progress handlers;
//! - no `X-Xet-Hash`, or the download goes through the Xet protocol instead of plain HTTP.
//!
//! The HEAD is sent without following redirects (an absolute one is taken as is, its linked
//! headers read); the GET follows them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// How a file's body is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// 200 with `ETag` and `Content-Length`, like a small git-stored file.
    Plain,
    /// 302 to `/cdn/{sha256}` with `X-Linked-ETag` / `X-Linked-Size`, like an LFS file.
    Lfs,
    /// The first GET announces the full `Content-Length` but closes the connection after
    /// half the bytes; later GETs are complete.
    CutOnce,
    /// Every GET sends only the first half, with a matching `Content-Length` (so HTTP sees
    /// nothing wrong), while the HEAD announced the full size.
    ShortBody,
    /// The HEAD is fine, every GET answers 503 with a small JSON body.
    GetFails,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct File {
    content: Vec<u8>,
    sha: String,
    serve: Serve,
    gets: usize,
}

struct Repo {
    commit: String,
    files: HashMap<String, File>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    log: Vec<Request>,
    /// Answer `If-None-Match` with 304 (the Hub does); otherwise 200 as if it were absent.
    ignore_if_none_match: bool,
    /// Answer requests for unknown repos as the Hub does for anonymous users: 401 with
    /// `X-Error-Code: RepoNotFound` (otherwise 404, as for a logged-in user).
    anonymous: bool,
}

pub struct HubServer {
    port: u16,
    state: Arc<Mutex<State>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl HubServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test server");
        let port = listener.local_addr().expect("test server address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = Arc::clone(&shared);
                std::thread::spawn(move || handle(stream, port, &state));
            }
        });
        Self { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adds an empty repo; returns its commit hash.
    pub fn add_repo(&self, id: &str) -> String {
        let commit = sha256_hex(id.as_bytes())[..40].to_string();
        self.state.lock().unwrap().repos.insert(
            id.to_string(),
            Repo {
                commit: commit.clone(),
                files: HashMap::new(),
            },
        );
        commit
    }

    /// Adds a file to a repo; returns its sha256 (the blob name hf-hub will use).
    pub fn add_file(&self, repo: &str, path: &str, content: &[u8], serve: Serve) -> String {
        let sha = sha256_hex(content);
        let mut st = self.state.lock().unwrap();
        let repo = st.repos.get_mut(repo).expect("add_repo first");
        repo.files.insert(
            path.to_string(),
            File {
                content: content.to_vec(),
                sha: sha.clone(),
                serve,
                gets: 0,
            },
        );
        sha
    }

    pub fn ignore_if_none_match(&self, ignore: bool) {
        self.state.lock().unwrap().ignore_if_none_match = ignore;
    }

    pub fn anonymous(&self, anonymous: bool) {
        self.state.lock().unwrap().anonymous = anonymous;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    /// `METHOD /path` for each request so far.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(Request { method, path, headers })
}

struct Response {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes announced in `Content-Length`, when different from `body.len()` (a cut body).
    announced_len: Option<usize>,
}

impl Response {
    fn new(status: &'static str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            announced_len: None,
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
}

fn not_found(code: &str, commit: Option<&str>) -> Response {
    let mut r = Response::new("404 Not Found")
        .header("x-error-code", code)
        .header("x-error-message", format!("{code} (test server)"));
    if let Some(c) = commit {
        r = r.header("x-repo-commit", c);
    }
    r.body = format!("{{\"error\":\"{code}\"}}").into_bytes();
    r
}

fn respond(req: &Request, port: u16, st: &mut State) -> Response {
    let head = req.method == "HEAD";
    if let Some(sha) = req.path.strip_prefix("/cdn/") {
        let file = st.repos.values().flat_map(|r| r.files.values()).find(|f| f.sha == sha);
        return match file {
            Some(f) => {
                let mut r = Response::new("200 OK");
                r.body = f.content.clone();
                r
            }
            None => Response::new("404 Not Found"),
        };
    }
    // /{owner}/{name}/resolve/{revision}/{path...}
    let segs: Vec<&str> = req.path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() != 5 || segs[2] != "resolve" {
        return Response::new("404 Not Found");
    }
    let (repo_id, revision, path) = (format!("{}/{}", segs[0], segs[1]), segs[3], segs[4]);
    let ignore_inm = st.ignore_if_none_match;
    let anonymous = st.anonymous;
    let Some(repo) = st.repos.get_mut(&repo_id) else {
        if anonymous {
            return Response::new("401 Unauthorized")
                .header("x-error-code", "RepoNotFound")
                .header("x-error-message", "Invalid username or password.");
        }
        return not_found("RepoNotFound", None);
    };
    if revision != "main" && revision != repo.commit {
        return not_found("RevisionNotFound", None);
    }
    let commit = repo.commit.clone();
    let Some(file) = repo.files.get_mut(path) else {
        return not_found("EntryNotFound", Some(&commit));
    };
    let quoted = format!("\"{}\"", file.sha);
    if !ignore_inm && req.header("if-none-match") == Some(quoted.as_str()) {
        return Response::new("304 Not Modified")
            .header("x-repo-commit", commit)
            .header("etag", quoted);
    }
    let len = file.content.len();
    match file.serve {
        Serve::Lfs => {
            let mut r = Response::new("302 Found")
                .header("location", format!("http://127.0.0.1:{port}/cdn/{}", file.sha))
                .header("x-repo-commit", commit)
                .header("x-linked-etag", quoted)
                .header("x-linked-size", len.to_string());
            r.body = b"Found. Redirecting".to_vec();
            r
        }
        serve => {
            let mut r = Response::new("200 OK")
                .header("x-repo-commit", commit)
                .header("etag", quoted);
            r.body = file.content.clone();
            if !head {
                file.gets += 1;
                match serve {
                    Serve::CutOnce if file.gets == 1 => {
                        r.body.truncate(len / 2);
                        r.announced_len = Some(len);
                    }
                    Serve::ShortBody => r.body.truncate(len / 2),
                    Serve::GetFails => {
                        r.status = "503 Service Unavailable";
                        r.body = br#"{"error":"try again later"}"#.to_vec();
                    }
                    _ => {}
                }
            }
            r
        }
    }
}

fn handle(mut stream: TcpStream, port: u16, state: &Mutex<State>) {
    let Some(req) = read_request(&stream) else {
        return;
    };
    let resp = {
        let mut st = state.lock().unwrap();
        st.log.push(req.clone());
        respond(&req, port, &mut st)
    };
    let len = resp.announced_len.unwrap_or(resp.body.len());
    let mut head = format!(
        "HTTP/1.1 {}\r\ncontent-length: {len}\r\nconnection: close\r\n",
        resp.status
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    if req.method != "HEAD" {
        // Several writes, so that the client sees several chunks (progress events).
        for chunk in resp.body.chunks(16 * 1024) {
            if stream.write_all(chunk).and_then(|()| stream.flush()).is_err() {
                return;
            }
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}
