//! Model prices (built in, include files, config) and exact decimal cost of a call's usage.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::meter::Usage;

/// The shipped price list, `config/prices.toml`, compiled in.
pub const BUILTIN_PRICES: &str = include_str!("../config/prices.toml");

/// `source` of prices that come from the built-in list.
pub const SOURCE_BUILTIN: &str = "builtin";
/// `source` of prices that come from the main config's own `[[prices]]`.
pub const SOURCE_CONFIG: &str = "config";

/// Most decimal places a price may have. Six or fewer keep every cost exact in pico-dollars.
pub const MAX_PRICE_DECIMALS: u32 = 12;

/// Largest accepted price, in USD per million tokens (one dollar a token). Anything above is a
/// typo, and the bound keeps `tokens × price` far inside `Decimal`'s range for any `u64` count.
const MAX_PRICE: i64 = 1_000_000;

/// Largest accepted `max_output_tokens` of a price row: a hundred times today's largest
/// output ceilings. Anything above is a typo.
const MAX_OUTPUT_CEILING: u64 = 100_000_000;

/// One `[[prices]]` entry as written in TOML. Prices are USD per million tokens, written as
/// decimal strings (`"0.15"`); a TOML float or integer is rejected (binary floats are not money).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    /// Exact model id, or a prefix ending in a single `*` (`"*"` alone matches every model).
    pub model: String,
    /// USD per million uncached input tokens.
    #[serde(deserialize_with = "price_string")]
    pub input_per_million: String,
    /// USD per million input tokens read from the prompt cache; defaults to `input_per_million`.
    #[serde(default, deserialize_with = "opt_price_string")]
    pub cached_input_per_million: Option<String>,
    /// USD per million output tokens, reasoning tokens included.
    #[serde(deserialize_with = "price_string")]
    pub output_per_million: String,
    /// The model's output ceiling in tokens: what a call that sets no output cap may
    /// generate, and so what admission reserves for it. Unset: `[limits]
    /// default_max_output_tokens`.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

/// `[pricing]` section of the config: which price files are layered under the config's own
/// `[[prices]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Start from the shipped `config/prices.toml` (compiled in). Default `true`.
    pub builtin: bool,
    /// More price files (TOML with only `[[prices]]`), applied in order after the built-in list.
    /// Relative paths are relative to the config file's directory.
    pub include: Vec<String>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            builtin: true,
            include: Vec::new(),
        }
    }
}

/// A validated price, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Per million uncached input tokens.
    pub input_per_million: Decimal,
    /// Per million cached input tokens.
    pub cached_input_per_million: Decimal,
    /// Per million output tokens (reasoning included).
    pub output_per_million: Decimal,
    /// The model's output ceiling, when the price row states it.
    pub max_output_tokens: Option<u64>,
    /// Where the price came from: `"builtin"`, `"config"`, or an include file's path.
    pub source: String,
}

/// Prices by model pattern, after layering. Cheap to look up; build it once per config load.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    /// Looked up on every call: foldhash, not the standard `SipHash`.
    exact: HashMap<String, Price, foldhash::fast::RandomState>,
    /// Trailing-`*` patterns without the `*`, longest prefix first.
    globs: Vec<(String, Price)>,
}

/// One problem: the path of the offending value and what is wrong with it.
type Problem = (String, String);

/// The top level of the built-in list and of include files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    prices: Vec<PriceEntry>,
}

impl PriceTable {
    /// Builds the table from its layers, lowest priority first: the built-in list (if
    /// `pricing.builtin`), each `pricing.include` file in order, then `own` (the config's
    /// `[[prices]]`). A later layer's entry replaces an earlier entry with the same `model`
    /// pattern; the same pattern twice within one layer is an error.
    ///
    /// `config_dir` anchors relative include paths (the working directory when `None`).
    ///
    /// # Errors
    /// Every problem found in every layer, each as `(path, message)`: paths look like
    /// `prices[2].output_per_million` for the config's own entries, `pricing.include[0]` for an
    /// include file that cannot be read or parsed, `<file>: prices[1].model` for entries of an
    /// include file and `builtin: prices[0].model` for the built-in list.
    pub fn build(
        pricing: &PricingConfig,
        config_dir: Option<&Path>,
        own: &[PriceEntry],
    ) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut merged: BTreeMap<String, Price> = BTreeMap::new();

