//! The job store on both of its databases: a real SQLite file and the real PostgreSQL server
//! (127.0.0.1:5432, database `test`, or `IMPASTO_TEST_POSTGRES`), each test in a fresh database.
//! Two `Store`s on one database stand for two nodes sharing it.
#![cfg(feature = "service")]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use impasto::service::store::{Finished, JobState, NewJob, Progress, Store, now_ms};

/// A fresh store: a SQLite file in a temporary folder, or a new PostgreSQL database.
struct Fresh {
    url: String,
    database: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Fresh {
    fn sqlite() -> Fresh {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state/jobs.db").display());
        Fresh { url, database: None, _dir: Some(dir) }
    }

    async fn postgres(tag: &str) -> Fresh {
        let (name, url) = common::postgres::create(tag).await;
        Fresh { url, database: Some(name), _dir: None }
    }

    async fn finish(self) {
        if let Some(name) = self.database {
            common::postgres::drop_database(&name).await;
        }
    }
}

fn new_job(n: usize) -> NewJob {
    NewJob {
        id: format!("{n:016x}"),
        content_hash: format!("hash{n}"),
        profile_key: "profile".into(),
        watch: "inbox".into(),
        name: format!("clip-{n}.mp4"),
        input_path: PathBuf::from(format!("/in/clip-{n}.mp4")),
        output: PathBuf::from(format!("/out/clip-{n}.mp4")),
    }
}

/// Runs `body` against a fresh SQLite store and a fresh PostgreSQL store.
async fn on_both<F, Fut>(tag: &str, body: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sqlite = Fresh::sqlite();
    body(sqlite.url.clone()).await;
    sqlite.finish().await;
    let postgres = Fresh::postgres(tag).await;
    body(postgres.url.clone()).await;
    postgres.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_stored_once_and_keeps_its_life_cycle() {
    on_both("lifecycle", |url| async move {
        let store = Store::connect(&url).await.unwrap();
        let (job, inserted) = store.enqueue(&new_job(1)).await.unwrap();
        assert!(inserted);
        assert_eq!(job.state, JobState::Queued);
        let (again, inserted) = store.enqueue(&new_job(1)).await.unwrap();
        assert!(!inserted, "the same id is one job");
        assert_eq!(again.created_ms, job.created_ms);

        let claimed = store.claim("node-a", "cpu").await.unwrap().expect("a queued job");
        assert_eq!((claimed.state, claimed.attempts, claimed.node.as_deref()), (JobState::Running, 1, Some("node-a")));
        assert!(store.claim("node-a", "cpu").await.unwrap().is_none(), "nothing else queued");
        let progress = Progress { frames_done: 3, frames_total: 10, seconds_per_frame: Some(0.5) };
        assert_eq!(store.heartbeat(&job.id, "node-a", progress).await.unwrap(), Some(false));
        assert_eq!(store.heartbeat(&job.id, "node-b", progress).await.unwrap(), None, "not node-b's job");
        store.set_thumbnail(&job.id, &[0xff, 0xd8, 1, 2, 3], 3).await.unwrap();
        assert_eq!(store.thumbnail(&job.id).await.unwrap(), Some(vec![0xff, 0xd8, 1, 2, 3]));

        store.cancel(&job.id).await.unwrap();
        assert_eq!(
            store.heartbeat(&job.id, "node-a", progress).await.unwrap(),
            Some(true),
            "the cancel reaches the worker"
        );
        store.mark_cancelled(&job.id).await.unwrap();
        let retried =
            store.retry(&job.id, &PathBuf::from("/in/again.mp4")).await.unwrap().expect("a cancelled job retries");
        assert_eq!((retried.state, retried.attempts), (JobState::Queued, 0));
        assert_eq!(retried.input_path, PathBuf::from("/in/again.mp4"));
        assert!(store.retry(&job.id, &PathBuf::from("/x")).await.unwrap().is_none(), "a queued job is not retried");

        store.claim("node-a", "cpu").await.unwrap().unwrap();
        assert_eq!(store.report(&job.id).await.unwrap(), None, "no report before it is done");
        let report = r#"{"frame_count":10,"resumed_frames":2}"#;
        let finished = Finished { resumed_frames: 2, progress: Progress { frames_done: 10, ..progress }, report };
        store.finish(&job.id, &PathBuf::from("/done/clip.mp4"), finished).await.unwrap();
        let done = store.get(&job.id).await.unwrap().unwrap();
        assert_eq!((done.state, done.resumed_frames, done.frames_done), (JobState::Done, 2, 10));
        assert_eq!(store.report(&job.id).await.unwrap().as_deref(), Some(report));
        assert_eq!(store.counts().await.unwrap()["done"], 1);
        let overview = store.overview(10).await.unwrap();
        assert_eq!((overview.jobs.len(), overview.counts["done"]), (1, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_take_the_same_job() {
    on_both("claims", |url| async move {
        let node_a = Store::connect(&url).await.unwrap();
        let node_b = Store::connect(&url).await.unwrap();
        for n in 0..40 {
            node_a.enqueue(&new_job(n)).await.unwrap();
        }
        let mut workers = Vec::new();
        for (index, store) in [node_a.clone(), node_a.clone(), node_b.clone(), node_b.clone()].into_iter().enumerate() {
            workers.push(tokio::spawn(async move {
                let mut taken = Vec::new();
                let mut idle = 0;
                while idle < 20 {
                    match store.claim(&format!("node-{index}"), "cpu").await.unwrap() {
                        Some(job) => {
                            taken.push(job.id);
                            idle = 0;
                        }
                        None => idle += 1,
                    }
                }
                taken
            }));
        }
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await.unwrap());
        }
        let distinct: BTreeSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), 40, "every job taken exactly once");
        assert_eq!(distinct.len(), 40);
        assert_eq!(node_b.counts().await.unwrap()["running"], 40);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_lists_and_counts_the_same_moment() {
    on_both("overview", |url| async move {
        let reader = Store::connect(&url).await.unwrap();
        let worker = Store::connect(&url).await.unwrap();
        for n in 0..30 {
            worker.enqueue(&new_job(n)).await.unwrap();
        }
        // Another node takes and finishes every job while the reader keeps reading.
        let painting = tokio::spawn(async move {
            while let Some(job) = worker.claim("node-w", "cpu").await.unwrap() {
                let progress = Progress { frames_done: 4, frames_total: 4, seconds_per_frame: Some(0.1) };
                let finished = Finished { resumed_frames: 0, progress, report: "{}" };
                worker.finish(&job.id, &PathBuf::from("/done/clip.mp4"), finished).await.unwrap();
            }
        });
        let mut reads = 0;
        loop {
            let settled = painting.is_finished();
            let overview = reader.overview(100).await.unwrap();
            for state in JobState::ALL {
                let listed = overview.jobs.iter().filter(|job| job.state == state).count() as i64;
                assert_eq!(
                    listed,
                    overview.counts[state.as_str()],
                    "{state:?} after {reads} reads: {:?}",
                    overview.counts
                );
            }
            reads += 1;
            if settled {
                assert_eq!(overview.counts["done"], 30);
                break;
            }
        }
        painting.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_for_their_time_and_dead_nodes_give_their_jobs_back() {
    on_both("recovery", |url| async move {
        let store = Store::connect(&url).await.unwrap();
        let (job, _) = store.enqueue(&new_job(7)).await.unwrap();
        store.claim("node-a", "cuda:0").await.unwrap().unwrap();
        store.retry_later(&job.id, "out of memory", now_ms() + 3_600_000).await.unwrap();
        assert!(store.claim("node-a", "cuda:0").await.unwrap().is_none(), "not due yet");
        store.retry_later(&job.id, "out of memory", now_ms() - 1).await.unwrap();
        let second = store.claim("node-a", "cuda:0").await.unwrap().expect("due now");
        assert_eq!(second.attempts, 2);
        assert_eq!(second.last_error.as_deref(), Some("out of memory"));

        assert_eq!(store.requeue_stale(now_ms() - 60_000).await.unwrap(), 0, "a live job stays");
        assert_eq!(store.requeue_stale(now_ms() + 1).await.unwrap(), 1, "a silent one goes back");
        let third = store.claim("node-b", "cpu").await.unwrap().expect("taken back");
        assert_eq!(third.node.as_deref(), Some("node-b"));
        assert_eq!(store.recover("node-b").await.unwrap(), 1, "after node-b's crash");
        store.claim("node-b", "cpu").await.unwrap().unwrap();
        store.requeue_interrupted(&job.id).await.unwrap();
        let queued = store.get(&job.id).await.unwrap().unwrap();
        assert_eq!((queued.state, queued.attempts), (JobState::Queued, 3), "a shutdown does not count as an attempt");
        store.claim("node-b", "cpu").await.unwrap().unwrap();
        store.fail(&job.id, "not a video", &PathBuf::from("/failed/clip.mp4")).await.unwrap();
        let failed = store.get(&job.id).await.unwrap().unwrap();
        assert_eq!((failed.state, failed.last_error.as_deref()), (JobState::Failed, Some("not a video")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_a_newer_version_migrated_further_is_still_taken() {
    on_both("newer", |url| async move {
        let store = Store::connect(&url).await.unwrap();
        store.enqueue(&new_job(1)).await.unwrap();
        drop(store);
        // what a newer version's migration leaves: one more applied migration and a column
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let blob = if url.starts_with("sqlite:") { "x'00'" } else { "'\\x00'::bytea" };
        let applied = format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from a newer version', TRUE, {blob}, 0)"
        );
        sqlx::query(&applied).execute(&pool).await.unwrap();
        sqlx::query("ALTER TABLE jobs ADD COLUMN newer_note TEXT").execute(&pool).await.unwrap();
        pool.close().await;
        let store = Store::connect(&url).await.expect("a store migrated further is taken");
        assert_eq!(store.overview(10).await.unwrap().jobs.len(), 1);
    })
    .await;
}
