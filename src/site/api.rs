//! The admin HTTP API of a site (JSON), plus `/metrics`.
//!
//! GET /status · GET /metrics · GET /volumes · POST /volumes {name,size,group}
//! POST /volumes/{name}/resize {size} · DELETE /volumes/{name}
//! GET /snapshots[?volume=V] · POST /snapshots {volume,name,writable}
//! POST /snapshots/restore {volume,snapshot} · POST /snapshots/refresh {volume,snapshot}
//! POST /snapshots/sync {from,to} · DELETE /snapshots/{volume}/{snapshot}
//! Errors: `{"error": "..."}` with 400 (bad request), 401 (a change without
//! this site's admin credentials, see `admin`), 404, 409 or 500.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Site;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn failed(e: anyhow::Error) -> ApiError {
    let msg = format!("{e:#}");
    let code = if msg.contains("does not exist") {
        StatusCode::NOT_FOUND
    } else if msg.contains("already exists") || msg.contains("has snapshots") || msg.contains("read-only") || msg.contains("delete it there") {
        StatusCode::CONFLICT
    } else if msg.contains("must be") || msg.contains("exceeds") || msg.contains("name") || msg.contains("is not a snapshot") || msg.contains("is a snapshot") || msg.contains("needs two snapshots") || msg.contains("are the same") || msg.contains("is a volume") {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    ApiError(code, msg)
}

/// A JSON body the handler could not take: too large is 413, naming the
/// limit (axum says "length limit exceeded" and 400), the rest as axum
/// words them.
fn rejected(e: axum::extract::rejection::JsonRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE || e.body_text().contains("length limit exceeded") {
        return ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than the {} bytes the API takes", crate::limits::API_BODY_BYTES_MAX));
    }
    bad(e.body_text())
}

/// Every error answer is `{"error": "..."}`: the router's own (no such
/// path, a method the path does not take, a path that is not UTF-8) came
/// as empty or plain-text bodies, which a client shows as nothing.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let body = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let msg = match (status, text.is_empty()) {
        (StatusCode::NOT_FOUND, true) => format!("no API path {path}"),
        (StatusCode::METHOD_NOT_ALLOWED, true) => format!("{path} does not take {method}"),
        (_, true) => format!("HTTP {status} for {method} {path}"),
        (_, false) => text,
    };
    ApiError(status, msg).into_response()
}