        if pricing.builtin {
            match parse_price_file(BUILTIN_PRICES) {
                Ok(entries) => {
                    add_layer(
                        &mut merged,
                        &mut problems,
                        &entries,
                        SOURCE_BUILTIN,
                        "builtin: ",
                    );
                }
                Err(e) => problems.push(("pricing.builtin".to_owned(), format!("{e}"))),
            }
        }

        for (i, include) in pricing.include.iter().enumerate() {
            let key = format!("pricing.include[{i}]");
            if include.trim().is_empty() {
                problems.push((key, "must name a price file".to_owned()));
                continue;
            }
            let path = resolve(config_dir, include);
            let shown = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    problems.push((key, format!("cannot read {shown}: {e}")));
                    continue;
                }
            };
            match parse_price_file(&text) {
                Ok(entries) => {
                    let prefix = format!("{shown}: ");
                    add_layer(&mut merged, &mut problems, &entries, &shown, &prefix);
                }
                Err(e) => problems.push((key, format!("cannot parse {shown}: {e}"))),
            }
        }

        add_layer(&mut merged, &mut problems, own, SOURCE_CONFIG, "");

        if !problems.is_empty() {
            return Err(problems);
        }
        let mut table = Self::default();
        for (pattern, price) in merged {
            match pattern.strip_suffix('*') {
                Some(prefix) => table.globs.push((prefix.to_owned(), price)),
                None => {
                    table.exact.insert(pattern, price);
                }
            }
        }
        table
            .globs
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(table)
    }

    /// The price of `model`: an exact pattern wins over globs; among globs the longest prefix
    /// wins. `None` when nothing matches (the call is unpriced).
    #[must_use]
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.exact.get(model).or_else(|| {
            self.globs
                .iter()
                .find(|(prefix, _)| model.starts_with(prefix.as_str()))
                .map(|(_, price)| price)
        })
    }

    /// Every pattern (globs with their `*`) and its price, sorted by pattern.
    #[must_use]
    pub fn entries(&self) -> Vec<(String, &Price)> {
        let mut all: Vec<(String, &Price)> = self
            .exact
            .iter()
            .map(|(m, p)| (m.clone(), p))
            .chain(self.globs.iter().map(|(g, p)| (format!("{g}*"), p)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Number of model patterns in the table.
    #[must_use]
    pub fn len(&self) -> usize {
        self.exact.len() + self.globs.len()
    }

    /// Whether the table prices no model at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Exact cost in USD of `usage` at `price`:
/// `((input - cached) × input_price + cached × cached_price + output × output_price) / 1e6`.
/// Reasoning tokens are part of `output` and are not added again. A `cached_input` larger than
/// `input` is treated as `input` (all input cached), never as a negative count.
///
/// Exact for any validated price (at most 12 decimal places, at most 1,000,000) and any `u64`
/// counts. A hand-built `Price` large enough to overflow `Decimal` saturates to `Decimal::MAX`,
/// which [`to_pico`] then refuses.
#[must_use]
pub fn cost(price: &Price, usage: &Usage) -> Decimal {
    let cached = usage.cached_input.min(usage.input);
    let uncached = usage.input - cached;
    let lanes = [
        (uncached, price.input_per_million),
        (cached, price.cached_input_per_million),
        (usage.output, price.output_per_million),
    ];
    lanes
        .iter()
        .try_fold(Decimal::ZERO, |sum, &(tokens, per_million)| {
            Decimal::from(tokens)
                .checked_mul(per_million)
                .and_then(|lane| sum.checked_add(lane))
        })
        .and_then(|per_million| per_million.checked_div(Decimal::from(1_000_000_u32)))
        .map_or(Decimal::MAX, |c| c.normalize())
}

/// Decimal places of a picodollar amount.
const PICO_SCALE: u32 = 12;

/// `cost` in picodollars (1e-12 USD), the ledger's storage unit. Exact when every price has
/// at most 6 decimal places (then a cost has at most 12); otherwise rounded half-to-even.
/// `None` when the amount does not fit in an `i64` (about 9.2 million USD).
#[must_use]
pub fn to_pico(cost: Decimal) -> Option<i64> {
    let rounded = cost.round_dp_with_strategy(PICO_SCALE, RoundingStrategy::MidpointNearestEven);
    // After rounding the scale is at most 12, so scaling the mantissa up is exact.
    let factor = 10_i128.checked_pow(PICO_SCALE - rounded.scale())?;
    let pico = rounded.mantissa().checked_mul(factor)?;
    i64::try_from(pico).ok()
}

/// A picodollar amount back in USD. Exact: every `i64` is representable.
#[must_use]
pub fn from_pico(pico: i64) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(pico), PICO_SCALE).normalize()
}

fn resolve(config_dir: Option<&Path>, include: &str) -> PathBuf {
    let path = Path::new(include);
    match config_dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn parse_price_file(text: &str) -> Result<Vec<PriceEntry>, toml::de::Error> {
    toml::from_str::<PriceFile>(text).map(|f| f.prices)
}

/// Validates one layer and merges it over `merged`. Problems are prefixed with `prefix`.
fn add_layer(
    merged: &mut BTreeMap<String, Price>,
    problems: &mut Vec<Problem>,
    entries: &[PriceEntry],
    source: &str,
    prefix: &str,
) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut layer = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("{prefix}prices[{i}]");
        let before = problems.len();
        check_pattern(problems, &format!("{path}.model"), &entry.model);
        if let Some(first) = seen.insert(entry.model.as_str(), i) {
            problems.push((
                format!("{path}.model"),
                format!(
                    "`{}` is already priced by prices[{first}] in the same file",
                    entry.model
                ),
            ));
        }
        let input = parse_price(
            problems,
            &path,
            "input_per_million",
            &entry.input_per_million,
        );
        let cached = match &entry.cached_input_per_million {
            Some(text) => parse_price(problems, &path, "cached_input_per_million", text),
            None => input,
        };
        let output = parse_price(
            problems,
            &path,
            "output_per_million",
            &entry.output_per_million,
        );
        if let Some(n) = entry.max_output_tokens
            && !(1..=MAX_OUTPUT_CEILING).contains(&n)
        {
            problems.push((
                format!("{path}.max_output_tokens"),
                format!("`{n}` must be between 1 and {MAX_OUTPUT_CEILING} tokens"),
            ));
        }
        if let (Some(input), Some(cached), Some(output)) = (input, cached, output)
            && problems.len() == before
        {
            layer.push((
                entry.model.clone(),
                Price {
                    input_per_million: input,
                    cached_input_per_million: cached,
                    output_per_million: output,
                    max_output_tokens: entry.max_output_tokens,
                    source: source.to_owned(),
                },
            ));
        }
    }
    merged.extend(layer);
}

