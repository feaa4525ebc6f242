//! Models fetched from the Hugging Face Hub (`src/hub.rs`), against a local HTTP server on
//! 127.0.0.1 that answers as the Hub does (`/{org}/{name}/resolve/{revision}/{file}`, with
//! `x-repo-commit`, `etag` and `Content-Range` on ranged requests), `HF_ENDPOINT` pointed at it
//! and `HF_HOME` a fresh folder: download, cache reuse, a transfer cut short (refused, kept for
//! resuming, resumed by the next run), `HF_HUB_OFFLINE`, a gated repository without and with
//! `HF_TOKEN`, an unknown id, and a config of an unsupported architecture.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use vramcal::config::preset;
use vramcal::model::Decoder;
use vramcal::weights::RandomWeights;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

/// One file of a served repository, and how many of its bytes the first full transfer sends.
struct File {
    bytes: Vec<u8>,
    cut_first_at: Option<usize>,
}

/// The served repositories, the log of requests (`path range`) and the transfers cut so far.
struct Hub {
    repos: HashMap<String, HashMap<String, File>>,
    gated: Vec<String>,
    log: Vec<String>,
    cut_done: Vec<String>,
}

/// The `tiny` preset's config.json and random weights as a safetensors file.
fn tiny_files() -> (Vec<u8>, Vec<u8>) {
    let cfg = preset("tiny").unwrap().config;
    let m = Decoder::new(&cfg, &mut RandomWeights::new(3), DType::F32, &Device::Cpu).unwrap();
    let map: HashMap<String, candle_core::Tensor> = m
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&map, &f).unwrap();
    (
        serde_json::to_vec(&cfg).unwrap(),
        std::fs::read(&f).unwrap(),
    )
}

/// Starts the server; returns its endpoint and the shared state.
fn serve() -> (String, Arc<Mutex<Hub>>) {
    let (config, weights) = tiny_files();
    let repo = |cut: Option<usize>| {
        let mut files = HashMap::new();
        files.insert(
            "config.json".to_string(),
            File {
                bytes: config.clone(),
                cut_first_at: None,
            },
        );
        files.insert(
            "model.safetensors".to_string(),
            File {
                bytes: weights.clone(),
                cut_first_at: cut,
            },
        );
        files
    };
    let mut repos = HashMap::new();
    repos.insert("acme/tiny".to_string(), repo(None));
    repos.insert("acme/gated".to_string(), repo(None));
    repos.insert("acme/cut".to_string(), repo(Some(weights.len() / 3)));
    let mut bert = HashMap::new();
    bert.insert(
        "config.json".to_string(),
        File {
            bytes: br#"{"architectures": ["BertModel"], "hidden_size": 8}"#.to_vec(),
            cut_first_at: None,
        },
    );
    repos.insert("acme/bert".to_string(), bert);
    let state = Arc::new(Mutex::new(Hub {
        repos,
        gated: vec!["acme/gated".to_string()],
        log: Vec::new(),
        cut_done: Vec::new(),
    }));
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let shared = state.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let resp = answer(&shared, &req);
            let _ = req.respond(resp);
        }
    });
    (format!("http://127.0.0.1:{port}"), state)
}

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn h(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
}

fn answer(
    state: &Arc<Mutex<Hub>>,
    req: &tiny_http::Request,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut st = state.lock().unwrap();
    let url = req.url().to_string();
    let range = header(req, "Range").unwrap_or_default();
    st.log.push(format!("{url} {range}"));
    let empty = |code: u16| tiny_http::Response::from_data(Vec::new()).with_status_code(code);
    // /{org}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = url.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return empty(404);
    }
    let (id, file) = (format!("{}/{}", parts[0], parts[1]), parts[4].to_string());
    if st.gated.contains(&id)
        && header(req, "Authorization").as_deref() != Some(&format!("Bearer {TOKEN}"))
    {
        return empty(401);
    }
    let cut_key = format!("{id}/{file}");
    let already_cut = st.cut_done.contains(&cut_key);
    let Some(f) = st.repos.get(&id).and_then(|r| r.get(&file)) else {
        return empty(404);
    };
    let total = f.bytes.len();
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').nth(1))
    {
        Some(e) if !e.is_empty() => e.parse::<usize>().unwrap().min(total - 1),
        _ => total - 1,
    };
    let mut body = f.bytes[start.min(total)..=end].to_vec();
    let mut cut_now = false;
    if let Some(at) = f.cut_first_at {
        // The first transfer of the whole file stops early, as a dropped connection would.
        if range == "bytes=0-" && !already_cut {
            body.truncate(at);
            cut_now = true;
        }
    }
    let etag = format!("\"{:016x}{total:08x}\"", id.len() * 7919 + file.len());
    let resp = tiny_http::Response::from_data(body)
        .with_status_code(if range.is_empty() { 200 } else { 206 })
        .with_header(h("x-repo-commit", COMMIT))
        .with_header(h("etag", &etag))
        .with_header(h("Content-Range", &format!("bytes {start}-{end}/{total}")));
    if cut_now {
        st.cut_done.push(cut_key);
    }
    resp
}

