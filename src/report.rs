//! Cost reports: the ledger's daily roll-up grouped by dimensions, as a table, CSV, JSON or FOCUS.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::str::FromStr;

use jiff::civil::Date;
use rust_decimal::Decimal;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// The roll-up rows a report aggregates, and the period it covers: the ledger's read model.
pub use crate::ledger::read::{DailyRow, Period};

/// A dimension a report can be grouped by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// The project name (mantlegate's handle for a Bedrock project).
    Project,
    /// The model named in the call.
    Model,
    /// The caller key's name.
    Key,
    /// The route prefix the call came through.
    Route,
    /// The API family (`chat.completions`, `responses`, `models`).
    Api,
    /// The UTC day, `YYYY-MM-DD`.
    Day,
    /// The UTC month, `YYYY-MM`.
    Month,
    /// How the call ended (`forwarded`, `rejected`, `upstream_error`, `client_disconnect`, `client_stalled`).
    Outcome,
    /// The value of one cost allocation tag of the call's project at call time; `""` when the
    /// project had no such tag (as Cost Explorer's "No tag key" group).
    Tag(String),
}

/// The names `parse_dims` accepts, for error messages.
const VALID_DIMS: &str = "project, model, key, route, api, day, month, outcome, tag:<TagKey>";

impl fmt::Display for Dim {
    /// The name used in `--group-by`, column headers and JSON keys: `project`, `tag:Team`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Dim::Project => "project",
            Dim::Model => "model",
            Dim::Key => "key",
            Dim::Route => "route",
            Dim::Api => "api",
            Dim::Day => "day",
            Dim::Month => "month",
            Dim::Outcome => "outcome",
            Dim::Tag(key) => return write!(f, "tag:{key}"),
        };
        f.write_str(name)
    }
}

impl FromStr for Dim {
    type Err = String;

    /// One dimension name; names are case-insensitive, tag keys are kept as written.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("tag:")) {
            let key = s.get(4..).unwrap_or_default().trim();
            if key.is_empty() {
                return Err(format!(
                    "\"{s}\" names no tag key: write tag:<TagKey>, e.g. tag:Team"
                ));
            }
            return Ok(Dim::Tag(key.to_owned()));
        }
        match s.to_ascii_lowercase().as_str() {
            "project" => Ok(Dim::Project),
            "model" => Ok(Dim::Model),
            "key" => Ok(Dim::Key),
            "route" => Ok(Dim::Route),
            "api" => Ok(Dim::Api),
            "day" => Ok(Dim::Day),
            "month" => Ok(Dim::Month),
            "outcome" => Ok(Dim::Outcome),
            _ => Err(format!(
                "unknown group-by dimension \"{s}\": valid ones are {VALID_DIMS}"
            )),
        }
    }
}

/// The most dimensions a report may be grouped by: each is a column of every row, and a
/// grouping by thousands of tag keys costs gigabytes for nothing anyone reads.
pub const MAX_DIMS: usize = 8;

/// The most rows (groups) a report may have; a larger one is refused, not built.
pub const MAX_GROUPS: usize = 200_000;

/// Why a report is refused for its size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    /// More than [`MAX_DIMS`] group-by dimensions.
    #[error(
        "a report is grouped by at most {MAX_DIMS} dimensions, and {0} were given: group by fewer"
    )]
    Dims(usize),
    /// More than [`MAX_GROUPS`] rows.
    #[error(
        "the report would have more than {MAX_GROUPS} rows: group by fewer dimensions or ask for a shorter period"
    )]
    Groups,
}

/// Refuses a `--group-by` / `group_by` list of more than [`MAX_DIMS`] dimensions, before
/// anything is parsed or read.
///
/// # Errors
/// [`TooLarge::Dims`].
pub fn check_dim_count(s: &str) -> Result<(), TooLarge> {
    if s.trim().is_empty() {
        return Ok(());
    }
    let n = s.split(',').count();
    if n > MAX_DIMS {
        return Err(TooLarge::Dims(n));
    }
    Ok(())
}

/// `"project,tag:Team,day"` -> dims, in that order. An empty string means no grouping (one
/// row: the total).
///
/// # Errors
/// An unknown or empty name (the message lists the valid ones), or a dimension given twice.
pub fn parse_dims(s: &str) -> Result<Vec<Dim>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut dims = Vec::new();
    for item in s.split(',') {
        if item.trim().is_empty() {
            return Err(format!(
                "empty dimension in \"{s}\": valid ones are {VALID_DIMS}"
            ));
        }
        let dim: Dim = item.parse()?;
        if dims.contains(&dim) {
            return Err(format!("dimension \"{dim}\" is given twice in \"{s}\""));
        }
        dims.push(dim);
    }
    Ok(dims)
}

/// An output format of [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned columns for a terminal, with a TOTAL line.
    #[default]
    Table,
    /// RFC 4180 CSV, one line per row, no total.
    Csv,
    /// One JSON document with the rows and the total; costs are exact decimal strings.
    Json,
    /// CSV in the `FinOps` FOCUS 1.0 column layout (see [`render`]).
    Focus,
}

impl Format {
    /// The `Content-Type` of the rendered text, for HTTP responses.
    #[must_use]
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Table => "text/plain; charset=utf-8",
            Format::Csv | Format::Focus => "text/csv; charset=utf-8",
            Format::Json => "application/json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Table => "table",
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Focus => "focus",
        })
    }
}

impl FromStr for Format {
    type Err = String;

    /// `table`, `csv`, `json` or `focus`, case-insensitive.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "focus" => Ok(Format::Focus),
            _ => Err(format!(
                "unknown report format \"{s}\": expected table, csv, json or focus"
            )),
        }
    }
}

/// The period of `from` and `to` (`YYYY-MM-DD`, UTC days, `to` exclusive). Defaults: `from` is
/// the first day of `today`'s month, `to` is the day after `today` (so month to date).
///
/// # Errors
/// A date that is not a valid `YYYY-MM-DD` (the message says the format), or `from >= to`.
pub fn period(from: Option<&str>, to: Option<&str>, today: Date) -> Result<Period, String> {
    let from = match from {
        Some(s) => parse_day("from", s)?,
        None => today.first_of_month(),
    };
    let to = match to {
        Some(s) => parse_day("to", s)?,
        None => today
            .tomorrow()
            .map_err(|err| format!("no day after {today}: {err}"))?,
    };
    if from >= to {
        return Err(format!(
            "empty period: from {from} is not before to {to} (to is exclusive, the first day not reported)"
        ));
    }
    Ok(Period { from, to })
}

/// A strict `YYYY-MM-DD`: jiff alone would also take datetimes and 6-digit years.
fn parse_day(which: &str, s: &str) -> Result<Date, String> {
    let t = s.trim();
    let shaped = t.len() == 10
        && t.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    shaped
        .then(|| t.parse::<Date>().ok())
        .flatten()
        .ok_or_else(|| {
            format!(
                "invalid {which} date \"{s}\": expected YYYY-MM-DD (a UTC day, e.g. 2026-11-01)"
            )
        })
}

