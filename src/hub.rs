//! Files of a model on the Hugging Face Hub, through the local cache: what is cached is used as
//! it is, what is not is downloaded with `hf-hub`'s blocking API (`hf_hub::api::sync`, over
//! ureq) into the same cache layout (`$HF_HOME/hub/models--org--name/{blobs,refs,snapshots}`),
//! so that Python's `huggingface_hub` and vramcal share one cache.
//!
//! The environment is read as `huggingface_hub` reads it (its `constants.py`): `HF_HOME` (the
//! cache's root), `HF_ENDPOINT` (another Hub or a mirror), `HF_TOKEN` (a token for gated and
//! private repositories, before the token file `huggingface-cli login` writes) and
//! `HF_HUB_OFFLINE` (`1`/`true`/`yes`/`on`: the cache only, never the network).
//!
//! A transfer is trusted only when it delivered the size the Hub announced (`Content-Range`
//! of hf-hub's first request): a shorter file is put back as the `.part` file hf-hub resumes
//! from (a `Range` request from its length) and its snapshot link removed, so the cache never
//! serves a truncated file and the next run resumes the transfer.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::Cache;

use crate::error::{Error, Result};

/// The Hub as this process sees it: the cache, the endpoint, the token and whether the network
/// may be used.
pub struct Hub {
    cache: Cache,
    endpoint: String,
    token: Option<String>,
    offline: bool,
    progress: bool,
    timeout: std::time::Duration,
}