/// `vramcal <args>` with `HF_HOME=home`, `HF_ENDPOINT=endpoint` and no token, plus `env`.
fn run(home: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    c.env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `error:` line, non-zero exit; the line.
fn one_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

const ESTIMATE: [&str; 6] = ["estimate", "--batch", "1", "--seq", "8", "--json"];

fn estimate(home: &Path, endpoint: &str, env: &[(&str, &str)], id: &str) -> Output {
    let mut args = ESTIMATE.to_vec();
    args.extend(["--model", id]);
    run(home, endpoint, env, &args)
}

fn measure(home: &Path, endpoint: &str, env: &[(&str, &str)], id: &str) -> Output {
    let weights = format!("hf:{id}");
    run(
        home,
        endpoint,
        env,
        &[
            "measure",
            "--model",
            id,
            "--weights",
            &weights,
            "--batch",
            "1",
            "--seq",
            "6",
            "--json",
            "--quiet",
        ],
    )
}

fn requests(state: &Arc<Mutex<Hub>>) -> Vec<String> {
    state.lock().unwrap().log.clone()
}

#[test]
fn estimate_fetches_only_the_config_and_measure_the_weights_once() {
    let (endpoint, state) = serve();
    let home = tempfile::tempdir().unwrap();
    // estimate needs config.json only.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&estimate(home.path(), &endpoint, &[], "acme/tiny"))).unwrap();
    assert_eq!(json["model"], "acme/tiny");
    let log = requests(&state);
    assert!(log.iter().all(|r| r.contains("config.json")), "{log:?}");
    assert!(home
        .path()
        .join(format!(
            "hub/models--acme--tiny/snapshots/{COMMIT}/config.json"
        ))
        .is_file());
    // measure downloads the weights (no index on this repository: a 404, then the file).
    let row: serde_json::Value =
        serde_json::from_str(&ok(&measure(home.path(), &endpoint, &[], "acme/tiny"))).unwrap();
    assert_eq!(row["params"], 21664);
    assert_eq!(row["weights"], "hf:acme/tiny");
    let log = requests(&state);
    assert!(
        log.iter()
            .any(|r| r.contains("model.safetensors.index.json")),
        "{log:?}"
    );
    let fetched = log.len();
    // Cached: the same runs make no request.
    ok(&estimate(home.path(), &endpoint, &[], "acme/tiny"));
    ok(&measure(home.path(), &endpoint, &[], "acme/tiny"));
    assert_eq!(requests(&state).len(), fetched, "{:?}", requests(&state));
    // Offline: the cache serves, nothing is requested; an uncached id is refused naming
    // HF_HUB_OFFLINE, and nothing is written.
    let offline = [("HF_HUB_OFFLINE", "1")];
    ok(&measure(home.path(), &endpoint, &offline, "acme/tiny"));
    let e = one_error(&estimate(home.path(), &endpoint, &offline, "acme/other"));
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("acme/other"),
        "{e}"
    );
    assert_eq!(requests(&state).len(), fetched);
    assert!(!home.path().join("hub/models--acme--other").exists());
}