fn check_pattern(problems: &mut Vec<Problem>, path: &str, pattern: &str) {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if pattern.is_empty() || body.contains('*') {
        problems.push((
            path.to_owned(),
            format!("`{pattern}` must be a model id, optionally ending in a single `*`"),
        ));
    } else if pattern.chars().any(char::is_whitespace) {
        problems.push((
            path.to_owned(),
            format!("`{pattern}` must not contain whitespace"),
        ));
    }
}

/// Parses a price string strictly: plain digits with an optional fraction (`"0.15"`, `"3"`),
/// no sign, exponent, underscores or spaces, at most [`MAX_PRICE_DECIMALS`] significant
/// decimal places, at most [`MAX_PRICE`].
fn parse_price(
    problems: &mut Vec<Problem>,
    entry_path: &str,
    field: &str,
    text: &str,
) -> Option<Decimal> {
    let path = format!("{entry_path}.{field}");
    match parse_decimal(text) {
        Ok(value) => Some(value),
        Err(why) => {
            problems.push((path, format!("`{text}` {why}")));
            None
        }
    }
}

fn parse_decimal(text: &str) -> Result<Decimal, PriceError> {
    if text.starts_with('-') {
        return Err(PriceError::Negative);
    }
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (text.contains('.') && !digits(frac)) {
        return Err(PriceError::NotDecimal);
    }
    let value = Decimal::from_str_exact(text).map_err(|_| PriceError::TooLong)?;
    if value.normalize().scale() > MAX_PRICE_DECIMALS {
        return Err(PriceError::TooPrecise);
    }
    if value > Decimal::from(MAX_PRICE) {
        return Err(PriceError::TooLarge);
    }
    Ok(value.normalize())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PriceError {
    Negative,
    NotDecimal,
    TooLong,
    TooPrecise,
    TooLarge,
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Negative => f.write_str("must not be negative"),
            Self::NotDecimal => f.write_str(
                "is not a decimal number: write USD per million tokens as digits with an \
                 optional fraction, e.g. \"0.15\"",
            ),
            Self::TooLong => f.write_str("has too many digits for an exact decimal"),
            Self::TooPrecise => write!(f, "has more than {MAX_PRICE_DECIMALS} decimal places"),
            Self::TooLarge => write!(
                f,
                "is more than {MAX_PRICE} USD per million tokens, surely a mistake"
            ),
        }
    }
}