/// `huggingface_hub`'s default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Whether an environment value is one of the true values `huggingface_hub` accepts
/// (`1`, `ON`, `YES`, `TRUE`, any case; its `_is_true`).
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl Hub {
    /// The Hub of the environment (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`); a
    /// progress bar on standard error where it is a terminal.
    pub fn from_env() -> Self {
        // `HF_HUB_CACHE` names the hub folder itself, before `HF_HOME/hub`; an empty value is
        // unset (hf-hub would cache into `./hub`).
        let set = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let cache = match (set("HF_HUB_CACHE"), set("HF_HOME")) {
            (Some(hub), _) => Cache::new(PathBuf::from(hub)),
            (None, Some(_)) => Cache::from_env(),
            (None, None) => Cache::default(),
        };
        let timeout = std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(10.0);
        // huggingface_hub's order: HF_TOKEN, its old name, then the token file (HF_TOKEN_PATH,
        // else `$HF_HOME/token`).
        let token = set("HF_TOKEN")
            .or_else(|| set("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| match set("HF_TOKEN_PATH") {
                Some(p) => std::fs::read_to_string(p)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()),
                None => cache.token(),
            });
        Hub {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .map(|e| e.trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_true(&v)),
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            timeout: std::time::Duration::from_secs_f64(timeout.min(86_400.0)),
            cache,
        }
    }

    /// The cache's root (the folder holding `models--org--name`).
    pub fn cache_dir(&self) -> &Path {
        self.cache.path()
    }

    /// Whether `HF_HUB_OFFLINE` forbids the network.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// The cached copy of `filename` of model `id`, if any (no network).
    pub fn cached(&self, id: &str, filename: &str) -> Option<PathBuf> {
        self.cache.model(id.to_string()).get(filename)
    }

    /// `filename` of model `id`: the cached copy, or else downloaded into the cache (resuming a
    /// `.part` file an earlier transfer left), with a progress bar on a terminal.
    ///
    /// # Errors
    /// [`Error::Hub`]: offline and not cached; the repository or file not found (404); a gated
    /// or private repository without a token that opens it (401/403, naming `HF_TOKEN`); the
    /// endpoint unreachable; a transfer that delivered fewer bytes than announced (the part
    /// kept for resuming); a cache that cannot be written.
    pub fn file(&self, id: &str, filename: &str) -> Result<PathBuf> {
        match self.fetch(id, filename)? {
            Some(p) => Ok(p),
            None => Err(self.err(
                id,
                format!(
                    "{filename} not found (HTTP 404): check the model id (org/name) and that the repository has this file"
                ),
            )),
        }
    }

    /// [`Hub::file`] for a file the repository may lack: `None` where the Hub answers 404, and
    /// offline where the cache does not have it.
    ///
    /// # Errors
    /// As [`Hub::file`], but for the 404.
    pub fn optional_file(&self, id: &str, filename: &str) -> Result<Option<PathBuf>> {
        if self.offline && self.cached(id, filename).is_none() {
            return Ok(None);
        }
        self.fetch(id, filename)
    }

    /// The file, or `None` for a 404.
    fn fetch(&self, id: &str, filename: &str) -> Result<Option<PathBuf>> {
        check_id(id)?;
        if let Some(p) = self.cached(id, filename) {
            return Ok(Some(p));
        }
        if self.offline {
            return Err(self.err(
                id,
                format!(
                    "{filename} is not in the local cache ({}) and HF_HUB_OFFLINE is set: unset it to download, or fetch it where the network is reachable",
                    self.cache.path().display()
                ),
            ));
        }
        let (got, size) = match self.download(id, filename)? {
            Some(x) => x,
            None => return Ok(None),
        };
        let len = std::fs::metadata(&got)
            .map_err(|e| Error::io(&got, e))?
            .len();
        match size {
            Some(size) if len != size as u64 => {
                self.keep_part(&got)?;
                Err(self.err(
                    id,
                    format!(
                        "{filename}: the transfer stopped at {len} of {size} bytes; it was not added to the cache (run again to resume it)"
                    ),
                ))
            }
            _ => Ok(Some(got)),
        }
    }

    /// hf-hub's download of `filename`, watched from this thread: `None` for a 404; the path
    /// and the size the Hub announced otherwise. A leftover `.part` that cannot be resumed
    /// (longer than the file, or the whole file: hf-hub's `InvalidResume`, HTTP 416) is removed
    /// and the transfer started again, once.
    ///
    /// # Errors
    /// [`Error::Hub`] as [`Hub::file`], and when the endpoint sends nothing for
    /// `HF_HUB_DOWNLOAD_TIMEOUT` seconds (10 by default, as `huggingface_hub`).
    fn download(&self, id: &str, filename: &str) -> Result<Option<(PathBuf, Option<usize>)>> {
        for attempt in 0..2 {
            match self.watched(id, filename)? {
                Ok(x) => return Ok(Some(x)),
                Err(e) if status(&e) == Some(404) => return Ok(None),
                Err(e)
                    if attempt == 0
                        && (matches!(e, ApiError::InvalidResume) || status(&e) == Some(416)) =>
                {
                    self.drop_parts(id)?;
                }
                Err(e) => return Err(self.api_err(id, filename, e)),
            }
        }
        Err(self.err(
            id,
            format!("{filename}: the transfer could not be restarted"),
        ))
    }

    /// Runs one hf-hub download in its own thread and waits for it while it makes progress.
    fn watched(
        &self,
        id: &str,
        filename: &str,
    ) -> Result<std::result::Result<(PathBuf, Option<usize>), ApiError>> {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{mpsc, Arc, Mutex};
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let millis = move || start.elapsed().as_millis() as u64;
        let last = Arc::new(AtomicU64::new(0));
        let size = Arc::new(Mutex::new(None));
        let bar = Bar {
            size: size.clone(),
            last: last.clone(),
            started: start,
            bar: None,
            draw: self.progress,
        };
        let repo = self.api(id)?.model(id.to_string());
        let name = filename.to_string();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(repo.download_with_progress(&name, bar));
        });
        let limit = self.timeout.as_millis() as u64;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => {
                    let announced = *size.lock().unwrap_or_else(|e| e.into_inner());
                    return Ok(r.map(|p| (p, announced)));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if millis().saturating_sub(last.load(Ordering::Relaxed)) > limit {
                        return Err(self.err(
                            id,
                            format!(
                                "{filename}: no answer from the endpoint for {} s (HF_HUB_DOWNLOAD_TIMEOUT); what arrived is kept for resuming",
                                self.timeout.as_secs_f64()
                            ),
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.err(id, format!("{filename}: the download stopped")));
                }
            }
        }
    }

    /// Removes the `.part` files of model `id`'s blobs (transfers that cannot be resumed).
    fn drop_parts(&self, id: &str) -> Result<()> {
        let blobs = self
            .cache
            .path()
            .join(format!("models--{}", id.replace('/', "--")))
            .join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "part") {
                std::fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
            }
        }
        Ok(())
    }

    /// Puts a short download back as hf-hub's `.part` file (beside its blob) and removes its
    /// snapshot link, so that the cache has no entry for it and the next transfer resumes.
    fn keep_part(&self, link: &Path) -> Result<()> {
        let blob = std::fs::canonicalize(link).map_err(|e| Error::io(link, e))?;
        let mut part = blob.clone();
        part.set_extension("part");
        std::fs::remove_file(link).map_err(|e| Error::io(link, e))?;
        if blob != link {
            std::fs::rename(&blob, &part).map_err(|e| Error::io(&blob, e))?;
        }
        Ok(())
    }

    fn api(&self, id: &str) -> Result<Api> {
        ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_user_agent("vramcal", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| self.err(id, format!("cannot set up the Hub client: {e}")))
    }

    fn err(&self, id: &str, reason: String) -> Error {
        Error::Hub {
            id: id.to_string(),
            endpoint: redacted(&self.endpoint),
            reason,
        }
    }

    /// One line for a failed request: what the status means for the user.
    fn api_err(&self, id: &str, filename: &str, e: ApiError) -> Error {
        let status = status(&e);
        if matches!(
            error_code(&e).as_deref(),
            Some("RepoNotFound" | "EntryNotFound" | "RevisionNotFound")
        ) {
            return self.err(
                id,
                format!(
                    "{filename} not found (HTTP {}, {}): check the model id (org/name){}",
                    status.unwrap_or_default(),
                    error_code(&e).unwrap_or_default(),
                    if self.token.is_none() {
                        "; a private repository needs HF_TOKEN"
                    } else {
                        ""
                    }
                ),
            );
        }
        let reason = match (status, &e) {
            (Some(401 | 403), _) if self.token.is_none() => format!(
                "{filename}: the repository is gated or private (HTTP {}): set HF_TOKEN to a token with access to it",
                status.unwrap_or_default()
            ),
            (Some(401 | 403), _) => format!(
                "{filename}: the token in HF_TOKEN (or the token file) has no access to this repository (HTTP {})",
                status.unwrap_or_default()
            ),
            (Some(code), _) => format!("{filename}: the Hub answered HTTP {code}"),
            (None, ApiError::RequestError(r)) => format!(
                "{filename}: cannot reach the endpoint ({}); HF_HUB_OFFLINE=1 uses the local cache only",
                first_line(&r.to_string())
            ),
            (None, ApiError::IoError(io)) => format!(
                "{filename}: the transfer was interrupted ({}); what arrived is kept: run again to resume it",
                first_line(&io.to_string())
            ),
            (None, ApiError::MissingHeader(h) | ApiError::InvalidHeader(h)) => format!(
                "{filename}: the endpoint does not answer as a Hugging Face Hub does (header {h} missing or invalid): check HF_ENDPOINT"
            ),
            (None, ApiError::LockAcquisition(p)) => format!(
                "{filename}: another process is downloading it ({} is locked)",
                p.display()
            ),
            (None, other) => format!("{filename}: {}", first_line(&other.to_string())),
        };
        self.err(id, reason)
    }
}

