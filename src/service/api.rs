//! The HTTP API and dashboard (axum): jobs listed, shown, submitted (a path inside a watch folder —
//! anything that resolves outside one, `..` tricks and symlinks included, is refused), cancelled and
//! retried; `/healthz` (the process answers), `/readyz` (the store answers and the workers are up),
//! `/metrics` (Prometheus), and the dashboard at `/`. With a token configured, `/api` and `/metrics`
//! need `Authorization: Bearer <token>`. [`router`] builds the app, so tests can call it directly.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::ingest::{Taken, move_file, take};
use super::metrics::{DeviceStatus, Metrics};
use super::store::{Job, JobState, Store};
use super::watch::Watch;
use super::{Bell, ServiceError};

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the handlers share.
pub struct AppState {
    /// The job store.
    pub store: Store,
    /// The watch folders.
    pub watches: Vec<Arc<Watch>>,
    /// This node's counters.
    pub metrics: Arc<Metrics>,
    /// This node's name.
    pub node: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Raised once the workers are up.
    pub ready: AtomicBool,
    /// Rung when a job is queued.
    pub bell: Arc<Bell>,
}

/// An API error: a status and a message, sent as `{"error": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        let status = match error {
            ServiceError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Io { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<super::store::StoreError> for ApiError {
    fn from(error: super::store::StoreError) -> Self {
        ServiceError::from(error).into()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The application: routes, auth and state.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/jobs", get(list_jobs).post(submit_job))
        .route("/api/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/jobs/{id}/thumbnail", get(thumbnail))
        .route("/api/jobs/{id}/report", get(report))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(state)
}

/// Refuses requests without the configured bearer token.
async fn require_token(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    ApiError::new(StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer …)").into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) && state.store.ping().await {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// A job as the API shows it.
#[derive(Serialize)]
pub struct JobView {
    #[serde(flatten)]
    job: Job,
    /// Seconds left, from the frames left and the seconds per frame.
    eta_seconds: Option<f64>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let left = (job.frames_total - job.frames_done).max(0) as f64;
        let eta_seconds = match job.state {
            JobState::Running => job.seconds_per_frame.map(|s| s * left),
            _ => None,
        };
        JobView { job, eta_seconds }
    }
}

#[derive(Serialize)]
struct JobList {
    jobs: Vec<JobView>,
    counts: std::collections::BTreeMap<&'static str, i64>,
    node: String,
    devices: Vec<DeviceStatus>,
}

async fn list_jobs(State(state): State<Arc<AppState>>) -> ApiResult<Json<JobList>> {
    let overview = state.store.overview(500).await?;
    let jobs = overview.jobs.into_iter().map(JobView::from).collect();
    Ok(Json(JobList { jobs, counts: overview.counts, node: state.node.clone(), devices: state.metrics.devices() }))
}

async fn get_job(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<JobView>> {
    Ok(Json(find(&state, &id).await?.into()))
}

async fn find(state: &AppState, id: &str) -> ApiResult<Job> {
    state.store.get(id).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job '{id}'")))
}

async fn thumbnail(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let jpeg = state
        .store
        .thumbnail(&id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("job '{id}' has no thumbnail yet")))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "image/jpeg".parse().expect("a valid header value"));
    headers.insert(header::CACHE_CONTROL, "no-cache".parse().expect("a valid header value"));
    Ok((headers, jpeg).into_response())
}

async fn report(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let json =
        state.store.report(&id).await?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, format!("job '{id}' has no report (it is not done)"))
        })?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/json".parse().expect("a valid header value"));
    Ok((headers, json).into_response())
}

/// A conflict unless `job` is in one of `states`; `only` completes "only … " in the message.
fn require_state(job: &Job, states: [JobState; 2], only: &str) -> ApiResult<()> {
    if states.contains(&job.state) {
        return Ok(());
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("job '{}' is {}; only {only}", job.id, job.state.as_str())))
}

async fn cancel_job(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<JobView>> {
    let job = find(&state, &id).await?;
    require_state(&job, [JobState::Queued, JobState::Running], "queued or running jobs can be cancelled")?;
    let job =
        state.store.cancel(&id).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job '{id}'")))?;
    Ok(Json(job.into()))
}

async fn retry_job(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<JobView>> {
    let job = find(&state, &id).await?;
    require_state(&job, [JobState::Failed, JobState::Cancelled], "failed or cancelled jobs can be retried")?;
    let input = bring_back(&state, &job)?;
    let job = state
        .store
        .retry(&id, &input)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, format!("job '{id}' changed state; try again")))?;
    state.bell.ring();
    Ok(Json(job.into()))
}

/// Moves a failed job's input back into the incoming folder; returns where it is.
fn bring_back(state: &AppState, job: &Job) -> ApiResult<PathBuf> {
    let Some(watch) = state.watches.iter().find(|w| w.config.name == job.watch) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("watch folder '{}' is no longer configured", job.watch),
        ));
    };
    let incoming = watch.config.incoming_path(&job.id, &job.name);
    if job.input_path == incoming || !job.input_path.exists() {
        if incoming.exists() {
            return Ok(incoming);
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the input of job '{}' is gone from '{}'", job.id, job.input_path.display()),
        ));
    }
    move_file(&job.input_path, &incoming)?;
    Ok(incoming)
}

/// `POST /api/jobs` body.
#[derive(Deserialize)]
struct Submit {
    /// A video file inside a watch folder.
    path: PathBuf,
}

async fn submit_job(State(state): State<Arc<AppState>>, Json(body): Json<Submit>) -> ApiResult<Response> {
    let (watch, path) = resolve_inside_watch(&state.watches, &body.path)?;
    let status = match take(&state.store, &watch, &path).await? {
        Taken::New(job) | Taken::Retried(job) => {
            state.bell.ring();
            (StatusCode::CREATED, Json(JobView::from(job)))
        }
        Taken::Duplicate(job) => (StatusCode::OK, Json(JobView::from(job))),
        Taken::Gone => {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("'{}' was taken meanwhile", body.path.display())));
        }
    };
    Ok(status.into_response())
}

/// The watch folder a submitted path is really inside, and the path resolved; refuses `..`
/// components, paths that resolve (through symlinks) outside every watch folder, and non-files.
pub fn resolve_inside_watch(watches: &[Arc<Watch>], path: &Path) -> Result<(Arc<Watch>, PathBuf), ApiError> {
    let refuse = |why: &str| ApiError::new(StatusCode::FORBIDDEN, format!("'{}': {why}", path.display()));
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("give an absolute path without '..' inside a watch folder"));
    }
    let resolved = path
        .canonicalize()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("'{}': no such file", path.display())))?;
    let watch = watches
        .iter()
        .find(|watch| {
            watch.config.path.canonicalize().is_ok_and(|root| resolved.starts_with(&root) && resolved != root)
        })
        .ok_or_else(|| refuse("not inside a watch folder"))?;
    if !resolved.is_file() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("'{}': not a regular file", path.display()),
        ));
    }
    let hidden = resolved.components().any(|c| c.as_os_str().to_string_lossy().starts_with(".impasto"));
    if hidden {
        return Err(refuse("inside the daemon's own folder"));
    }
    Ok((watch.clone(), resolved))
}

async fn metrics(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let counts = state.store.counts().await?;
    let text = state.metrics.render(&counts);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