/// Accepts a TOML string only; floats and integers get a message saying to quote them.
fn price_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_any(PriceStringVisitor)
}

fn opt_price_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    price_string(deserializer).map(Some)
}

struct PriceStringVisitor;

impl Visitor<'_> for PriceStringVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a price as a decimal string, e.g. \"0.15\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Err(E::custom(format!(
            "price {v} is a TOML float: write it as a decimal string, e.g. \"{v}\" \
             (binary floats are not money)"
        )))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Err(E::custom(format!(
            "price {v} is a TOML integer: write it as a decimal string, e.g. \"{v}\""
        )))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Err(E::custom(format!(
            "price {v} is a TOML integer: write it as a decimal string, e.g. \"{v}\""
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn entry(model: &str, input: &str, cached: Option<&str>, output: &str) -> PriceEntry {
        PriceEntry {
            model: model.to_owned(),
            input_per_million: input.to_owned(),
            cached_input_per_million: cached.map(str::to_owned),
            output_per_million: output.to_owned(),
            max_output_tokens: None,
        }
    }

    fn price(input: &str, cached: &str, output: &str) -> Price {
        Price {
            input_per_million: d(input),
            cached_input_per_million: d(cached),
            output_per_million: d(output),
            max_output_tokens: None,
            source: SOURCE_CONFIG.to_owned(),
        }
    }

    fn own_only(own: &[PriceEntry]) -> Result<PriceTable, Vec<(String, String)>> {
        let pricing = PricingConfig {
            builtin: false,
            include: Vec::new(),
        };
        PriceTable::build(&pricing, None, own)
    }

    fn usage(input: u64, cached_input: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input,
            cached_input,
            output,
            reasoning,
        }
    }

    /// A tiny deterministic generator, so the sum test needs no seed plumbing.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn cost_is_exact_by_hand() {
        // uncached 1,000,000 × 0.15 = 150,000; cached 234,567 × 0.075 = 17,592.525;
        // output 89,012 × 0.60 = 53,407.2; sum 220,999.725 per million = 0.220999725 USD.
        let p = price("0.15", "0.075", "0.60");
        let c = cost(&p, &usage(1_234_567, 234_567, 89_012, 5_000));
        assert_eq!(c, d("0.220999725"));
        assert_eq!(c.to_string(), "0.220999725");
        assert_eq!(to_pico(c), Some(220_999_725_000));
    }

    #[test]
    fn reasoning_is_not_billed_twice() {
        let p = price("1", "1", "2");
        let with = cost(&p, &usage(0, 0, 1_000_000, 999_999));
        let without = cost(&p, &usage(0, 0, 1_000_000, 0));
        assert_eq!(with, d("2"));
        assert_eq!(with, without);
    }

    #[test]
    fn zero_usage_costs_nothing() {
        let p = price("0.15", "0.075", "0.60");
        assert_eq!(cost(&p, &Usage::default()), Decimal::ZERO);
    }

    #[test]
    fn sum_of_costs_equals_cost_of_sum() {
        let p = price("0.15", "0.075", "0.60");
        let mut rng = Lcg(42);
        let mut total = Usage::default();
        let mut sum = Decimal::ZERO;
        let mut pico_sum = 0_i64;
        for _ in 0..1_000 {
            let input = rng.below(200_000);
            let cached = rng.below(input + 1);
            let output = rng.below(50_000);
            let u = usage(input, cached, output, rng.below(output + 1));
            let c = cost(&p, &u);
            sum += c;
            pico_sum += to_pico(c).unwrap();
            total.input += u.input;
            total.cached_input += u.cached_input;
            total.output += u.output;
            total.reasoning += u.reasoning;
        }
        let whole = cost(&p, &total);
        assert_eq!(sum, whole);
        // Prices with at most 6 decimals: the ledger's integer sum is exact too.
        assert_eq!(Some(pico_sum), to_pico(whole));
        assert_eq!(from_pico(pico_sum), whole);
    }

    #[test]
    fn cached_above_input_is_capped() {
        let p = price("0.15", "0.075", "0.60");
        let c = cost(&p, &usage(1_000, 5_000, 0, 0));
        assert_eq!(c, cost(&p, &usage(1_000, 1_000, 0, 0)));
        assert_eq!(c, d("0.000075"));
    }

    #[test]
    fn a_price_row_may_state_the_models_output_ceiling() {
        let mut row = entry("m", "1", None, "2");
        row.max_output_tokens = Some(32_768);
        let table = own_only(&[row.clone(), entry("n", "1", None, "2")]).expect("valid");
        assert_eq!(
            table.lookup("m").and_then(|p| p.max_output_tokens),
            Some(32_768)
        );
        assert_eq!(table.lookup("n").and_then(|p| p.max_output_tokens), None);
        for bad in [0, MAX_OUTPUT_CEILING + 1] {
            row.max_output_tokens = Some(bad);
            let problems = own_only(std::slice::from_ref(&row)).expect_err("out of range");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].0, "prices[0].max_output_tokens");
        }
        let parsed: PriceEntry = toml::from_str(
            "model = \"m\"\ninput_per_million = \"1\"\noutput_per_million = \"2\"\nmax_output_tokens = 4096\n",
        )
        .expect("toml");
        assert_eq!(parsed.max_output_tokens, Some(4096));
    }

    #[test]
    fn huge_counts_do_not_panic() {
        let p = price("1000000", "1000000", "1000000");
        let max = usage(u64::MAX, 0, u64::MAX, 0);
        let c = cost(&p, &max);
        assert_eq!(c, Decimal::from(u64::MAX) * Decimal::TWO);
        assert_eq!(to_pico(c), None);

        let absurd = Price {
            input_per_million: Decimal::MAX,
            ..p
        };
        assert_eq!(cost(&absurd, &max), Decimal::MAX);
        assert_eq!(to_pico(Decimal::MAX), None);
    }

    #[test]
    fn pico_round_trips() {
        for pico in [0, 1, -1, 220_999_725_000, i64::MAX, i64::MIN] {
            assert_eq!(to_pico(from_pico(pico)), Some(pico), "{pico}");
        }
        assert_eq!(from_pico(1), d("0.000000000001"));
        assert_eq!(from_pico(1_500_000_000_000), d("1.5"));
        for usd in [
            "0",
            "0.220999725",
            "12345.678901234567",
            "9223372.036854775807",
        ] {
            let v = d(usd);
            assert_eq!(from_pico(to_pico(v).unwrap()), v, "{usd}");
        }
    }

    #[test]
    fn pico_rounds_half_even_beyond_twelve_places() {
        assert_eq!(to_pico(d("0.0000000000005")), Some(0));
        assert_eq!(to_pico(d("0.0000000000015")), Some(2));
        assert_eq!(to_pico(d("0.0000000000025")), Some(2));
        assert_eq!(to_pico(d("0.00000000000251")), Some(3));
        assert_eq!(to_pico(d("9223372.036854775808")), None);
        // A 7-decimal price can give a cost with 13 decimals.
        let p = price("0.0000001", "0", "0");
        let c = cost(&p, &usage(5, 0, 0, 0));
        assert_eq!(c, d("0.0000000000005"));
        assert_eq!(to_pico(c), Some(0));
    }

    #[test]
    fn exact_match_beats_globs_and_longest_glob_wins() {
        let table = own_only(&[
            entry("*", "9", None, "9"),
            entry("openai.*", "1", None, "1"),
            entry("openai.gpt-oss*", "2", None, "2"),
            entry("openai.gpt-oss-120b", "3", None, "3"),
        ])
        .unwrap();
        assert_eq!(table.len(), 4);
        let input = |m: &str| table.lookup(m).map(|p| p.input_per_million);
        assert_eq!(input("openai.gpt-oss-120b"), Some(d("3")));
        assert_eq!(input("openai.gpt-oss-20b"), Some(d("2")));
        assert_eq!(input("openai.gpt-oss"), Some(d("2")));
        assert_eq!(input("openai.gpt-5.4"), Some(d("1")));
        assert_eq!(input("google.gemma-4-27b"), Some(d("9")));
        assert_eq!(input(""), Some(d("9")));
    }

    #[test]
    fn no_match_is_none() {
        let table = own_only(&[entry("openai.gpt-oss*", "2", None, "2")]).unwrap();
        assert!(table.lookup("openai.gpt-os").is_none());
        assert!(table.lookup("OPENAI.GPT-OSS-20B").is_none());
        assert!(own_only(&[]).unwrap().is_empty());
    }

    #[test]
    fn cached_defaults_to_input_and_values_are_normalised() {
        let table = own_only(&[
            entry("a", "0.150", None, "0.60"),
            entry("b", "2.75", Some("0.275"), "16.50"),
        ])
        .unwrap();
        let a = table.lookup("a").unwrap();
        assert_eq!(a.cached_input_per_million, d("0.15"));
        assert_eq!(a.input_per_million.to_string(), "0.15");
        assert_eq!(a.output_per_million.to_string(), "0.6");
        assert_eq!(a.source, "config");
        let b = table.lookup("b").unwrap();
        assert_eq!(b.cached_input_per_million, d("0.275"));
    }

    #[test]
    fn later_layers_override_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("team.toml"),
            r#"
            [[prices]]
            model = "openai.gpt-oss-120b"
            input_per_million = "0.10"
            output_per_million = "0.40"

            [[prices]]
            model = "openai.gpt-oss-20b"
            input_per_million = "0.05"
            output_per_million = "0.20"

            [[prices]]
            model = "acme.*"
            input_per_million = "1"
            output_per_million = "1"
            "#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/late.toml"),
            "[[prices]]\nmodel = \"acme.*\"\ninput_per_million = \"2\"\noutput_per_million = \"2\"\n",
        )
        .unwrap();
        let pricing = PricingConfig {
            builtin: true,
            include: vec!["team.toml".to_owned(), "sub/late.toml".to_owned()],
        };
        let own = [entry("openai.gpt-oss-20b", "0.01", Some("0"), "0.02")];
        let table = PriceTable::build(&pricing, Some(dir.path()), &own).unwrap();

        // Built in, untouched.
        let safeguard = table.lookup("openai.gpt-oss-safeguard-20b").unwrap();
        assert_eq!(safeguard.source, "builtin");
        assert_eq!(safeguard.output_per_million, d("0.30"));
        // Include file over built in.
        let big = table.lookup("openai.gpt-oss-120b").unwrap();
        assert_eq!(big.input_per_million, d("0.10"));
        assert!(big.source.ends_with("team.toml"), "{}", big.source);
        // Later include over earlier include.
        let acme = table.lookup("acme.x").unwrap();
        assert_eq!(acme.input_per_million, d("2"));
        assert!(acme.source.ends_with("late.toml"), "{}", acme.source);
        // Config over everything.
        let small = table.lookup("openai.gpt-oss-20b").unwrap();
        assert_eq!(small.input_per_million, d("0.01"));
        assert_eq!(small.cached_input_per_million, Decimal::ZERO);
        assert_eq!(small.source, "config");

        let builtin_only = PriceTable::build(&PricingConfig::default(), None, &[]).unwrap();
        assert_eq!(table.len(), builtin_only.len() + 1);
    }

    #[test]
    fn builtin_can_be_turned_off() {
        let table = own_only(&[entry("x", "1", None, "1")]).unwrap();
        assert_eq!(table.len(), 1);
        assert!(table.lookup("openai.gpt-oss-120b").is_none());
    }

    #[test]
    fn pricing_section_defaults_and_rejects_unknown_keys() {
        let p: PricingConfig = toml::from_str("").unwrap();
        assert!(p.builtin);
        assert!(p.include.is_empty());
        let p: PricingConfig = toml::from_str("builtin = false\ninclude = [\"a.toml\"]").unwrap();
        assert!(!p.builtin);
        assert_eq!(p.include, ["a.toml"]);
        let err = toml::from_str::<PricingConfig>("includes = []").unwrap_err();
        assert!(err.to_string().contains("includes"), "{err}");
    }

    #[test]
    fn float_prices_are_rejected() {
        let text =
            "[[prices]]\nmodel = \"m\"\ninput_per_million = 0.15\noutput_per_million = \"1\"\n";
        let err = toml::from_str::<PriceFile>(text).unwrap_err().to_string();
        assert!(err.contains("binary floats are not money"), "{err}");
        assert!(err.contains("\"0.15\""), "{err}");
        assert!(err.contains("input_per_million"), "{err}");

        let text = "[[prices]]\nmodel = \"m\"\ninput_per_million = \"1\"\n\
                    cached_input_per_million = 0.5\noutput_per_million = \"1\"\n";
        let err = toml::from_str::<PriceFile>(text).unwrap_err().to_string();
        assert!(err.contains("binary floats are not money"), "{err}");

        let text = "[[prices]]\nmodel = \"m\"\ninput_per_million = \"1\"\noutput_per_million = 3\n";
        let err = toml::from_str::<PriceFile>(text).unwrap_err().to_string();
        assert!(err.contains("TOML integer"), "{err}");
    }

    #[test]
    fn garbage_is_rejected_with_its_path() {
        let problems = own_only(&[
            entry("ok", "0.15", None, "0.60"),
            entry("m", "0.15", None, "lots"),
            entry("n", "-1", Some("1e3"), "1_000"),
            entry("o", " 1", None, "1."),
            entry("p", "0.0000000000001", Some(".5"), "1000000.01"),
            entry("q", "1", Some("99999999999999999999999999999999"), "+1"),
        ])
        .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "prices[1].output_per_million",
                "prices[2].input_per_million",
                "prices[2].cached_input_per_million",
                "prices[2].output_per_million",
                "prices[3].input_per_million",
                "prices[3].output_per_million",
                "prices[4].input_per_million",
                "prices[4].cached_input_per_million",
                "prices[4].output_per_million",
                "prices[5].cached_input_per_million",
                "prices[5].output_per_million",
            ]
        );
        let msg = |i: usize| problems[i].1.as_str();
        assert!(
            msg(0).starts_with("`lots` is not a decimal number"),
            "{}",
            msg(0)
        );
        assert_eq!(msg(1), "`-1` must not be negative");
        assert!(msg(6).contains("more than 12 decimal places"), "{}", msg(6));
        assert!(msg(8).contains("surely a mistake"), "{}", msg(8));
        assert!(msg(9).contains("too many digits"), "{}", msg(9));
    }

    #[test]
    fn bad_patterns_and_duplicates_are_rejected() {
        let problems = own_only(&[
            entry("", "1", None, "1"),
            entry("a*b", "1", None, "1"),
            entry("a**", "1", None, "1"),
            entry(" a", "1", None, "1"),
            entry("dup*", "1", None, "1"),
            entry("dup*", "2", None, "2"),
        ])
        .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "prices[0].model",
                "prices[1].model",
                "prices[2].model",
                "prices[3].model",
                "prices[5].model",
            ]
        );
        assert!(problems[4].1.contains("prices[4]"), "{}", problems[4].1);
    }

    #[test]
    fn include_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("float.toml"),
            "[[prices]]\nmodel = \"m\"\ninput_per_million = 0.15\noutput_per_million = \"1\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("extra.toml"), "currency = \"EUR\"\n").unwrap();
        std::fs::write(
            dir.path().join("bad.toml"),
            "[[prices]]\nmodel = \"m\"\ninput_per_million = \"x\"\noutput_per_million = \"1\"\n",
        )
        .unwrap();
        let pricing = PricingConfig {
            builtin: false,
            include: vec![
                "missing.toml".to_owned(),
                "float.toml".to_owned(),
                "extra.toml".to_owned(),
                "bad.toml".to_owned(),
                String::new(),
            ],
        };
        let problems = PriceTable::build(&pricing, Some(dir.path()), &[]).unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:?}");
        let shown = |f: &str| dir.path().join(f).display().to_string();

        assert_eq!(problems[0].0, "pricing.include[0]");
        assert!(
            problems[0]
                .1
                .starts_with(&format!("cannot read {}", shown("missing.toml")))
        );
        assert_eq!(problems[1].0, "pricing.include[1]");
        assert!(
            problems[1]
                .1
                .starts_with(&format!("cannot parse {}", shown("float.toml")))
        );
        assert!(
            problems[1].1.contains("binary floats are not money"),
            "{}",
            problems[1].1
        );
        assert_eq!(problems[2].0, "pricing.include[2]");
        assert!(problems[2].1.contains("currency"), "{}", problems[2].1);
        assert_eq!(
            problems[3].0,
            format!("{}: prices[0].input_per_million", shown("bad.toml"))
        );
        assert_eq!(
            problems[4],
            (
                "pricing.include[4]".to_owned(),
                "must name a price file".to_owned()
            )
        );
    }

    #[test]
    fn absolute_include_paths_ignore_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abs.toml");
        std::fs::write(
            &file,
            "[[prices]]\nmodel = \"m\"\ninput_per_million = \"1\"\noutput_per_million = \"1\"\n",
        )
        .unwrap();
        let pricing = PricingConfig {
            builtin: false,
            include: vec![file.display().to_string()],
        };
        let table = PriceTable::build(&pricing, Some(Path::new("/nonexistent")), &[]).unwrap();
        assert_eq!(
            table.lookup("m").unwrap().source,
            file.display().to_string()
        );
    }

    #[test]
    fn builtin_list_parses_and_every_model_resolves() {
        let entries = parse_price_file(BUILTIN_PRICES).unwrap();
        assert!(!entries.is_empty());
        let table = PriceTable::build(&PricingConfig::default(), None, &[]).unwrap();
        assert_eq!(table.len(), entries.len());
        for e in &entries {
            let probe = e
                .model
                .strip_suffix('*')
                .map_or(e.model.clone(), |p| format!("{p}x"));
            let p = table
                .lookup(&probe)
                .unwrap_or_else(|| panic!("{} unpriced", e.model));
            assert_eq!(p.source, "builtin");
            assert!(p.input_per_million > Decimal::ZERO, "{}", e.model);
            assert!(p.output_per_million > Decimal::ZERO, "{}", e.model);
            assert!(
                p.cached_input_per_million <= p.input_per_million,
                "{}",
                e.model
            );
            // Six decimals or fewer: ledger amounts stay exact.
            for v in [
                p.input_per_million,
                p.cached_input_per_million,
                p.output_per_million,
            ] {
                assert!(v.scale() <= 6, "{}: {v}", e.model);
            }
        }
        let oss = table.lookup("openai.gpt-oss-120b").unwrap();
        assert_eq!(
            (
                oss.input_per_million,
                oss.cached_input_per_million,
                oss.output_per_million
            ),
            (d("0.15"), d("0.15"), d("0.60"))
        );
        let small = table.lookup("openai.gpt-oss-20b").unwrap();
        assert_eq!(
            (small.input_per_million, small.output_per_million),
            (d("0.075"), d("0.30"))
        );
    }

    #[test]
    fn builtin_entries_each_cite_a_source() {
        // Every [[prices]] block is preceded by a comment naming where the figure came from.
        let lines: Vec<&str> = BUILTIN_PRICES.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() == "[[prices]]" {
                let comment: Vec<&str> = lines[..i]
                    .iter()
                    .rev()
                    .take_while(|l| l.trim_start().starts_with('#'))
                    .copied()
                    .collect();
                let comment = comment.join("\n");
                assert!(comment.contains("Source"), "line {}: no source", i + 1);
                assert!(comment.contains("2026-11"), "line {}: no date", i + 1);
            }
        }
    }

    #[test]
    fn entries_lists_patterns_sorted() {
        let table = own_only(&[entry("b*", "1", None, "1"), entry("a", "1", None, "1")]).unwrap();
        let names: Vec<String> = table.entries().into_iter().map(|(m, _)| m).collect();
        assert_eq!(names, ["a", "b*"]);
    }
}
