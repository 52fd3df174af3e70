//! The durable job store: one `jobs` table in SQLite (one node, the default) or PostgreSQL (several
//! nodes sharing one store), through sqlx with migrations for each. A job's id comes from its input's
//! content hash and its profile, so the same file dropped twice is one job. Every state change is one
//! conditional `UPDATE`, so two nodes can never both take a job: a worker claims the oldest queued job
//! with `UPDATE … WHERE id = (oldest queued) AND state = 'queued' RETURNING …`. Times are Unix
//! milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(#[from] sqlx::Error);

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError(sqlx::Error::Migrate(Box::new(error)))
    }
}

/// The store's result type.
pub type StoreResult<T> = Result<T, StoreError>;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker (or for its retry time).
    Queued,
    /// A worker paints it.
    Running,
    /// Painted; the output is in place.
    Done,
    /// Failed for good (bad input, or transient errors past the retry limit).
    Failed,
    /// Cancelled through the API.
    Cancelled,
}

impl JobState {
    /// Every state, in display order.
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed, JobState::Cancelled];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> JobState {
        JobState::ALL.into_iter().find(|state| state.as_str() == text).unwrap_or(JobState::Failed)
    }
}

/// A job as stored.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    /// Id: from the content hash and the profile.
    pub id: String,
    /// SHA-256 of the input file.
    pub content_hash: String,
    /// Hash of the watch folder's settings.
    pub profile_key: String,
    /// The watch folder's name.
    pub watch: String,
    /// The input's file name as dropped.
    pub name: String,
    /// Where the input is now (incoming, done or failed folder).
    pub input_path: PathBuf,
    /// Where the painted video goes.
    pub output: PathBuf,
    /// Life-cycle state.
    pub state: JobState,
    /// Attempts started.
    pub attempts: i64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Frames painted (or resumed) in the current or last attempt.
    pub frames_done: i64,
    /// Frames in the input (0 until known).
    pub frames_total: i64,
    /// Frames taken from checkpoints in the finishing attempt.
    pub resumed_frames: i64,
    /// Mean seconds per painted frame.
    pub seconds_per_frame: Option<f64>,
    /// Device of the current or last attempt.
    pub device: Option<String>,
    /// Node of the current or last attempt.
    pub node: Option<String>,
    /// When the job was created.
    pub created_ms: i64,
    /// When the last attempt started.
    pub started_ms: Option<i64>,
    /// When the job ended.
    pub finished_ms: Option<i64>,
    /// A queued job waits until then (retry back-off).
    pub not_before_ms: i64,
    /// The last sign of life of a running job.
    pub heartbeat_ms: Option<i64>,
    /// Whether a cancel was asked while it ran.
    pub cancel_requested: bool,
    /// Version of the stored thumbnail (the frame it shows), if any.
    pub thumbnail_version: Option<i64>,
}

/// How a job finished: frames taken from checkpoints, its last progress, its report (JSON).
#[derive(Clone, Copy, Debug)]
pub struct Finished<'a> {
    /// Frames taken from checkpoints in the finishing attempt.
    pub resumed_frames: i64,
    /// Frames done and in all, seconds per frame.
    pub progress: Progress,
    /// The video job's report as JSON.
    pub report: &'a str,
}

/// A job to create.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// Id.
    pub id: String,
    /// SHA-256 of the input.
    pub content_hash: String,
    /// Hash of the settings.
    pub profile_key: String,
    /// Watch folder name.
    pub watch: String,
    /// File name as dropped.
    pub name: String,
    /// Where the input is.
    pub input_path: PathBuf,
    /// Where the output goes.
    pub output: PathBuf,
}

/// Live numbers of a running job, written by its heartbeat.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Frames done.
    pub frames_done: i64,
    /// Frames in the input.
    pub frames_total: i64,
    /// Mean seconds per painted frame.
    pub seconds_per_frame: Option<f64>,
}

const COLUMNS: &str = "id, content_hash, profile_key, watch, name, input_path, output_path, state, attempts, \
    last_error, frames_done, frames_total, resumed_frames, seconds_per_frame, device, node, created_ms, started_ms, \
    finished_ms, not_before_ms, heartbeat_ms, cancel_requested, thumbnail_version";

/// The job store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL rather than SQLite: a consistent read needs `REPEATABLE READ` there.
    postgres: bool,
}