pub async fn serve(listener: tokio::net::TcpListener, site: Arc<Site>) -> anyhow::Result<()> {
    let refused = site.metrics.api_connections_refused.clone();
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route("/volumes/{name}/resize", post(resize_volume))
        .route("/volumes/{name}", axum::routing::delete(delete_volume))
        .route("/groups/{name}", post(set_group))
        .route("/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/snapshots/restore", post(restore_snapshot))
        .route("/snapshots/refresh", post(refresh_snapshot))
        .route("/snapshots/sync", post(sync_snapshots))
        .route("/snapshots/{volume}/{snapshot}", axum::routing::delete(delete_snapshot))
        .layer(axum::middleware::from_fn_with_state(site.clone(), admitted))
        .layer(DefaultBodyLimit::max(crate::limits::API_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(site);
    let listener = super::apiconn::ApiListener::new(listener, crate::limits::API_CONNECTIONS_MAX, std::time::Duration::from_millis(crate::limits::API_IDLE_TIMEOUT_MS), refused);
    axum::serve(listener, app.into_make_service_with_connect_info::<Conn>()).await?;
    Ok(())
}

/// Both ends of an API connection (whose socket the client's end is, is
/// looked up by the pair), and its count of requests being answered.
#[derive(Clone)]
struct Conn {
    peer: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, super::apiconn::ApiListener>> for Conn {
    fn connect_info(s: axum::serve::IncomingStream<'_, super::apiconn::ApiListener>) -> Conn {
        Conn { peer: *s.remote_addr(), local: s.io().local, busy: s.io().busy().clone() }
    }
}

/// Marks the connection busy for the request's length. Reads pass; a
/// change needs this site's admin credentials (`admin::AdminAuth::admit`).
/// A refusal is answered 401, counted, and logged once a minute per client
/// address and kind of refusal.
async fn admitted(State(site): State<Arc<Site>>, axum::extract::ConnectInfo(conn): axum::extract::ConnectInfo<Conn>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    // The connection's idle clock stops while this request is answered.
    let _busy = super::apiconn::Busy::new(&conn.busy);
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    let (auth, host, origin) = {
        let h = req.headers();
        let header = |name| h.get(name).map(|v: &axum::http::HeaderValue| v.as_bytes().to_vec());
        (
            header(axum::http::header::AUTHORIZATION),
            header(axum::http::header::HOST),
            // What browsers add to requests a page makes (fetch metadata too).
            ["origin", "sec-fetch-site", "sec-fetch-mode"].iter().any(|n| h.contains_key(*n)),
        )
    };
    let Some(local) = conn.local else {
        return ApiError(StatusCode::UNAUTHORIZED, "the API's own address of this connection is unknown".into()).into_response();
    };
    let s = site.clone();
    let peer = conn.peer;
    // The owner lookup reads /proc: not on the runtime's worker.
    let verdict = tokio::task::spawn_blocking(move || {
        let q = super::admin::Asking { authorization: auth.as_deref(), host: host.as_deref(), origin, peer, local };
        s.admin.admit(&s.cfg.name, &q)
    })
    .await;
    match verdict {
        Ok(Ok(_)) => next.run(req).await,
        Ok(Err(no)) => {
            site.metrics.count_admin_refused();
            static SAID: crate::util::RepeatLog = crate::util::RepeatLog::new();
            if let Some(n) = SAID.admit(&format!("{} {}", peer.ip(), no.kind)) {
                tracing::warn!("admin API: refused {} {} from {peer}: {}{}", req.method(), req.uri().path(), no.reason, crate::util::unlogged_note(n));
            }
            let mut r = ApiError(StatusCode::UNAUTHORIZED, no.reason).into_response();
            r.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer realm=\"tidemark\""));
            r
        }
        Err(e) => failed(anyhow::anyhow!("admin check failed: {e}")).into_response(),
    }
}

/// The site's status. A group whose lock is not free within
/// `STATUS_GROUP_WAIT_MS` (a writer stuck in a stalled disk holds it) is
/// reported from its last complete entry, marked `stale`, with why in
/// `unavailable`; every group says what its storage has been doing for
/// longer than `STORAGE_SLOW_MS` in `storage_stall` (ARCHITECTURE.md "A
/// stalled disk is reported, not silent").
pub fn status_json(site: &Site) -> Value {
    // One wait for all groups, not one each: groups on one stalled disk
    // would otherwise add up past the request's limit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(crate::limits::STATUS_GROUP_WAIT_MS);
    status_of(site, |g| {
        if g.answers_within(deadline.saturating_duration_since(std::time::Instant::now())) {
            let (gj, e) = group_status(site, g);
            site.status_cache.lock().unwrap_or_else(|p| p.into_inner()).insert(g.name.clone(), (gj.clone(), e));
            (gj, e)
        } else {
            unavailable_group(site, g, &format!("its lock was not free within {} ms", crate::limits::STATUS_GROUP_WAIT_MS))
        }
    })
}

/// Status built from nothing that takes a group's lock: what `status`
/// answers when `status_json` did not finish within `STATUS_TIME_LIMIT_MS`.
pub fn status_without_locks(site: &Site, why: &str) -> Value {
    status_of(site, |g| unavailable_group(site, g, why))
}

/// The site's status with each group's entry and epoch from `entry`, and
/// its `storage_stall` (which needs no lock) added.
fn status_of(site: &Site, mut entry: impl FnMut(&crate::group::Group) -> (Value, u64)) -> Value {
    let mut epoch = 1;
    let groups: Vec<Value> = site
        .group_list()
        .iter()
        .map(|g| {
            let (mut gj, e) = entry(g);
            epoch = epoch.max(e);
            gj["storage_stall"] = storage_stall_json(g);
            gj
        })
        .collect();
    json!({"site": site.cfg.name, "role": role(site), "epoch": epoch, "groups": groups})
}

fn role(site: &Site) -> &'static str {
    match site.cfg.role {
        super::config::Role::Primary => "primary",
        super::config::Role::Secondary => "secondary",
    }
}