/// `endpoint` without the `user:password@` of its authority, for messages.
fn redacted(endpoint: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => endpoint.to_string(),
    }
}

/// The Hub's own reason for a refusal (`X-Error-Code`: `RepoNotFound`, `GatedRepo`, …), where
/// it gave one.
fn error_code(e: &ApiError) -> Option<String> {
    match e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(_, resp) => resp.header("x-error-code").map(String::from),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

/// The HTTP status of a failed request, if the server answered.
fn status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Refuses what cannot be a Hub model id (`org/name` or `name`: letters, digits, `-`, `_`, `.`,
/// no `..`, at most 96 characters per part, as the Hub's own `validate_repo_id`), before it
/// becomes a URL or a cache path.
///
/// # Errors
/// [`Error::InvalidValue`].
pub fn check_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.contains("..")
            && !p.contains("--")
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if let Some(rest) = id.strip_prefix("hf:") {
        return Err(Error::invalid(
            "model id",
            id,
            format!("give the id without hf: ({rest}); --weights takes hf:<id>"),
        ));
    }
    if parts.len() <= 2 && parts.iter().all(|p| ok_part(p)) {
        Ok(())
    } else {
        Err(Error::invalid(
            "model id",
            id,
            "expected org/name (letters, digits, '-', '_', '.')",
        ))
    }
}

/// hf-hub's progress callback: remembers the announced size and when bytes last arrived (for
/// the stall timeout), draws an indicatif bar where enabled.
struct Bar {
    size: std::sync::Arc<std::sync::Mutex<Option<usize>>>,
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    bar: Option<indicatif::ProgressBar>,
    draw: bool,
}

impl Bar {
    fn touch(&self) {
        self.last.store(
            self.started.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        *self.size.lock().unwrap_or_else(|e| e.into_inner()) = Some(size);
        self.touch();
        if self.draw && self.bar.is_none() {
            let b = indicatif::ProgressBar::new(size as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                b.set_style(style);
            }
            b.set_message(filename.to_string());
            self.bar = Some(b);
        }
    }

    fn update(&mut self, size: usize) {
        self.touch();
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_they_become_paths() {
        for ok in [
            "mistralai/Mistral-7B-v0.1",
            "gpt2",
            "Qwen/Qwen2.5-0.5B",
            "a_b/c.d-e",
        ] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            redacted("https://u:pw@mirror.example/hf"),
            "https://mirror.example/hf"
        );
        assert_eq!(redacted("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        for bad in [
            "a--b/c",
            "a/b--c",
            "",
            "/",
            "a/b/c",
            "../etc",
            "a/..",
            "a/b c",
            "a/.hidden",
            "a/b-",
            "org/na%2fme",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(is_true("1") && is_true("True") && is_true(" yes ") && !is_true("0"));
    }
}