/// One group of a report (or its total). Sums are `i128`, so no roll-up can overflow them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportRow {
    /// The group's value of each of the report's dims, in order; empty for the total.
    pub keys: Vec<String>,
    /// Number of calls.
    pub requests: i128,
    /// Input tokens, cached ones included.
    pub input_tokens: i128,
    /// Input tokens read from the prompt cache.
    pub cached_input_tokens: i128,
    /// Output tokens, reasoning ones included.
    pub output_tokens: i128,
    /// Reasoning tokens.
    pub reasoning_tokens: i128,
    /// Cost of the priced calls in pico-dollars: the exact sum `cost_usd` is made from.
    pub cost_pico: i128,
    /// `cost_pico` in USD, exact and normalized (`12.5`, not `12.500000000000`): the cost of
    /// the group's priced calls. `None` (unknown, never a silent $0) when the group has
    /// unpriced calls and its priced calls cost nothing, e.g. every call of it is unpriced.
    pub cost_usd: Option<Decimal>,
    /// Calls whose model had no price: their cost is unknown and not in `cost_usd`.
    pub unpriced_requests: i128,
    /// When grouped by project: the project's Bedrock ID on the latest day seen; else `""`.
    pub project_id: String,
    /// When grouped by project: the project's tags on the latest day seen in the group.
    /// Otherwise the values of the tag dims (absent tags left out). Empty for the total.
    pub tags: BTreeMap<String, String>,
    /// First day with data in the group (`None` when there is none).
    pub first_day: Option<Date>,
    /// Last day with data in the group.
    pub last_day: Option<Date>,
}

/// A cost report: the rows of a period grouped by `dims`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The grouping, in column order.
    pub dims: Vec<Dim>,
    /// The days covered.
    pub period: Period,
    /// One row per group, by cost descending, then by keys.
    pub rows: Vec<ReportRow>,
    /// The sum of all rows; its `cost_usd` equals the sum of theirs exactly.
    pub total: ReportRow,
}

/// Parsed `tags` JSON, one entry per distinct string.
type TagCache<'a> = HashMap<&'a str, BTreeMap<String, String>>;

/// Running sums of one group.
#[derive(Default)]
struct Group<'a> {
    requests: i128,
    input_tokens: i128,
    cached_input_tokens: i128,
    output_tokens: i128,
    reasoning_tokens: i128,
    cost_pico: i128,
    unpriced_requests: i128,
    first_day: Option<&'a str>,
    last_day: Option<&'a str>,
    /// The row whose project ID and tags describe the group: latest day, ties broken by the
    /// tags and ID so that the result does not depend on row order.
    latest: Option<&'a DailyRow>,
}

impl<'a> Group<'a> {
    fn add(&mut self, row: &'a DailyRow) {
        self.requests += i128::from(row.requests);
        self.input_tokens += i128::from(row.input_tokens);
        self.cached_input_tokens += i128::from(row.cached_input_tokens);
        self.output_tokens += i128::from(row.output_tokens);
        self.reasoning_tokens += i128::from(row.reasoning_tokens);
        self.cost_pico += i128::from(row.cost_pico);
        self.unpriced_requests += i128::from(row.unpriced_requests);
        let day = row.day.as_str();
        self.first_day = Some(self.first_day.map_or(day, |d| d.min(day)));
        self.last_day = Some(self.last_day.map_or(day, |d| d.max(day)));
        if self.latest.is_none_or(|l| rank(row) > rank(l)) {
            self.latest = Some(row);
        }
    }

    fn finish(
        self,
        keys: Vec<String>,
        project_id: String,
        tags: BTreeMap<String, String>,
    ) -> ReportRow {
        ReportRow {
            keys,
            requests: self.requests,
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            output_tokens: self.output_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cost_pico: self.cost_pico,
            cost_usd: known_cost(self.cost_pico, self.unpriced_requests),
            unpriced_requests: self.unpriced_requests,
            project_id,
            tags,
            first_day: self.first_day.and_then(|d| d.parse().ok()),
            last_day: self.last_day.and_then(|d| d.parse().ok()),
        }
    }
}

/// The cost of a group's priced calls, or `None` when it has unpriced calls and nothing
/// priced adds to it: $0 there would claim a cost nobody knows.
fn known_cost(cost_pico: i128, unpriced_requests: i128) -> Option<Decimal> {
    (cost_pico != 0 || unpriced_requests == 0).then(|| pico_to_usd(cost_pico))
}

/// Which row describes a group best: the latest day, then the greatest tags and ID.
fn rank(r: &DailyRow) -> (&str, &str, &str) {
    (&r.day, &r.tags, &r.project_id)
}

/// Exact: 1 pico-dollar is 1e-12 USD. A `Decimal` holds 28 digits, so this saturates beyond
/// 7.9e16 USD, which no ledger reaches.
fn pico_to_usd(pico: i128) -> Decimal {
    Decimal::try_from_i128_with_scale(pico, 12)
        .map_or(if pico < 0 { Decimal::MIN } else { Decimal::MAX }, |d| {
            d.normalize()
        })
}

