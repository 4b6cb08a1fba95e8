//! A `PostgreSQL` database of its own per test, on the server `MANTLEGATE_TEST_POSTGRES_URL`
//! names (see [`super::services`] for when a test is skipped instead).

use tokio_postgres::NoTls;

use super::services;

/// `base` with its database name replaced by `db` (query parameters kept).
pub fn with_db(base: &str, db: &str) -> String {
    let (head, query) = base
        .split_once('?')
        .map_or((base, None), |(h, q)| (h, Some(q)));
    let authority = head.find("://").map_or(0, |i| i + 3);
    let path = head[authority..]
        .find('/')
        .map_or(head.len(), |i| authority + i);
    let mut url = format!("{}/{db}", &head[..path]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `sql` (any number of statements) on the database of `url`.
pub fn exec(url: &str, sql: &str) {
    runtime().block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = task.await;
    });
}

/// The single `BIGINT` (or `count`) value `sql` returns.
pub fn scalar(url: &str, sql: &str) -> i64 {
    runtime().block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
        let task = tokio::spawn(conn);
        let v: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        drop(client);
        let _ = task.await;
        v
    })
}

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub admin: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// `None` when no server is configured: the test is skipped (see [`services::url`]).
    pub fn create(test: &str) -> Option<Self> {
        let admin = services::url(services::POSTGRES_ENV, test)?;
        let name = format!("mg_test_{:016x}", rand::random::<u64>());
        exec(&admin, &format!("CREATE DATABASE {name}"));
        let url = with_db(&admin, &name);
        Some(Self { admin, name, url })
    }

    /// Closes every connection to this database but the caller's.
    pub fn terminate_connections(&self) {
        exec(
            &self.admin,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.name
            ),
        );
    }

    pub fn allow_connections(&self, allow: bool) {
        exec(
            &self.admin,
            &format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
                self.name
            ),
        );
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // On a thread of its own: it may be dropped inside an async test's runtime.
        let (admin, sql) = (
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        let _ = std::thread::spawn(move || exec(&admin, &sql)).join();
    }
}
