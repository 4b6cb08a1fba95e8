//! The ledger's read model: the per-day roll-up rows of a period of UTC days, as every
//! ledger (SQLite, `PostgreSQL`) returns them to reports and budgets.

use anyhow::Context as _;
use jiff::civil::Date;

/// The UTC days a read of the roll-up covers: `from` inclusive, `to` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// First day covered.
    pub from: Date,
    /// First day no longer covered.
    pub to: Date,
}

/// One row of the `daily` roll-up table; text columns are `""` when the call had no value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DailyRow {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Name of the caller's key.
    pub key_name: String,
    /// Route prefix the calls came through.
    pub route: String,
    /// Project name.
    pub project_name: String,
    /// Bedrock project ID.
    pub project_id: String,
    /// The project's tags at call time, as a JSON object.
    pub tags: String,
    /// API family.
    pub api: String,
    /// Model named in the calls.
    pub model: String,
    /// How the calls ended.
    pub outcome: String,
    /// Number of calls.
    pub requests: i64,
    /// Input tokens, cached ones included.
    pub input_tokens: i64,
    /// Input tokens read from the prompt cache.
    pub cached_input_tokens: i64,
    /// Output tokens, reasoning ones included.
    pub output_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Summed cost of the priced calls, in pico-dollars (1e-12 USD).
    pub cost_pico: i64,
    /// Calls whose model had no price: their cost is unknown, not zero.
    pub unpriced_requests: i64,
}

/// The SQLite roll-up query; the `PostgreSQL` twin needs `$1`/`$2` instead of `?1`/`?2`.
/// `day` leads the primary key, so the range is an index scan.
const DAILY_SQL: &str = "SELECT day, key_name, route, project_name, project_id, tags, api, model,
    outcome, requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens,
    cost_pico, unpriced_requests
    FROM daily WHERE day >= ?1 AND day < ?2";

/// The roll-up rows of the days in `[period.from, period.to)`.
///
/// # Errors
/// Database errors (no `daily` table, unreadable file, wrong column types).
pub fn load_daily(conn: &rusqlite::Connection, period: &Period) -> anyhow::Result<Vec<DailyRow>> {
    let mut stmt = conn
        .prepare_cached(DAILY_SQL)
        .context("preparing the daily roll-up query")?;
    let rows = stmt.query_map(
        rusqlite::params![period.from.to_string(), period.to.to_string()],
        |r| {
            Ok(DailyRow {
                day: r.get(0)?,
                key_name: r.get(1)?,
                route: r.get(2)?,
                project_name: r.get(3)?,
                project_id: r.get(4)?,
                tags: r.get(5)?,
                api: r.get(6)?,
                model: r.get(7)?,
                outcome: r.get(8)?,
                requests: r.get(9)?,
                input_tokens: r.get(10)?,
                cached_input_tokens: r.get(11)?,
                output_tokens: r.get(12)?,
                reasoning_tokens: r.get(13)?,
                cost_pico: r.get(14)?,
                unpriced_requests: r.get(15)?,
            })
        },
    )?;
    rows.collect::<Result<Vec<_>, _>>().with_context(|| {
        format!(
            "reading the daily roll-up from {} to {}",
            period.from, period.to
        )
    })
}