/// A project's tags JSON as a map. Non-string values keep their JSON text; unparsable JSON
/// (never written by the ledger) counts as no tags.
fn parse_tags(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str::<BTreeMap<String, serde_json::Value>>(json)
        .map(|map| {
            map.into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn tags_of<'a, 'c>(cache: &'c mut TagCache<'a>, json: &'a str) -> &'c BTreeMap<String, String> {
    cache.entry(json).or_insert_with(|| parse_tags(json))
}

/// The value of `dim` for one roll-up row.
fn dim_value<'a>(dim: &Dim, row: &'a DailyRow, cache: &mut TagCache<'a>) -> String {
    match dim {
        Dim::Project => row.project_name.clone(),
        Dim::Model => row.model.clone(),
        Dim::Key => row.key_name.clone(),
        Dim::Route => row.route.clone(),
        Dim::Api => row.api.clone(),
        Dim::Day => row.day.clone(),
        Dim::Month => row.day.get(..7).unwrap_or(&row.day).to_owned(),
        Dim::Outcome => row.outcome.clone(),
        Dim::Tag(key) => tags_of(cache, &row.tags)
            .get(key)
            .cloned()
            .unwrap_or_default(),
    }
}

/// Groups roll-up rows by `dims` (all of `rows` are counted: filter by day in
/// [`load_daily`]). A project is grouped by its name, the handle budgets and config use; a
/// tag dim takes the tag's value at call time. Rows come sorted by cost descending, then by
/// keys; the total is summed in pico-dollars like the rows, so it equals their sum exactly.
#[must_use]
pub fn aggregate(rows: &[DailyRow], dims: &[Dim], period: Period) -> Report {
    match aggregate_within(rows, dims, period, usize::MAX) {
        Ok(report) => report,
        // Unreachable with no bound on the groups; an empty report is still an answer.
        Err(_) => Report {
            dims: dims.to_vec(),
            period,
            rows: Vec::new(),
            total: Group::default().finish(Vec::new(), String::new(), BTreeMap::new()),
        },
    }
}

/// [`aggregate`] that gives up as soon as a report would have more than `max_groups` rows,
/// so its memory stays bounded by what it would return.
///
/// # Errors
/// [`TooLarge::Groups`].
pub fn aggregate_within(
    rows: &[DailyRow],
    dims: &[Dim],
    period: Period,
    max_groups: usize,
) -> Result<Report, TooLarge> {
    let mut cache = TagCache::new();
    let mut groups: HashMap<Vec<String>, Group<'_>> = HashMap::new();
    let mut total = Group::default();
    for row in rows {
        let keys: Vec<String> = dims.iter().map(|d| dim_value(d, row, &mut cache)).collect();
        if groups.len() >= max_groups && !groups.contains_key(&keys) {
            return Err(TooLarge::Groups);
        }
        groups.entry(keys).or_default().add(row);
        total.add(row);
    }
    let by_project = dims.contains(&Dim::Project);
    let mut out: Vec<ReportRow> = groups
        .into_iter()
        .map(|(keys, group)| {
            let (project_id, tags) = match group.latest {
                Some(latest) if by_project => (
                    latest.project_id.clone(),
                    tags_of(&mut cache, &latest.tags).clone(),
                ),
                _ => (String::new(), tag_dim_values(dims, &keys)),
            };
            group.finish(keys, project_id, tags)
        })
        .collect();
    out.sort_by(|a, b| {
        b.cost_pico
            .cmp(&a.cost_pico)
            .then_with(|| a.keys.cmp(&b.keys))
    });
    Ok(Report {
        dims: dims.to_vec(),
        period,
        rows: out,
        total: total.finish(Vec::new(), String::new(), BTreeMap::new()),
    })
}

/// The tag keys the calls of `rows` carried (their projects' tags at call time).
#[must_use]
pub fn tag_keys(rows: &[DailyRow]) -> std::collections::BTreeSet<String> {
    let mut cache = TagCache::new();
    let mut keys = std::collections::BTreeSet::new();
    for row in rows {
        for key in tags_of(&mut cache, &row.tags).keys() {
            if !keys.contains(key) {
                keys.insert(key.clone());
            }
        }
    }
    keys
}

/// The non-empty values of the tag dims of a group, by tag key.
fn tag_dim_values(dims: &[Dim], keys: &[String]) -> BTreeMap<String, String> {
    dims.iter()
        .zip(keys)
        .filter_map(|(dim, value)| match dim {
            Dim::Tag(key) if !value.is_empty() => Some((key.clone(), value.clone())),
            _ => None,
        })
        .collect()
}

/// The report as text in `format`. In every format a row's cost is that of its priced
/// calls, and its unpriced calls are counted apart; a row with unpriced calls and no priced
/// cost has an unknown cost (see [`ReportRow::cost_usd`]), never $0:
///
/// - `Table`: a period line, aligned columns (dims, `requests`, `input`, `cached`, `output`,
///   `reasoning`, `cost_usd`, `unpriced`), a TOTAL line and, when some calls had no price, a
///   note saying how many are missing from `cost_usd`. Costs show every digit, at least two
///   decimals (`12.50`, `0.000123`), an unknown cost `unknown`; an empty dim value shows as
///   `(none)`.
/// - `Csv`: RFC 4180 (CRLF, fields quoted when they hold `,` `"` CR or LF); header: the dim
///   names (`tag:Team`) then `requests,input_tokens,cached_input_tokens,output_tokens,
///   reasoning_tokens,cost_usd,unpriced_requests`; costs as plain decimals, an unknown cost
///   empty; no total row.
/// - `Json`: `{"from","to","group_by":[..],"rows":[{<dim name>: value, .., "requests": N, ..,
///   "cost_usd": "12.5", "unpriced_requests": N}],"total":{..}}`; costs are exact decimal
///   strings (`null` when unknown), counts are numbers.
/// - `Focus`: CSV with every FOCUS 1.0 column, in the specification's (alphabetical) order,
///   then custom `x_` columns, one line per row. Filled columns:
///   - `BilledCost`, `EffectiveCost`, `ListCost`, `ContractedCost`: the row's cost (mantlegate
///     prices at list price); empty when it is unknown, and never counting unpriced calls
///     (see `x_UnpricedRequests`);
///   - `BillingCurrency` `USD`; `BillingPeriodStart`/`End`: the report's period;
///   - `ChargePeriodStart`/`End`: the row's day or month (clipped to the period) when grouped
///     by day or month, else the period; all times are ISO 8601 UTC, `2026-11-01T00:00:00Z`;
///   - `ChargeCategory` `Usage`, `ChargeFrequency` `Usage-Based`, `PricingCategory`
///     `Standard`; `ChargeClass` empty (never a correction);
///   - `ChargeDescription` `LLM inference via bedrock-mantle[: <model>]`;
///   - `ServiceName` `Amazon Bedrock`, `ServiceCategory` `AI and Machine Learning`,
///     `ProviderName`, `PublisherName`, `InvoiceIssuerName` `Amazon Web Services`;
///   - `ResourceId`, `ResourceName`, `ResourceType` (`Bedrock Project`): the project's ID and
///     name, only when grouped by project; `SkuId`: the model, only when grouped by model;
///   - `Tags`: a JSON object, the project's tags when grouped by project, else the tag dims'
///     values (absent tags left out);
///   - `ConsumedQuantity` and `PricingQuantity`: input + output tokens (cached input is part
///     of input, reasoning part of output), `ConsumedUnit` and `PricingUnit` `Tokens`: a row
///     mixes input, cached and output rates, so no single "1M Tokens" unit price exists and
///     the unit prices stay empty;
///   - `x_Requests`, `x_InputTokens`, `x_CachedInputTokens`, `x_OutputTokens`,
///     `x_ReasoningTokens`, `x_UnpricedRequests`, and `x_Key`, `x_Route`, `x_Api`,
///     `x_Outcome` for those dims when grouped by them.
///
///   Left empty: account, sub-account, region, availability zone, commitment discount, SKU
///   price and unit price columns, which mantlegate does not know.
#[must_use]
pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Table => render_table(report),
        Format::Csv => render_csv(report),
        Format::Json => render_json(report),
        Format::Focus => render_focus(report),
    }
}

/// The numbers of a row, in column order, with a known cost formatted by `cost` and an
/// unknown one shown as `unknown`.
fn metric_cells(row: &ReportRow, cost: fn(Decimal) -> String, unknown: &str) -> [String; 7] {
    [
        row.requests.to_string(),
        row.input_tokens.to_string(),
        row.cached_input_tokens.to_string(),
        row.output_tokens.to_string(),
        row.reasoning_tokens.to_string(),
        row.cost_usd.map_or_else(|| unknown.to_owned(), cost),
        row.unpriced_requests.to_string(),
    ]
}

/// Every digit, trailing zeros trimmed, but at least two decimals: `12.50`, `0.000123`.
fn table_cost(cost: Decimal) -> String {
    let s = cost.normalize().to_string();
    match s.split_once('.') {
        None => format!("{s}.00"),
        Some((_, frac)) if frac.len() < 2 => format!("{s}0"),
        Some(_) => s,
    }
}

fn plain_cost(cost: Decimal) -> String {
    cost.normalize().to_string()
}

/// The table's cost cell of a group whose cost is unknown (see [`ReportRow::cost_usd`]).
const UNKNOWN_COST: &str = "unknown";

const TABLE_METRICS: [&str; 7] = [
    "requests",
    "input",
    "cached",
    "output",
    "reasoning",
    "cost_usd",
    "unpriced",
];

fn render_table(report: &Report) -> String {
    let dims = report.dims.len().max(1);
    let mut header: Vec<String> = report.dims.iter().map(ToString::to_string).collect();
    header.resize(dims, String::new());
    header.extend(TABLE_METRICS.iter().map(|m| (*m).to_owned()));
    let mut lines: Vec<Vec<String>> = Vec::new();
    if !report.dims.is_empty() {
        for row in &report.rows {
            let mut cells: Vec<String> = row
                .keys
                .iter()
                .map(|k| {
                    if k.is_empty() {
                        "(none)".to_owned()
                    } else {
                        k.clone()
                    }
                })
                .collect();
            cells.extend(metric_cells(row, table_cost, UNKNOWN_COST));
            lines.push(cells);
        }
    }
    let mut total = vec![String::new(); dims];
    if let Some(first) = total.first_mut() {
        "TOTAL".clone_into(first);
    }
    total.extend(metric_cells(&report.total, table_cost, UNKNOWN_COST));

    let mut widths = vec![0; header.len()];
    for cells in std::iter::once(&header)
        .chain(&lines)
        .chain(std::iter::once(&total))
    {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let rule = "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));
    let mut out = format!("period: {}\n", describe_period(report.period));
    out.push_str(&table_line(&header, &widths, dims));
    out.push_str(&rule);
    out.push('\n');
    for cells in &lines {
        out.push_str(&table_line(cells, &widths, dims));
    }
    if !lines.is_empty() {
        out.push_str(&rule);
        out.push('\n');
    }
    out.push_str(&table_line(&total, &widths, dims));
    let unpriced = report.total.unpriced_requests;
    if unpriced > 0 {
        let (noun, they) = if unpriced == 1 {
            ("request", "it is")
        } else {
            ("requests", "they are")
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "note: {unpriced} {noun} had no price (no [[prices]] entry matches the model): {they} counted under `unpriced`, not in cost_usd, and a cost_usd of `{UNKNOWN_COST}` is a group with such calls and no priced cost. A [[prices]] entry for the model prices its calls from then on"
        );
    }
    out
}

/// `2026-11-01 to 2026-11-30 (UTC, both included)`.
fn describe_period(period: Period) -> String {
    match period.to.yesterday() {
        Ok(last) => format!("{} to {last} (UTC, both included)", period.from),
        Err(_) => format!("{} to {} (UTC, end excluded)", period.from, period.to),
    }
}

/// Text columns (the first `left` ones) aligned left, numbers right, no trailing blanks.
fn table_line(cells: &[String], widths: &[usize], left: usize) -> String {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
        if i < left {
            line.push_str(cell);
            line.push_str(&pad);
        } else {
            line.push_str(&pad);
            line.push_str(cell);
        }
    }
    let mut line = line.trim_end().to_owned();
    line.push('\n');
    line
}

/// One RFC 4180 field: quoted, with `"` doubled, when it holds a comma, quote, CR or LF.
fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

/// One CSV record, CRLF-terminated.
fn csv_record<S: AsRef<str>>(out: &mut String, fields: impl IntoIterator<Item = S>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&csv_field(field.as_ref()));
    }
    out.push_str("\r\n");
}