#[test]
fn a_cut_transfer_is_refused_kept_for_resuming_and_resumed() {
    let (endpoint, state) = serve();
    let home = tempfile::tempdir().unwrap();
    let e = one_error(&measure(home.path(), &endpoint, &[], "acme/cut"));
    assert!(
        e.contains("transfer stopped at") && e.contains("run again"),
        "{e}"
    );
    // Not in the cache: no snapshot entry, the part kept beside the blobs.
    let repo = home.path().join("hub/models--acme--cut");
    assert!(!repo
        .join(format!("snapshots/{COMMIT}/model.safetensors"))
        .exists());
    let parts: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect();
    assert_eq!(parts.len(), 1, "{parts:?}");
    let kept = std::fs::metadata(&parts[0]).unwrap().len();
    assert!(kept > 0);
    // Offline, the cut file is not served from the cache.
    let e = one_error(&measure(
        home.path(),
        &endpoint,
        &[("HF_HUB_OFFLINE", "1")],
        "acme/cut",
    ));
    assert!(
        e.contains("HF_HUB_OFFLINE") || e.contains("not in the local"),
        "{e}"
    );
    // The next run resumes from the kept bytes and completes.
    let row: serde_json::Value =
        serde_json::from_str(&ok(&measure(home.path(), &endpoint, &[], "acme/cut"))).unwrap();
    assert_eq!(row["params"], 21664);
    let resumed = format!("bytes={kept}-");
    assert!(
        requests(&state).iter().any(|r| r.ends_with(&resumed)),
        "{:?}",
        requests(&state)
    );
    // A leftover part that cannot be resumed (longer than the file) is dropped and the file
    // fetched again: a complete download turned into such a part.
    let other = tempfile::tempdir().unwrap();
    ok(&measure(other.path(), &endpoint, &[], "acme/tiny"));
    let link = other.path().join(format!(
        "hub/models--acme--tiny/snapshots/{COMMIT}/model.safetensors"
    ));
    let blob = std::fs::canonicalize(&link).unwrap();
    std::fs::remove_file(&link).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.extend([0u8; 10]);
    std::fs::remove_file(&blob).unwrap();
    std::fs::write(blob.with_extension("part"), bytes).unwrap();
    let row: serde_json::Value =
        serde_json::from_str(&ok(&measure(other.path(), &endpoint, &[], "acme/tiny"))).unwrap();
    assert_eq!(row["params"], 21664);
    assert!(blob.is_file() && !blob.with_extension("part").exists());
}

#[test]
fn gated_unknown_and_unsupported_repositories_get_one_line() {
    let (endpoint, _state) = serve();
    let home = tempfile::tempdir().unwrap();
    let e = one_error(&estimate(home.path(), &endpoint, &[], "acme/gated"));
    assert!(
        e.contains("gated or private") && e.contains("HF_TOKEN"),
        "{e}"
    );
    let e = one_error(&estimate(
        home.path(),
        &endpoint,
        &[("HF_TOKEN", "hf_wrong")],
        "acme/gated",
    ));
    assert!(e.contains("has no access"), "{e}");
    ok(&estimate(
        home.path(),
        &endpoint,
        &[("HF_TOKEN", TOKEN)],
        "acme/gated",
    ));
    let e = one_error(&estimate(home.path(), &endpoint, &[], "acme/absent"));
    assert!(e.contains("acme/absent") && e.contains("HTTP 404"), "{e}");
    let e = one_error(&estimate(home.path(), &endpoint, &[], "acme/bert"));
    assert!(e.contains("unsupported architecture"), "{e}");
    let e = one_error(&estimate(home.path(), &endpoint, &[], "acme/../etc"));
    assert!(e.contains("model id"), "{e}");
    // A server that accepts the connection and never answers: given up after
    // HF_HUB_DOWNLOAD_TIMEOUT seconds.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let t0 = std::time::Instant::now();
    let e = one_error(&estimate(
        home.path(),
        &format!("http://{addr}"),
        &[("HF_HUB_DOWNLOAD_TIMEOUT", "1")],
        "acme/tiny",
    ));
    assert!(e.contains("no answer from the endpoint for 1 s"), "{e}");
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
    drop(silent);
    // An endpoint nobody listens on: one line that says so.
    let e = one_error(&estimate(
        home.path(),
        "http://127.0.0.1:9",
        &[],
        "acme/tiny",
    ));
    assert!(e.contains("cannot reach the endpoint"), "{e}");
}