/// The newest jobs and the count in each state, read from one snapshot of the store, so the
/// counts describe the same moment as the list.
#[derive(Clone, Debug)]
pub struct Overview {
    /// The newest jobs, newest first.
    pub jobs: Vec<Job>,
    /// How many jobs are in each state (every state present).
    pub counts: BTreeMap<&'static str, i64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Store {
    /// Connects to `url` (`sqlite:///path` — created with its folder when missing — or
    /// `postgres://…`) and brings the schema up to date. A store that a newer version already
    /// migrated further is taken as it is (its migrations only add columns and tables), so the
    /// nodes sharing it can be upgraded one at a time.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        let url = prepare_url(url)?;
        let pool = AnyPoolOptions::new().max_connections(8).connect(&url).await?;
        let postgres = !url.starts_with("sqlite:");
        let mut migrator = if postgres {
            sqlx::migrate!("migrations/postgres")
        } else {
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await?;
            sqlx::migrate!("migrations/sqlite")
        };
        migrator.set_ignore_missing(true).run(&pool).await?;
        Ok(Store { pool, postgres })
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Creates the job unless a job with its id exists; returns the stored job and whether it is new.
    pub async fn enqueue(&self, job: &NewJob) -> StoreResult<(Job, bool)> {
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, content_hash, profile_key, watch, name, input_path, output_path, state, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8) ON CONFLICT DO NOTHING",
        )
        .bind(&job.id)
        .bind(&job.content_hash)
        .bind(&job.profile_key)
        .bind(&job.watch)
        .bind(&job.name)
        .bind(path_text(&job.input_path))
        .bind(path_text(&job.output))
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let stored = self.get(&job.id).await?.ok_or(sqlx::Error::RowNotFound)?;
        Ok((stored, inserted))
    }

    /// Takes the oldest queued job that is due, for `node`'s `device`.
    pub async fn claim(&self, node: &str, device: &str) -> StoreResult<Option<Job>> {
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, node = $1, device = $2, started_ms = $3, \
             heartbeat_ms = $3, cancel_requested = 0, frames_done = 0 \
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND not_before_ms <= $3 \
                         ORDER BY created_ms, id LIMIT 1) AND state = 'queued' RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql).bind(node).bind(device).bind(now_ms()).fetch_optional(&self.pool).await?;
        row.map(|row| job_from_row(&row)).transpose()
    }

    /// Writes a running job's progress and liveness; returns whether a cancel was asked, or `None`
    /// when the job is no longer this node's (taken back as stale, or cancelled while queued).
    pub async fn heartbeat(&self, id: &str, node: &str, progress: Progress) -> StoreResult<Option<bool>> {
        let row = sqlx::query(
            "UPDATE jobs SET heartbeat_ms = $1, frames_done = $2, frames_total = $3, seconds_per_frame = $4 \
             WHERE id = $5 AND state = 'running' AND node = $6 RETURNING cancel_requested",
        )
        .bind(now_ms())
        .bind(progress.frames_done)
        .bind(progress.frames_total)
        .bind(progress.seconds_per_frame)
        .bind(id)
        .bind(node)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(row.try_get::<i64, _>(0)? != 0)).transpose()
    }

    /// Stores the thumbnail of the latest painted frame.
    pub async fn set_thumbnail(&self, id: &str, jpeg: &[u8], version: i64) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET thumbnail = $1, thumbnail_version = $2 WHERE id = $3")
            .bind(jpeg.to_vec())
            .bind(version)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The stored thumbnail, if any.
    pub async fn thumbnail(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT thumbnail FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.and_then(|row| row.try_get::<Option<Vec<u8>>, _>(0).ok().flatten()))
    }

    /// A done job's report (JSON), if any.
    pub async fn report(&self, id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT report FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.and_then(|row| row.try_get::<Option<String>, _>(0).ok().flatten()))
    }

    /// Marks a job done.
    pub async fn finish(&self, id: &str, input_path: &Path, outcome: Finished<'_>) -> StoreResult<()> {
        let Finished { resumed_frames, progress, report } = outcome;
        sqlx::query(
            "UPDATE jobs SET state = 'done', finished_ms = $1, input_path = $2, resumed_frames = $3, frames_done = $4, \
             frames_total = $5, seconds_per_frame = $6, last_error = NULL, cancel_requested = 0, report = $7 \
             WHERE id = $8",
        )
        .bind(now_ms())
        .bind(path_text(input_path))
        .bind(resumed_frames)
        .bind(progress.frames_done)
        .bind(progress.frames_total)
        .bind(progress.seconds_per_frame)
        .bind(report)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails a job for good.
    pub async fn fail(&self, id: &str, error: &str, input_path: &Path) -> StoreResult<()> {
        sqlx::query(
            "UPDATE jobs SET state = 'failed', last_error = $1, finished_ms = $2, input_path = $3, cancel_requested = 0 \
             WHERE id = $4",
        )
        .bind(error)
        .bind(now_ms())
        .bind(path_text(input_path))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Puts a job that failed transiently back in the queue, due at `not_before_ms`.
    pub async fn retry_later(&self, id: &str, error: &str, not_before_ms: i64) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET state = 'queued', last_error = $1, not_before_ms = $2 WHERE id = $3")
            .bind(error)
            .bind(not_before_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Puts a job stopped by a shutdown back in the queue; the interrupted attempt does not count.
    pub async fn requeue_interrupted(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET state = 'queued', attempts = attempts - 1 WHERE id = $1 AND state = 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks a running job cancelled (its worker stopped it).
    pub async fn mark_cancelled(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_ms = $1, cancel_requested = 0 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Cancels a job: a queued one at once, a running one by asking its worker (it stops after the
    /// current frame). Returns the job, or `None` when there is no such job.
    pub async fn cancel(&self, id: &str) -> StoreResult<Option<Job>> {
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_ms = $1 WHERE id = $2 AND state = 'queued'")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state = 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.get(id).await
    }

    /// Queues a failed or cancelled job again, with its input now at `input_path`; `None` when the
    /// job is in another state.
    pub async fn retry(&self, id: &str, input_path: &Path) -> StoreResult<Option<Job>> {
        let changed = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, not_before_ms = 0, cancel_requested = 0, last_error = NULL, \
             finished_ms = NULL, frames_done = 0, input_path = $1 WHERE id = $2 AND state IN ('failed', 'cancelled')",
        )
        .bind(path_text(input_path))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if changed == 0 { Ok(None) } else { self.get(id).await }
    }

    /// After a crash: this node's running jobs go back to the queue (they resume from their
    /// checkpoints), or to cancelled when a cancel was asked. Returns how many.
    pub async fn recover(&self, node: &str) -> StoreResult<u64> {
        let result = sqlx::query(
            "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'queued' END \
             WHERE state = 'running' AND node = $1",
        )
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Running jobs whose node has been silent since `before_ms` go back to the queue.
    pub async fn requeue_stale(&self, before_ms: i64) -> StoreResult<u64> {
        let result = sqlx::query(
            "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'queued' END \
             WHERE state = 'running' AND heartbeat_ms < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// One job.
    pub async fn get(&self, id: &str) -> StoreResult<Option<Job>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.map(|row| job_from_row(&row)).transpose()
    }

    /// How many jobs are in each state (every state present, zero when none).
    pub async fn counts(&self) -> StoreResult<BTreeMap<&'static str, i64>> {
        let rows = sqlx::query(COUNTS_SQL).fetch_all(&self.pool).await?;
        counts_from_rows(&rows)
    }

    /// The newest `limit` jobs and the counts, both from one snapshot: a read transaction
    /// (SQLite keeps its first read's snapshot until the end of the transaction; PostgreSQL does so
    /// at `REPEATABLE READ`). Two separate reads could list a job as running and count it as done.
    pub async fn overview(&self, limit: i64) -> StoreResult<Overview> {
        let mut transaction = self.pool.begin().await?;
        if self.postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *transaction).await?;
        }
        let job_rows = sqlx::query(&list_sql()).bind(limit).fetch_all(&mut *transaction).await?;
        let count_rows = sqlx::query(COUNTS_SQL).fetch_all(&mut *transaction).await?;
        transaction.commit().await?;
        let jobs = job_rows.iter().map(job_from_row).collect::<StoreResult<_>>()?;
        Ok(Overview { jobs, counts: counts_from_rows(&count_rows)? })
    }
}

/// The newest jobs first, at most `$1`.
fn list_sql() -> String {
    format!("SELECT {COLUMNS} FROM jobs ORDER BY created_ms DESC, id LIMIT $1")
}

const COUNTS_SQL: &str = "SELECT state, COUNT(*) FROM jobs GROUP BY state";

/// Counts per state from `SELECT state, COUNT(*)` rows, with every state present.
fn counts_from_rows(rows: &[AnyRow]) -> StoreResult<BTreeMap<&'static str, i64>> {
    let mut counts: BTreeMap<&'static str, i64> = JobState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for row in rows {
        let state = JobState::parse(&row.try_get::<String, _>(0)?);
        *counts.entry(state.as_str()).or_default() += row.try_get::<i64, _>(1)?;
    }
    Ok(counts)
}

/// Adds what SQLite needs to create a missing file (and creates its folder).
fn prepare_url(url: &str) -> StoreResult<String> {
    let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else {
        return Ok(url.to_string());
    };
    let path = rest.split('?').next().unwrap_or(rest);
    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(sqlx::Error::Io(e)))?;
    }
    Ok(if rest.contains("mode=") {
        url.to_string()
    } else if rest.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    })
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn job_from_row(row: &AnyRow) -> StoreResult<Job> {
    Ok(Job {
        id: row.try_get("id")?,
        content_hash: row.try_get("content_hash")?,
        profile_key: row.try_get("profile_key")?,
        watch: row.try_get("watch")?,
        name: row.try_get("name")?,
        input_path: PathBuf::from(row.try_get::<String, _>("input_path")?),
        output: PathBuf::from(row.try_get::<String, _>("output_path")?),
        state: JobState::parse(&row.try_get::<String, _>("state")?),
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        frames_done: row.try_get("frames_done")?,
        frames_total: row.try_get("frames_total")?,
        resumed_frames: row.try_get("resumed_frames")?,
        seconds_per_frame: row.try_get("seconds_per_frame")?,
        device: row.try_get("device")?,
        node: row.try_get("node")?,
        created_ms: row.try_get("created_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        not_before_ms: row.try_get("not_before_ms")?,
        heartbeat_ms: row.try_get("heartbeat_ms")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        thumbnail_version: row.try_get("thumbnail_version")?,
    })
}