/// A group that did not answer: its last complete status entry (`stale`),
/// or only its name and mode if it never had one, with `unavailable`
/// saying why.
fn unavailable_group(site: &Site, g: &crate::group::Group, why: &str) -> (Value, u64) {
    let cached = site.status_cache.lock().unwrap_or_else(|p| p.into_inner()).get(&g.name).cloned();
    let (mut gj, epoch, rest) = match cached {
        Some((mut gj, e)) => {
            gj["stale"] = json!(true);
            (gj, e, "other fields are from its last complete status")
        }
        None => (json!({"name": g.name, "mode": g.replication.mode().as_str()}), 1, "it has no complete status yet"),
    };
    let storage = match g.io.oldest() {
        Some(p) => format!("{} in progress for {:.1} s", p.op.label(), p.seconds),
        None => "no storage operation in progress".to_string(),
    };
    gj["unavailable"] = json!(format!("group {} did not answer: {why} ({storage}); {rest}", g.name));
    (gj, epoch)
}

/// The oldest storage operation of a group in progress for at least
/// `STORAGE_SLOW_MS`, or null; `stalled` from `STORAGE_STALL_MS` on.
pub fn storage_stall_json(g: &crate::group::Group) -> Value {
    match g.io.oldest() {
        Some(p) if p.slow() => json!({
            "operation": p.op.label(),
            "seconds": (p.seconds * 10.0).round() / 10.0,
            "stalled": p.stalled(),
        }),
        _ => Value::Null,
    }
}

/// One group's complete status entry and its epoch (takes the group's lock
/// several times).
fn group_status(site: &Site, g: &crate::group::Group) -> (Value, u64) {
    let vols: Vec<Value> = g.volumes().iter().map(|v| json!({"name": v.name, "size": v.size, "mapped_bytes": v.mapped_bytes})).collect();
    let last = g.last_seq();
    let now = crate::util::now_ns();
    let replicas: Vec<Value> = g
        .replication
        .replicas()
        .iter()
        .map(|r| {
            let lag_writes = last.saturating_sub(r.acked_seq);
            let (lag_seconds, lag_bytes) = crate::replicate::lag(g, r, last, now);
            json!({
                "site": r.site, "state": r.state, "applied_seq": r.acked_seq, "sent_seq": r.sent_seq,
                "lag_writes": lag_writes, "lag_bytes": lag_bytes, "lag_seconds": lag_seconds,
                "link_sent_bytes": r.sent_bytes_total, "link_data_bytes": r.data_bytes_total, "last_error": r.last_error,
                "dirty_bytes": g.dirty_blocks(&r.site) * crate::limits::BLOCK_BYTES,
                "dirty_tracking": g.in_dirty_mode(&r.site),
                // What its resync may take at the DR, at most (RESYNC_BEGIN's estimate).
                "resync_need_bytes": if g.in_dirty_mode(&r.site) { g.resync_need(&r.site) } else { 0 },
                "sender_nice": r.sender_nice,
                "diverged_resyncs": r.diverged_resyncs,
                "sessions": r.sessions, "last_lost": r.last_lost,
            })
        })
        .collect();
    let mut gj = json!({
        "name": g.name,
        "mode": g.replication.mode().as_str(),
        "volumes": vols,
        "last_seq": last,
        "applied_seq": last,
        "replicas": replicas,
        "log_bytes": g.log_bytes(),
        "live_bytes": g.live_bytes(),
        "failed": g.failed(),
    });
    if let Some((secs, error, needed)) = g.out_of_space() {
        gj["out_of_space"] = json!({"seconds": secs, "error": error, "needed_bytes": needed});
    }
    // From the map table only: `snapshots()` would also walk every
    // map to count unique bytes, which status (polled) does not show.
    let maps = g.maps();
    gj["snapshots"] = json!(maps.iter().filter(|m| m.snapshot).count());
    let retained: Vec<&str> = maps.iter().filter(|m| m.retained).map(|m| m.name.as_str()).collect();
    if g.protect_snapshots.load(std::sync::atomic::Ordering::Relaxed) || !retained.is_empty() {
        let refusals: Vec<Value> = g
            .refusals
            .lock()
            .unwrap()
            .iter()
            .map(|(name, seq, ns)| json!({"snapshot": name, "seq": seq, "time_ns": ns}))
            .collect();
        gj["protect_snapshots"] = json!(g.protect_snapshots.load(std::sync::atomic::Ordering::Relaxed));
        gj["retained_snapshots"] = json!(retained);
        gj["snapshot_delete_refusals"] = json!(refusals);
    }
    let skipped = g.gc_skipped();
    if !skipped.is_empty() {
        gj["gc_skipped_segments"] = skipped
            .iter()
            .map(|(id, why)| json!({"segment": g.dir.join(crate::log::segment::segment_file_name(*id)), "error": why}))
            .collect();
    }
    if g.replication.degraded() {
        gj["degraded"] = json!("sync DR site lost: replicating asynchronously");
    }
    if let Some(d) = site.dr.groups.lock().unwrap().get(&g.name) {
        // A DR site's group runs in its primary's mode (HELLO, then MODE
        // frames), not the one it was made with.
        if !d.mode.is_empty() {
            gj["mode"] = json!(d.mode);
        }
        let hb = &d.heartbeat;
        gj["primary"] = json!({
            "site": d.primary, "connected": d.connected, "last_error": d.last_error,
            "received_bytes": d.received_bytes_total,
            "mode": d.mode, "receiver_nice": d.receiver_nice,
        });
        gj["heartbeat"] = json!({
            "seq": hb.seq, "sent_ns": hb.sent_ns, "received_ns": hb.received_ns,
            "age_seconds": if hb.received_ns == 0 { Value::Null } else { json!(now.saturating_sub(hb.received_ns) as f64 / 1e9) },
        });
    }
    (gj, g.epoch())
}