const CSV_METRICS: [&str; 7] = [
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
];

fn render_csv(report: &Report) -> String {
    let mut out = String::new();
    let header = report
        .dims
        .iter()
        .map(ToString::to_string)
        .chain(CSV_METRICS.iter().map(|m| (*m).to_owned()));
    csv_record(&mut out, header);
    for row in &report.rows {
        csv_record(
            &mut out,
            row.keys
                .iter()
                .cloned()
                .chain(metric_cells(row, plain_cost, "")),
        );
    }
    out
}

/// The JSON document; written by hand so that the dim columns keep their order.
struct JsonReport<'a>(&'a Report);

/// One row: its dim values (none for the total), then the numbers.
struct JsonRow<'a> {
    dims: &'a [Dim],
    row: &'a ReportRow,
}

/// All rows, as a JSON array.
struct JsonRows<'a>(&'a Report);

impl Serialize for JsonReport<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let report = self.0;
        let group_by: Vec<String> = report.dims.iter().map(ToString::to_string).collect();
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("from", &report.period.from.to_string())?;
        map.serialize_entry("to", &report.period.to.to_string())?;
        map.serialize_entry("group_by", &group_by)?;
        map.serialize_entry("rows", &JsonRows(report))?;
        map.serialize_entry(
            "total",
            &JsonRow {
                dims: &[],
                row: &report.total,
            },
        )?;
        map.end()
    }
}

impl Serialize for JsonRows<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.rows.len()))?;
        for row in &self.0.rows {
            seq.serialize_element(&JsonRow {
                dims: &self.0.dims,
                row,
            })?;
        }
        seq.end()
    }
}

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let row = self.row;
        let mut map = serializer.serialize_map(Some(self.dims.len() + 7))?;
        for (dim, value) in self.dims.iter().zip(&row.keys) {
            map.serialize_entry(&dim.to_string(), value)?;
        }
        map.serialize_entry("requests", &row.requests)?;
        map.serialize_entry("input_tokens", &row.input_tokens)?;
        map.serialize_entry("cached_input_tokens", &row.cached_input_tokens)?;
        map.serialize_entry("output_tokens", &row.output_tokens)?;
        map.serialize_entry("reasoning_tokens", &row.reasoning_tokens)?;
        map.serialize_entry("cost_usd", &row.cost_usd.map(plain_cost))?;
        map.serialize_entry("unpriced_requests", &row.unpriced_requests)?;
        map.end()
    }
}

fn render_json(report: &Report) -> String {
    // Strings, integers and string-keyed maps always serialize; the fallback is for form.
    serde_json::to_string(&JsonReport(report))
        .unwrap_or_else(|err| serde_json::json!({ "error": err.to_string() }).to_string())
}

/// The FOCUS 1.0 columns, in the specification's order.
const FOCUS_COLUMNS: [&str; 43] = [
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
];

/// mantlegate's own columns, after the FOCUS ones.
const FOCUS_X_METRICS: [&str; 6] = [
    "x_Requests",
    "x_InputTokens",
    "x_CachedInputTokens",
    "x_OutputTokens",
    "x_ReasoningTokens",
    "x_UnpricedRequests",
];

const AWS: &str = "Amazon Web Services";

/// The `x_` column of a dim that has no FOCUS column.
fn focus_x_dim(dim: &Dim) -> Option<&'static str> {
    match dim {
        Dim::Key => Some("x_Key"),
        Dim::Route => Some("x_Route"),
        Dim::Api => Some("x_Api"),
        Dim::Outcome => Some("x_Outcome"),
        _ => None,
    }
}

/// ISO 8601 UTC midnight of a day.
fn focus_time(day: Date) -> String {
    format!("{day}T00:00:00Z")
}

/// The row's value of `dim`, when the report is grouped by it.
fn key_of<'r>(report: &Report, row: &'r ReportRow, dim: &Dim) -> Option<&'r str> {
    let i = report.dims.iter().position(|d| d == dim)?;
    row.keys.get(i).map(String::as_str)
}

/// The row's day when grouped by day, else its month when grouped by month, clipped to the
/// period; else the period.
fn charge_period(report: &Report, row: &ReportRow) -> (Date, Date) {
    let Period { from, to } = report.period;
    let day = key_of(report, row, &Dim::Day)
        .and_then(|k| k.parse::<Date>().ok())
        .map(|d| (d, d.tomorrow()));
    let month = || {
        key_of(report, row, &Dim::Month)
            .and_then(|k| format!("{k}-01").parse::<Date>().ok())
            .map(|d| (d, d.last_of_month().tomorrow()))
    };
    match day.or_else(month) {
        Some((start, end)) => (start.max(from), end.map_or(to, |e| e.min(to))),
        None => (from, to),
    }
}

