//! A fresh PostgreSQL database per test on the server the machine runs (127.0.0.1:5432, database
//! `test`, or `IMPASTO_TEST_POSTGRES`), dropped at the end.

/// The database tests connect to first, to create and drop their own.
fn admin_url() -> String {
    std::env::var("IMPASTO_TEST_POSTGRES").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// Creates the empty database `impasto_<tag>_<pid>`; returns its name and URL.
pub async fn create(tag: &str) -> (String, String) {
    let admin = admin_url();
    let name = format!("impasto_{tag}_{}", std::process::id());
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&admin).await.unwrap_or_else(|e| panic!("PostgreSQL at {admin}: {e}"));
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&pool).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (name, url)
}

/// Drops the database `name`, closing its connections.
pub async fn drop_database(name: &str) {
    if let Ok(pool) = sqlx::AnyPool::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&pool).await;
    }
}

/// A fresh database for a test that is not async, dropped with this value.
pub struct FreshDatabase {
    /// Its URL.
    pub url: String,
    name: String,
    runtime: tokio::runtime::Runtime,
}

impl FreshDatabase {
    /// Creates `impasto_<tag>_<pid>`.
    pub fn create(tag: &str) -> FreshDatabase {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (name, url) = runtime.block_on(create(tag));
        FreshDatabase { url, name, runtime }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        self.runtime.block_on(drop_database(&self.name));
    }
}