async fn status(State(site): State<Arc<Site>>) -> Json<Value> {
    let s = site.clone();
    let limit = std::time::Duration::from_millis(crate::limits::STATUS_TIME_LIMIT_MS);
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || status_json(&s))).await {
        Ok(Ok(v)) => Json(v),
        Ok(Err(e)) => Json(status_without_locks(&site, &format!("status failed: {e}"))),
        Err(_) => Json(status_without_locks(&site, &format!("status did not complete within {} ms", crate::limits::STATUS_TIME_LIMIT_MS))),
    }
}

async fn metrics(State(site): State<Arc<Site>>) -> Result<impl IntoResponse, ApiError> {
    let s = site.clone();
    let limit = std::time::Duration::from_millis(crate::limits::STATUS_TIME_LIMIT_MS);
    let body = match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || s.metrics.render(&s.cfg.name, &s.group_list()))).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(failed(anyhow::anyhow!("metrics failed: {e}"))),
        // Built from atomics only: what a stalled site can still say.
        Err(_) => site.metrics.render_without_locks(&site.cfg.name, &site.group_list()),
    };
    Ok(([("content-type", "text/plain; version=0.0.4")], body))
}

async fn list_volumes(State(site): State<Arc<Site>>) -> Result<Json<Value>, ApiError> {
    off_thread(move || {
        let mut out = Vec::new();
        for g in site.group_list() {
            for v in g.volumes() {
                out.push(json!({"name": v.name, "size": v.size, "group": g.name, "mapped_bytes": v.mapped_bytes}));
            }
        }
        Ok(Json(Value::Array(out)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size: Value,
    group: Option<String>,
}

fn size_of(v: &Value) -> Result<u64, ApiError> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| bad(format!("size {n} is not a whole number of bytes"))),
        Value::String(s) => crate::util::parse_size(s).map_err(bad),
        other => Err(bad(format!("size must be a number or a string like \"1GiB\", not {other}"))),
    }
}

fn primary_only(site: &Site) -> Result<(), ApiError> {
    if site.read_only() {
        return Err(ApiError(StatusCode::CONFLICT, format!("site {} is not the primary; run this on the primary", site.cfg.name)));
    }
    Ok(())
}

/// Runs `f` on the blocking pool. Every handler does so with whatever takes
/// a group's lock (looking a volume up included): a writer stuck on a
/// stalled disk holds that lock, and on the API's one worker thread the
/// wait would stall every other request, status too (ARCHITECTURE.md "A
/// stalled disk is reported, not silent").
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| failed(anyhow::anyhow!("task failed: {e}")))?
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ApiError> {
    off_thread(move || f().map_err(failed)).await
}