fn render_focus(report: &Report) -> String {
    let x_dims: Vec<(usize, &'static str)> = report
        .dims
        .iter()
        .enumerate()
        .filter_map(|(i, d)| focus_x_dim(d).map(|c| (i, c)))
        .collect();
    let mut out = String::new();
    let header = FOCUS_COLUMNS
        .iter()
        .chain(&FOCUS_X_METRICS)
        .copied()
        .chain(x_dims.iter().map(|(_, c)| *c));
    csv_record(&mut out, header);
    for row in &report.rows {
        let filled = focus_values(report, row);
        let mut fields: Vec<String> = FOCUS_COLUMNS
            .iter()
            .map(|c| filled.get(c).cloned().unwrap_or_default())
            .collect();
        fields.extend([
            row.requests.to_string(),
            row.input_tokens.to_string(),
            row.cached_input_tokens.to_string(),
            row.output_tokens.to_string(),
            row.reasoning_tokens.to_string(),
            row.unpriced_requests.to_string(),
        ]);
        fields.extend(
            x_dims
                .iter()
                .map(|(i, _)| row.keys.get(*i).cloned().unwrap_or_default()),
        );
        csv_record(&mut out, fields);
    }
    out
}

/// The FOCUS columns mantlegate fills for one row (see [`render`]).
fn focus_values(report: &Report, row: &ReportRow) -> HashMap<&'static str, String> {
    // An unknown cost leaves the cost columns empty (`x_UnpricedRequests` says why).
    let cost = row.cost_usd.map(plain_cost).unwrap_or_default();
    let tokens = (row.input_tokens + row.output_tokens).to_string();
    let (charge_start, charge_end) = charge_period(report, row);
    let model = key_of(report, row, &Dim::Model);
    let description = match model {
        Some(m) if !m.is_empty() => format!("LLM inference via bedrock-mantle: {m}"),
        _ => "LLM inference via bedrock-mantle".to_owned(),
    };
    let tags = serde_json::to_string(&row.tags).unwrap_or_else(|_| "{}".to_owned());
    let mut v: HashMap<&'static str, String> = HashMap::from([
        ("BilledCost", cost.clone()),
        ("EffectiveCost", cost.clone()),
        ("ListCost", cost.clone()),
        ("ContractedCost", cost),
        ("BillingCurrency", "USD".to_owned()),
        ("BillingPeriodStart", focus_time(report.period.from)),
        ("BillingPeriodEnd", focus_time(report.period.to)),
        ("ChargePeriodStart", focus_time(charge_start)),
        ("ChargePeriodEnd", focus_time(charge_end)),
        ("ChargeCategory", "Usage".to_owned()),
        ("ChargeFrequency", "Usage-Based".to_owned()),
        ("ChargeDescription", description),
        ("PricingCategory", "Standard".to_owned()),
        ("ServiceName", "Amazon Bedrock".to_owned()),
        ("ServiceCategory", "AI and Machine Learning".to_owned()),
        ("ProviderName", AWS.to_owned()),
        ("PublisherName", AWS.to_owned()),
        ("InvoiceIssuerName", AWS.to_owned()),
        ("ConsumedQuantity", tokens.clone()),
        ("ConsumedUnit", "Tokens".to_owned()),
        ("PricingQuantity", tokens),
        ("PricingUnit", "Tokens".to_owned()),
        ("Tags", tags),
    ]);
    if let Some(name) = key_of(report, row, &Dim::Project) {
        v.insert("ResourceId", row.project_id.clone());
        v.insert("ResourceName", name.to_owned());
        v.insert("ResourceType", "Bedrock Project".to_owned());
    }
    if let Some(m) = model {
        v.insert("SkuId", m.to_owned());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::read::load_daily;
    use rusqlite::{Connection, params};

    const CX: &str = r#"{"CostCenter":"CC-1001","Team":"CX"}"#;
    const SEARCH: &str = r#"{"CostCenter":"CC-2002","Team":"Search"}"#;
    const NO_TEAM: &str = r#"{"CostCenter":"CC-0000"}"#;
    const GPT: &str = "openai.gpt-oss-120b";
    const UNPRICED: &str = "mystery.model-v1";

    fn date(s: &str) -> Date {
        s.parse().expect("date")
    }

    fn november() -> Period {
        Period {
            from: date("2026-11-01"),
            to: date("2026-12-01"),
        }
    }

    fn dec(s: &str) -> Decimal {
        s.parse().expect("decimal")
    }

    /// `(day, key, project, model, requests, input tokens, output tokens, cost in pico-USD)`.
    type Spec<'a> = (&'a str, &'a str, &'a str, &'a str, i64, i64, i64, i64);

    /// A roll-up row. The project's ID and tags follow from its name; an unpriced model gets
    /// no cost and all its requests counted as unpriced.
    fn daily((day, key, project, model, requests, input, output, cost_pico): Spec) -> DailyRow {
        let (id, tags) = match project {
            "Chatbot" => ("proj_123", CX),
            "DocSearch" => ("proj_456", SEARCH),
            "Legacy" => ("proj_789", NO_TEAM),
            _ => ("proj_1", CX),
        };
        let unpriced = model == UNPRICED;
        DailyRow {
            day: day.to_owned(),
            key_name: key.to_owned(),
            route: String::new(),
            project_name: project.to_owned(),
            project_id: id.to_owned(),
            tags: tags.to_owned(),
            api: "chat.completions".to_owned(),
            model: model.to_owned(),
            outcome: "forwarded".to_owned(),
            requests,
            input_tokens: input,
            cached_input_tokens: input / 4,
            output_tokens: output,
            reasoning_tokens: output / 10,
            cost_pico: if unpriced { 0 } else { cost_pico },
            unpriced_requests: if unpriced { requests } else { 0 },
        }
    }

    /// Oct 31 and Dec 1 are just outside November; costs carry 12 decimals.
    #[rustfmt::skip]
    const FIXTURE: [Spec<'static>; 8] = [
        ("2026-10-31", "chat", "Chatbot", GPT, 5, 500, 50, 999_000_000_000_000),
        ("2026-11-01", "chat", "Chatbot", GPT, 10, 1000, 200, 1_234_567_890_123),
        ("2026-11-02", "chat", "Chatbot", GPT, 3, 300, 60, 987_654_321_987),
        ("2026-11-02", "search", "DocSearch", GPT, 7, 7000, 700, 3_000_000_000_001),
        ("2026-11-15", "search", "DocSearch", UNPRICED, 4, 400, 40, 0),
        ("2026-11-15", "legacy", "Legacy", GPT, 2, 20, 2, 1),
        ("2026-11-30", "legacy", "Legacy", GPT, 1, 10, 1, 123_456_789_012),
        ("2026-12-01", "chat", "Chatbot", GPT, 9, 900, 90, 777_000_000_000_000),
    ];

    fn fixture() -> Vec<DailyRow> {
        FIXTURE.into_iter().map(daily).collect()
    }

    fn db(rows: &[DailyRow]) -> Connection {
        let conn = Connection::open_in_memory().expect("sqlite");
        conn.execute_batch(
            "CREATE TABLE daily (
                day TEXT NOT NULL, key_name TEXT NOT NULL, route TEXT NOT NULL,
                project_name TEXT NOT NULL, project_id TEXT NOT NULL, tags TEXT NOT NULL,
                api TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL,
                requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
                cached_input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                reasoning_tokens INTEGER NOT NULL, cost_pico INTEGER NOT NULL,
                unpriced_requests INTEGER NOT NULL,
                PRIMARY KEY (day, key_name, route, project_name, project_id, tags, api, model, outcome)
            ) WITHOUT ROWID;",
        )
        .expect("schema");
        for r in rows {
            conn.execute(
                "INSERT INTO daily VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    r.day, r.key_name, r.route, r.project_name, r.project_id, r.tags, r.api,
                    r.model, r.outcome, r.requests, r.input_tokens, r.cached_input_tokens,
                    r.output_tokens, r.reasoning_tokens, r.cost_pico, r.unpriced_requests
                ],
            )
            .expect("insert");
        }
        conn
    }

    fn november_report(group_by: &str) -> Report {
        let conn = db(&fixture());
        let rows = load_daily(&conn, &november()).expect("load");
        aggregate(&rows, &parse_dims(group_by).expect("dims"), november())
    }

    fn row<'r>(report: &'r Report, keys: &[&str]) -> &'r ReportRow {
        report
            .rows
            .iter()
            .find(|r| r.keys == keys)
            .unwrap_or_else(|| panic!("no row {keys:?} in {:?}", report.rows))
    }

    /// RFC 4180 records, for checking what the renderers wrote.
    fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut records = Vec::new();
        let (mut record, mut field) = (Vec::new(), String::new());
        let mut chars = text.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (false, '"') => quoted = true,
                (false, ',') => record.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                (_, c) => field.push(c),
            }
        }
        assert!(record.is_empty() && field.is_empty(), "unterminated record");
        records
    }

    #[test]
    fn load_daily_keeps_from_and_drops_to() {
        let conn = db(&fixture());
        let rows = load_daily(&conn, &november()).expect("load");
        let mut days: Vec<&str> = rows.iter().map(|r| r.day.as_str()).collect();
        days.sort_unstable();
        days.dedup();
        assert_eq!(
            days,
            ["2026-11-01", "2026-11-02", "2026-11-15", "2026-11-30"]
        );
        let one_day = Period {
            from: date("2026-11-02"),
            to: date("2026-11-03"),
        };
        assert_eq!(load_daily(&conn, &one_day).expect("load").len(), 2);
    }

    #[test]
    fn groups_by_project_with_exact_sums_ids_and_tags() {
        let report = november_report("project");
        let keys: Vec<&str> = report.rows.iter().map(|r| r.keys[0].as_str()).collect();
        assert_eq!(
            keys,
            ["DocSearch", "Chatbot", "Legacy"],
            "by cost descending"
        );

        let chatbot = row(&report, &["Chatbot"]);
        assert_eq!(chatbot.requests, 13);
        assert_eq!(chatbot.input_tokens, 1300);
        assert_eq!(chatbot.output_tokens, 260);
        assert_eq!(chatbot.cost_pico, 2_222_222_212_110);
        assert_eq!(chatbot.cost_usd, Some(dec("2.22222221211")));
        assert_eq!(
            chatbot.cost_usd.expect("priced").to_string(),
            "2.22222221211",
            "normalized"
        );
        assert_eq!(chatbot.project_id, "proj_123");
        assert_eq!(chatbot.tags.get("Team").map(String::as_str), Some("CX"));
        assert_eq!(chatbot.first_day, Some(date("2026-11-01")));
        assert_eq!(chatbot.last_day, Some(date("2026-11-02")));

        let docsearch = row(&report, &["DocSearch"]);
        assert_eq!(docsearch.requests, 11);
        assert_eq!(docsearch.unpriced_requests, 4);
        assert_eq!(docsearch.cost_usd, Some(dec("3.000000000001")));

        let legacy = row(&report, &["Legacy"]);
        assert_eq!(legacy.cost_usd, Some(dec("0.123456789013")));
        assert_eq!(legacy.tags.get("Team"), None);

        assert_eq!(report.total.requests, 27);
        assert_eq!(report.total.unpriced_requests, 4);
        assert!(report.total.keys.is_empty());
    }

    #[test]
    fn total_equals_the_sum_of_the_rows_to_the_last_digit() {
        for group_by in ["project", "model", "day", "key,model", "tag:Team", ""] {
            let report = november_report(group_by);
            let sum = report
                .rows
                .iter()
                .try_fold(Decimal::ZERO, |acc, r| {
                    acc.checked_add(r.cost_usd.unwrap_or_default())
                })
                .expect("no overflow");
            assert_eq!(Some(sum), report.total.cost_usd, "group by {group_by:?}");
            assert_eq!(
                report.total.cost_usd.expect("priced").to_string(),
                "5.345679001124"
            );
            assert_eq!(report.total.cost_pico, 5_345_679_001_124);
        }
    }

    #[test]
    fn big_counts_sum_in_i128() {
        let a = daily(("2026-11-01", "k", "P", GPT, i64::MAX, i64::MAX, 0, i64::MAX));
        let b = a.clone();
        let report = aggregate(&[a, b], &[Dim::Project], november());
        assert_eq!(report.total.requests, 2 * i128::from(i64::MAX));
        assert_eq!(report.total.cost_pico, 2 * i128::from(i64::MAX));
        assert_eq!(report.total.cost_usd, Some(dec("18446744.073709551614")));
    }

    #[test]
    fn tag_dims_group_missing_tags_under_empty() {
        let report = november_report("tag:Team");
        let teams: Vec<&str> = report.rows.iter().map(|r| r.keys[0].as_str()).collect();
        assert_eq!(teams, ["Search", "CX", ""]);
        let none = row(&report, &[""]);
        assert_eq!(none.requests, 3);
        assert_eq!(none.cost_usd, Some(dec("0.123456789013")));
        assert!(none.tags.is_empty(), "absent tag left out of tags");
        assert_eq!(
            row(&report, &["CX"]).tags.get("Team").map(String::as_str),
            Some("CX")
        );
        assert_eq!(
            row(&report, &["CX"]).project_id,
            "",
            "not grouped by project"
        );
    }

    #[test]
    fn tag_dim_uses_the_tags_at_call_time() {
        let moved = r#"{"Team":"Platform"}"#;
        let rows = [
            daily(("2026-11-01", "k", "P", GPT, 1, 1, 1, 5)),
            DailyRow {
                tags: moved.to_owned(),
                ..daily(("2026-11-03", "k", "P", GPT, 1, 1, 1, 7))
            },
        ];
        let report = aggregate(&rows, &[Dim::Project, Dim::Tag("Team".into())], november());
        assert_eq!(row(&report, &["P", "CX"]).cost_pico, 5);
        assert_eq!(
            row(&report, &["P", "CX"])
                .tags
                .get("Team")
                .map(String::as_str),
            Some("CX")
        );
        assert_eq!(row(&report, &["P", "Platform"]).cost_pico, 7);
        let by_project = aggregate(&rows, &[Dim::Project], november());
        assert_eq!(
            by_project.rows[0].tags.get("Team").map(String::as_str),
            Some("Platform"),
            "latest day's tags"
        );
    }

    #[test]
    fn groups_by_day_and_month() {
        let by_day = november_report("day");
        let mut days: Vec<&str> = by_day.rows.iter().map(|r| r.keys[0].as_str()).collect();
        days.sort_unstable();
        assert_eq!(
            days,
            ["2026-11-01", "2026-11-02", "2026-11-15", "2026-11-30"]
        );
        assert_eq!(row(&by_day, &["2026-11-02"]).requests, 10);
        assert_eq!(
            row(&by_day, &["2026-11-02"]).cost_usd,
            Some(dec("3.987654321988"))
        );

        let by_month = november_report("month");
        assert_eq!(by_month.rows.len(), 1);
        assert_eq!(by_month.rows[0].keys, ["2026-11"]);
        assert_eq!(by_month.rows[0].cost_usd, by_month.total.cost_usd);

        // aggregate counts every row it is given: months across a wider load.
        let all = aggregate(&fixture(), &[Dim::Month], november());
        let months: Vec<&str> = all.rows.iter().map(|r| r.keys[0].as_str()).collect();
        assert_eq!(months, ["2026-10", "2026-12", "2026-11"]);
    }

    #[test]
    fn rows_with_equal_cost_sort_by_keys() {
        let rows = [
            daily(("2026-11-01", "b", "P", GPT, 1, 1, 1, 5)),
            daily(("2026-11-01", "a", "P", GPT, 1, 1, 1, 5)),
            daily(("2026-11-01", "c", "P", GPT, 1, 1, 1, 9)),
        ];
        let report = aggregate(&rows, &[Dim::Key], november());
        let keys: Vec<&str> = report.rows.iter().map(|r| r.keys[0].as_str()).collect();
        assert_eq!(keys, ["c", "a", "b"]);
    }

    #[test]
    fn csv_escapes_and_has_the_header() {
        let rows = [daily((
            "2026-11-01",
            "k",
            "Acme, \"Beta\" Lab",
            GPT,
            2,
            10,
            5,
            1_500_000_000_000,
        ))];
        let report = aggregate(
            &rows,
            &parse_dims("project,tag:Team").expect("dims"),
            november(),
        );
        let text = render(&report, Format::Csv);
        assert!(text.contains("\"Acme, \"\"Beta\"\" Lab\",CX,2,"), "{text}");
        assert!(text.ends_with("\r\n"));
        let records = parse_csv(&text);
        assert_eq!(
            records[0],
            [
                "project",
                "tag:Team",
                "requests",
                "input_tokens",
                "cached_input_tokens",
                "output_tokens",
                "reasoning_tokens",
                "cost_usd",
                "unpriced_requests"
            ]
        );
        assert_eq!(
            records[1],
            [
                "Acme, \"Beta\" Lab",
                "CX",
                "2",
                "10",
                "2",
                "5",
                "0",
                "1.5",
                "0"
            ]
        );
        assert_eq!(records.len(), 2, "no total row");
        assert_eq!(csv_field("a\nb"), "\"a\nb\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn json_parses_back_with_exact_cost_strings() {
        let report = november_report("project,tag:Team");
        let text = render(&report, Format::Json);
        let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(doc["from"], "2026-11-01");
        assert_eq!(doc["to"], "2026-12-01");
        assert_eq!(doc["group_by"], serde_json::json!(["project", "tag:Team"]));
        let rows = doc["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 3);
        let chatbot = rows
            .iter()
            .find(|r| r["project"] == "Chatbot")
            .expect("chatbot");
        assert_eq!(chatbot["tag:Team"], "CX");
        assert_eq!(chatbot["requests"], 13);
        assert_eq!(chatbot["cost_usd"], "2.22222221211");
        let legacy = rows
            .iter()
            .find(|r| r["project"] == "Legacy")
            .expect("legacy");
        assert_eq!(legacy["tag:Team"], "");
        assert_eq!(doc["total"]["cost_usd"], "5.345679001124");
        assert_eq!(doc["total"]["unpriced_requests"], 4);
        assert!(doc["total"].get("project").is_none());
        let sum = rows
            .iter()
            .map(|r| dec(r["cost_usd"].as_str().unwrap_or("0")))
            .sum::<Decimal>();
        assert_eq!(sum, dec(doc["total"]["cost_usd"].as_str().expect("string")));
        // Dim columns come first, in order.
        assert!(
            text.contains(r#"{"project":"DocSearch","tag:Team":"Search","requests":11,"#),
            "{text}"
        );
    }

    #[test]
    fn focus_has_the_columns_and_costs() {
        let report = november_report("project,model,day");
        let text = render(&report, Format::Focus);
        let records = parse_csv(&text);
        let header = &records[0];
        for column in FOCUS_COLUMNS {
            assert!(header.iter().any(|h| h == column), "missing {column}");
        }
        for column in ["x_Requests", "x_UnpricedRequests", "x_CachedInputTokens"] {
            assert!(header.iter().any(|h| h == column), "missing {column}");
        }
        assert_eq!(records.len(), report.rows.len() + 1);
        let col = |name: &str| header.iter().position(|h| h == name).expect(name);
        let line = records
            .iter()
            .find(|r| {
                r[col("ResourceName")] == "Chatbot"
                    && r[col("ChargePeriodStart")].starts_with("2026-11-02")
            })
            .expect("Chatbot on Nov 2");
        let expected = row(&report, &["Chatbot", GPT, "2026-11-02"]);
        assert_eq!(Some(dec(&line[col("BilledCost")])), expected.cost_usd);
        assert_eq!(line[col("BilledCost")], "0.987654321987");
        assert_eq!(line[col("EffectiveCost")], line[col("BilledCost")]);
        assert_eq!(line[col("ListCost")], line[col("BilledCost")]);
        assert_eq!(line[col("ContractedCost")], line[col("BilledCost")]);
        assert_eq!(line[col("BillingCurrency")], "USD");
        assert_eq!(line[col("BillingPeriodStart")], "2026-11-01T00:00:00Z");
        assert_eq!(line[col("BillingPeriodEnd")], "2026-12-01T00:00:00Z");
        assert_eq!(line[col("ChargePeriodStart")], "2026-11-02T00:00:00Z");
        assert_eq!(line[col("ChargePeriodEnd")], "2026-11-03T00:00:00Z");
        assert_eq!(line[col("ChargeCategory")], "Usage");
        assert_eq!(line[col("ChargeClass")], "");
        assert_eq!(
            line[col("ChargeDescription")],
            format!("LLM inference via bedrock-mantle: {GPT}")
        );
        assert_eq!(line[col("ServiceName")], "Amazon Bedrock");
        assert_eq!(line[col("ServiceCategory")], "AI and Machine Learning");
        assert_eq!(line[col("ProviderName")], "Amazon Web Services");
        assert_eq!(line[col("ResourceId")], "proj_123");
        assert_eq!(line[col("ResourceType")], "Bedrock Project");
        assert_eq!(line[col("SkuId")], GPT);
        assert_eq!(line[col("ConsumedQuantity")], "360");
        assert_eq!(line[col("ConsumedUnit")], "Tokens");
        assert_eq!(line[col("PricingQuantity")], "360");
        assert_eq!(line[col("x_Requests")], "3");
        let tags: BTreeMap<String, String> =
            serde_json::from_str(&line[col("Tags")]).expect("tags JSON");
        assert_eq!(tags.get("CostCenter").map(String::as_str), Some("CC-1001"));
        let sum: Decimal = records[1..]
            .iter()
            .filter(|r| !r[col("BilledCost")].is_empty())
            .map(|r| dec(&r[col("BilledCost")]))
            .sum();
        assert_eq!(Some(sum), report.total.cost_usd);
        // The unpriced model's rows have no cost, never a $0 one.
        let unpriced = records
            .iter()
            .find(|r| r[col("SkuId")] == UNPRICED)
            .expect("the unpriced model's row");
        for column in ["BilledCost", "EffectiveCost", "ListCost", "ContractedCost"] {
            assert_eq!(unpriced[col(column)], "", "{column}");
        }
        assert_eq!(unpriced[col("x_UnpricedRequests")], "4");
    }

    #[test]
    fn focus_without_project_uses_the_period_and_tag_dims() {
        let report = november_report("tag:Team,key,month");
        let records = parse_csv(&render(&report, Format::Focus));
        let header = &records[0];
        let col = |name: &str| header.iter().position(|h| h == name).expect(name);
        assert_eq!(header.last().map(String::as_str), Some("x_Key"));
        let line = records
            .iter()
            .find(|r| r[col("x_Key")] == "search")
            .expect("search");
        assert_eq!(line[col("ResourceId")], "");
        assert_eq!(line[col("ResourceType")], "");
        assert_eq!(line[col("SkuId")], "");
        assert_eq!(line[col("Tags")], r#"{"Team":"Search"}"#);
        assert_eq!(line[col("ChargePeriodStart")], "2026-11-01T00:00:00Z");
        assert_eq!(line[col("ChargePeriodEnd")], "2026-12-01T00:00:00Z");
        let legacy = records
            .iter()
            .find(|r| r[col("x_Key")] == "legacy")
            .expect("legacy");
        assert_eq!(legacy[col("Tags")], "{}");

        // Grouped by month and day, a row is charged for its day.
        let both = november_report("month,day");
        let records = parse_csv(&render(&both, Format::Focus));
        let col = |name: &str| records[0].iter().position(|h| h == name).expect(name);
        assert!(records[1..].iter().all(|r| {
            let start: Date = r[col("ChargePeriodStart")][..10].parse().expect("start");
            let end: Date = r[col("ChargePeriodEnd")][..10].parse().expect("end");
            end == start.tomorrow().expect("tomorrow")
        }));

        // A month is clipped to a shorter period.
        let mid = Period {
            from: date("2026-11-10"),
            to: date("2026-11-20"),
        };
        let rows = [daily(("2026-11-15", "k", "P", GPT, 1, 1, 1, 5))];
        let records = parse_csv(&render(
            &aggregate(&rows, &[Dim::Month], mid),
            Format::Focus,
        ));
        let col = |name: &str| records[0].iter().position(|h| h == name).expect(name);
        assert_eq!(records[1][col("ChargePeriodStart")], "2026-11-10T00:00:00Z");
        assert_eq!(records[1][col("ChargePeriodEnd")], "2026-11-20T00:00:00Z");
    }

    #[test]
    fn table_aligns_totals_and_notes_unpriced() {
        let report = november_report("project");
        let text = render(&report, Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "period: 2026-11-01 to 2026-11-30 (UTC, both included)"
        );
        assert!(lines[1].starts_with("project  "), "{text}");
        assert!(lines[1].ends_with("cost_usd  unpriced"), "{text}");
        let total = lines
            .iter()
            .find(|l| l.starts_with("TOTAL"))
            .expect("TOTAL line");
        assert!(total.contains("5.345679001124"), "{total}");
        // Numbers are right-aligned: every data line is as wide as the header.
        for line in &lines[1..lines.len() - 1] {
            if !line.starts_with('-') {
                assert_eq!(line.len(), lines[1].len(), "{text}");
            }
        }
        assert_eq!(
            lines.last().copied(),
            Some(
                "note: 4 requests had no price (no [[prices]] entry matches the model): they are counted under `unpriced`, not in cost_usd, and a cost_usd of `unknown` is a group with such calls and no priced cost. A [[prices]] entry for the model prices its calls from then on"
            )
        );
        let priced = aggregate(
            &[daily((
                "2026-11-01",
                "k",
                "P",
                GPT,
                1,
                1,
                1,
                12_500_000_000_000,
            ))],
            &[],
            november(),
        );
        let text = render(&priced, Format::Table);
        assert_eq!(
            text.lines().count(),
            4,
            "period, header, rule, TOTAL: {text}"
        );
        assert!(text.contains(" 12.50 "), "{text}");
        assert!(!text.contains("note:"), "{text}");
    }

    #[test]
    fn a_group_of_unpriced_calls_has_an_unknown_cost_in_every_format() {
        let report = november_report("model");
        let unpriced = row(&report, &[UNPRICED]);
        assert_eq!((unpriced.requests, unpriced.unpriced_requests), (4, 4));
        assert_eq!(unpriced.cost_usd, None, "unknown, not $0");
        // A group with priced and unpriced calls: the priced cost, the unpriced calls apart.
        let by_project = november_report("project");
        let docsearch = row(&by_project, &["DocSearch"]);
        assert_eq!(docsearch.cost_usd, Some(dec("3.000000000001")));
        assert_eq!(docsearch.unpriced_requests, 4);

        let csv = parse_csv(&render(&report, Format::Csv));
        let col = |name: &str| csv[0].iter().position(|h| h == name).expect(name);
        let line = csv.iter().find(|r| r[0] == UNPRICED).expect("csv row");
        assert_eq!(line[col("cost_usd")], "");
        assert_eq!(line[col("unpriced_requests")], "4");

        let json: serde_json::Value =
            serde_json::from_str(&render(&report, Format::Json)).expect("json");
        let entry = json["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["model"] == UNPRICED)
            .expect("json row");
        assert!(entry["cost_usd"].is_null(), "{entry}");
        assert_eq!(entry["unpriced_requests"], 4);

        let table = render(&report, Format::Table);
        let line = table
            .lines()
            .find(|l| l.starts_with(UNPRICED))
            .expect("table row");
        assert!(line.contains(" unknown "), "{table}");

        // Only unpriced calls in the whole report: the total is unknown too.
        let only = aggregate(
            &[daily(("2026-11-15", "k", "P", UNPRICED, 2, 10, 10, 0))],
            &[Dim::Project],
            november(),
        );
        assert_eq!(only.total.cost_usd, None);
        let json: serde_json::Value =
            serde_json::from_str(&render(&only, Format::Json)).expect("json");
        assert!(json["total"]["cost_usd"].is_null(), "{json}");
        // No calls at all cost a known nothing.
        let empty = aggregate(&[], &[Dim::Project], november());
        assert_eq!(empty.total.cost_usd, Some(Decimal::ZERO));
    }

    #[test]
    fn table_costs_keep_every_digit_and_two_decimals() {
        assert_eq!(table_cost(dec("12.5")), "12.50");
        assert_eq!(table_cost(dec("0.000123")), "0.000123");
        assert_eq!(table_cost(dec("0")), "0.00");
        assert_eq!(table_cost(dec("3.000")), "3.00");
        assert_eq!(table_cost(dec("1.234567890123")), "1.234567890123");
    }

    #[test]
    fn parse_dims_accepts_names_and_tags() {
        assert_eq!(
            parse_dims("project, tag:Team ,Day").expect("dims"),
            [Dim::Project, Dim::Tag("Team".into()), Dim::Day]
        );
        assert_eq!(parse_dims("").expect("none"), []);
        assert_eq!(
            parse_dims("model,key,route,api,month,outcome")
                .expect("dims")
                .len(),
            6
        );
        assert_eq!(
            Dim::Tag("Cost Center".into()).to_string(),
            "tag:Cost Center"
        );
    }

    #[test]
    fn parse_dims_errors_list_the_valid_names() {
        let err = parse_dims("project,team").expect_err("unknown");
        assert!(err.contains("\"team\""), "{err}");
        assert!(
            err.contains("project, model, key, route, api, day, month, outcome, tag:<TagKey>"),
            "{err}"
        );
        assert!(
            parse_dims("project,,day")
                .expect_err("empty")
                .contains("valid ones")
        );
        assert!(
            parse_dims("tag:")
                .expect_err("no key")
                .contains("tag:<TagKey>")
        );
        assert!(parse_dims("day,day").expect_err("twice").contains("twice"));
    }

    #[test]
    fn formats_parse() {
        assert_eq!("JSON".parse::<Format>(), Ok(Format::Json));
        assert_eq!("focus".parse::<Format>(), Ok(Format::Focus));
        let err = "xml".parse::<Format>().expect_err("unknown");
        assert!(err.contains("table, csv, json or focus"), "{err}");
        assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
    }

    #[test]
    fn period_defaults_to_month_to_date() {
        let today = date("2026-11-20");
        assert_eq!(
            period(None, None, today),
            Ok(Period {
                from: date("2026-11-01"),
                to: date("2026-11-21")
            })
        );
        assert_eq!(
            period(Some("2026-10-01"), Some("2026-11-01"), today),
            Ok(Period {
                from: date("2026-10-01"),
                to: date("2026-11-01")
            })
        );
        let end_of_year = period(None, None, date("2026-12-31")).expect("period");
        assert_eq!(end_of_year.to, date("2027-01-01"));
    }

    #[test]
    fn period_errors_say_the_format() {
        let today = date("2026-11-20");
        for bad in [
            "2026/11/01",
            "2026-11-31",
            "2026-1-01",
            "2026-11-01T00:00",
            "yesterday",
            "",
        ] {
            let err = period(Some(bad), None, today).expect_err(bad);
            assert!(err.contains("YYYY-MM-DD"), "{bad}: {err}");
        }
        let err = period(None, Some("nope"), today).expect_err("bad to");
        assert!(err.starts_with("invalid to date"), "{err}");
        let err = period(Some("2026-11-05"), Some("2026-11-05"), today).expect_err("empty");
        assert!(err.contains("not before"), "{err}");
        assert!(period(Some("2026-11-06"), Some("2026-11-05"), today).is_err());
        assert!(
            period(None, Some("2026-10-15"), today).is_err(),
            "default from after to"
        );
    }
}