async fn create_volume(State(site): State<Arc<Site>>, body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let size = size_of(&req.size)?;
    let group = req.group.unwrap_or_else(|| "cg0".into());
    // Before the group is made: a refused name must leave no new group.
    crate::util::check_name("volume", &req.name).map_err(bad)?;
    let name = req.name.clone();
    let s = site.clone();
    off_thread(move || {
        if s.find_volume(&name).is_some() {
            return Err(ApiError(StatusCode::CONFLICT, format!("volume {name} already exists")));
        }
        let g = s.group_or_create(&group).map_err(failed)?;
        g.create_volume(&name, size).map_err(failed)?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({"name": req.name, "size": size})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size: Value,
}

async fn resize_volume(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    body: Result<Json<Resize>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let size = size_of(&req.size)?;
    let n = name.clone();
    off_thread(move || {
        let (g, _) = site.find_volume(&n).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("volume {n} does not exist")))?;
        g.resize_volume(&n, size).map_err(failed)
    })
    .await?;
    Ok(Json(json!({"name": name, "size": size})))
}

async fn delete_volume(State(site): State<Arc<Site>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    primary_only(&site)?;
    let n = name.clone();
    off_thread(move || {
        let (g, _) = site.find_volume(&n).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("volume {n} does not exist")))?;
        g.delete_volume(&n).map_err(failed)
    })
    .await?;
    Ok(Json(json!({"deleted": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSettings {
    mode: Option<String>,
}

async fn set_group(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    body: Result<Json<GroupSettings>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let g = site.groups.read().unwrap().get(&name).cloned().ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("group {name} does not exist")))?;
    // A request that sets nothing is a mistake, not a success.
    if req.mode.is_none() {
        return Err(bad("nothing to change: give a setting (mode)"));
    }
    if let Some(m) = req.mode {
        let mode = crate::replicate::Mode::parse(&m).map_err(bad)?;
        let g2 = g.clone();
        blocking(move || g2.set_mode(mode)).await?;
        tracing::info!(event = "mode-changed", "group {name}: replication mode is now {m}");
    }
    Ok(Json(json!({"name": name, "mode": g.replication.mode().as_str()})))
}

// ---- snapshots ---------------------------------------------------------

/// The group holding map `name` (a volume or `VOL@SNAP`).
fn group_of(site: &Site, name: &str) -> Result<Arc<crate::group::Group>, ApiError> {
    site.find_volume(name).map(|(g, _)| g).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{name} does not exist")))
}

#[derive(Deserialize)]
struct SnapshotQuery {
    volume: Option<String>,
}

pub fn snapshot_json(g: &crate::group::Group, s: &crate::group::snapshot::SnapshotInfo) -> Value {
    json!({
        "name": s.name, "volume": s.volume, "group": g.name, "parent": s.parent,
        "created_seq": s.created_seq, "created": crate::util::rfc3339(s.created_ns), "created_ns": s.created_ns,
        "size": s.size, "unique_bytes": s.unique_bytes, "writable": s.writable, "retained": s.retained,
    })
}

async fn list_snapshots(State(site): State<Arc<Site>>, q: axum::extract::Query<SnapshotQuery>) -> Result<Json<Value>, ApiError> {
    let vol = q.volume.clone();
    off_thread(move || {
        if let Some(v) = &vol {
            group_of(&site, v)?;
        }
        let mut out = Vec::new();
        for g in site.group_list() {
            for s in g.snapshots(vol.as_deref().map(|v| v.split('@').next().unwrap_or(v))) {
                out.push(snapshot_json(&g, &s));
            }
        }
        Ok(Json(Value::Array(out)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshot {
    volume: String,
    name: String,
    #[serde(default)]
    writable: bool,
}

async fn create_snapshot(State(site): State<Arc<Site>>, body: Result<Json<CreateSnapshot>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let full = crate::group::Group::snapshot_name(&req.volume, &req.name);
    off_thread(move || {
        let g = group_of(&site, &req.volume)?;
        g.create_snapshot(&req.volume, &req.name, req.writable).map_err(failed)?;
        let s = g.snapshots(None).into_iter().find(|s| s.name == full).ok_or_else(|| failed(anyhow::anyhow!("snapshot {full} vanished")))?;
        Ok(Json(snapshot_json(&g, &s)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolSnap {
    volume: String,
    snapshot: String,
}

/// `restore` and `refresh`: one volume, one snapshot, one map copy.
async fn vol_snap_op(
    site: Arc<Site>,
    body: Result<Json<VolSnap>, axum::extract::rejection::JsonRejection>,
    done: &'static str,
    op: fn(&crate::group::Group, &str, &str) -> anyhow::Result<u64>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let seq = off_thread(move || {
        let g = group_of(&site, &req.volume)?;
        op(&g, &req.volume, &req.snapshot).map_err(failed)
    })
    .await?;
    Ok(Json(json!({done: true, "seq": seq})))
}

async fn restore_snapshot(State(site): State<Arc<Site>>, body: Result<Json<VolSnap>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, ApiError> {
    vol_snap_op(site, body, "restored", |g, v, s| g.restore_snapshot(v, s)).await
}

async fn refresh_snapshot(State(site): State<Arc<Site>>, body: Result<Json<VolSnap>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, ApiError> {
    vol_snap_op(site, body, "refreshed", |g, v, s| g.refresh_snapshot(v, s)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncSnapshots {
    from: String,
    to: String,
}

/// A bare snapshot name (no `@`) resolves if exactly one snapshot on the site has it.
fn resolve_snapshot(site: &Site, name: &str) -> Result<String, ApiError> {
    if name.contains('@') {
        group_of(site, name)?;
        return Ok(name.to_string());
    }
    let found: Vec<String> = site
        .group_list()
        .iter()
        .flat_map(|g| g.maps().into_iter().filter(|m| m.snapshot && m.name.split_once('@').is_some_and(|(_, s)| s == name)).map(|m| m.name))
        .collect();
    match found.len() {
        1 => Ok(found[0].clone()),
        0 => Err(ApiError(StatusCode::NOT_FOUND, format!("snapshot {name} does not exist"))),
        _ => Err(bad(format!("snapshot name {name} is ambiguous ({}); use VOLUME@SNAPSHOT", found.join(", ")))),
    }
}

async fn sync_snapshots(State(site): State<Arc<Site>>, body: Result<Json<SyncSnapshots>, axum::extract::rejection::JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    primary_only(&site)?;
    let (from, to, seq) = off_thread(move || {
        let from = resolve_snapshot(&site, &req.from)?;
        let to = resolve_snapshot(&site, &req.to)?;
        let g = group_of(&site, &from)?;
        if !Arc::ptr_eq(&g, &group_of(&site, &to)?) {
            return Err(bad(format!("{from} and {to} are in different consistency groups")));
        }
        let seq = g.sync_snapshots(&from, &to).map_err(failed)?;
        Ok((from, to, seq))
    })
    .await?;
    Ok(Json(json!({"synced": true, "from": from, "to": to, "seq": seq})))
}

async fn delete_snapshot(State(site): State<Arc<Site>>, Path((volume, snapshot)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    let full = crate::group::Group::snapshot_name(&volume, &snapshot);
    let dr = site.read_only();
    let f = full.clone();
    off_thread(move || {
        let g = group_of(&site, &f)?;
        if dr { g.delete_retained_snapshot(&volume, &snapshot) } else { g.delete_snapshot(&volume, &snapshot) }.map_err(failed)
    })
    .await?;
    Ok(Json(json!({"deleted": full})))
}
