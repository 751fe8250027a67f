//! Money and the marginal-cost model. Pure arithmetic on integers: amounts are exact, never
//! accumulated in floating point.

use crate::openai::Usage;

const PICO_PER_USD: i64 = 1_000_000_000_000;
const TOKENS_PER_MTOK: i128 = 1_000_000;

/// An amount of US dollars in integer pico-USD (1e-12 USD). Per-token prices have at most a
/// few decimals per million tokens, so one token's price is an exact number of pico-USD; an
/// `i64` holds ±9.2 million USD, and config amounts are capped at 1 million.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i64);

impl Usd {
    pub const ZERO: Self = Self(0);
    /// The largest amount a config may name.
    pub const CONFIG_MAX: Self = Self(1_000_000 * PICO_PER_USD);

    pub const fn from_pico(pico: i64) -> Self {
        Self(pico)
    }

    pub const fn pico(self) -> i64 {
        self.0
    }

    /// A decimal amount as written in a config file, rounded to the nearest pico-USD; `None`
    /// outside `0..=CONFIG_MAX` or when not finite.
    pub fn from_config(usd: f64) -> Option<Self> {
        #[expect(clippy::cast_precision_loss, reason = "CONFIG_MAX is exact in f64")]
        let max = Self::CONFIG_MAX.0 as f64 / PICO_PER_USD as f64;
        if !usd.is_finite() || !(0.0..=max).contains(&usd) {
            return None;
        }
        // Round through the decimal text so that 0.6 becomes exactly 600_000_000_000 pico.
        let text = format!("{usd:.12}");
        let (whole, fraction) = text.split_once('.').unwrap_or((&text, "0"));
        let whole: i64 = whole.parse().ok()?;
        let fraction: i64 = format!("{fraction:0<12}").get(..12)?.parse().ok()?;
        Some(Self(whole * PICO_PER_USD + fraction))
    }

    /// For metrics and JSON display only; never summed.
    #[expect(clippy::cast_precision_loss, reason = "display conversion")]
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / PICO_PER_USD as f64
    }

    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// `self * n / d`, rounded half up (`None` when `d` is zero): pro-rating without floats.
    pub fn mul_div(self, n: i64, d: i64) -> Option<Self> {
        (d != 0).then(|| self.scale(i128::from(n), i128::from(d)))
    }

    /// `self * n / d`, rounded half up, in 128-bit so nothing overflows on the way.
    fn scale(self, n: i128, d: i128) -> Self {
        let product = i128::from(self.0) * n;
        let rounded = (product + d / 2).div_euclid(d);
        Self(i64::try_from(rounded).unwrap_or(i64::MAX))
    }
}

/// Exact decimal text, e.g. `0.0000036` or `5.0`: what headers and reports print.
impl std::fmt::Display for Usd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, fraction) = (abs / PICO_PER_USD.unsigned_abs(), abs % PICO_PER_USD.unsigned_abs());
        // Twelve decimals without trailing zeros, on the stack: this runs for the cost and
        // budget headers of every request.
        let mut digits = [b'0'; 12];
        let mut rest = fraction;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let len = digits.iter().rposition(|&d| d != b'0').map_or(1, |last| last + 1);
        let fraction = std::str::from_utf8(&digits[..len]).unwrap_or("0");
        write!(f, "{sign}{whole}.{fraction}")
    }
}

/// The marginal-cost model of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// Hosted APIs: USD per million tokens.
    /// Cached prompt tokens cost `cached_input_per_mtok` and prompt tokens written to the
    /// upstream's cache `cache_write_per_mtok` (Anthropic's prompt caching); each defaults to
    /// the input price.
    PerToken {
        input_per_mtok: Usd,
        output_per_mtok: Usd,
        cached_input_per_mtok: Option<Usd>,
        cache_write_per_mtok: Option<Usd>,
    },
    /// Self-hosted servers: the hourly cost, shared among the requests in flight.
    PerHour { hourly_usd: Usd },
}

impl Pricing {
    /// The cost of `usage` under per-token pricing. Cached (and cache-written) prompt tokens
    /// are priced at their own price when one is set and are never also charged at the full
    /// price. Per-hour backends are charged by occupancy instead (see `metering::occupancy`):
    /// zero here.
    pub fn price_tokens(&self, usage: &Usage) -> Usd {
        match *self {
            Self::PerToken { input_per_mtok, output_per_mtok, cached_input_per_mtok, cache_write_per_mtok } => {
                let cached = usage.cached_tokens();
                let written = usage.cache_write_tokens();
                let uncached = usage.prompt_tokens - cached - written;
                let cached_price = cached_input_per_mtok.unwrap_or(input_per_mtok);
                let write_price = cache_write_per_mtok.unwrap_or(input_per_mtok);
                input_per_mtok
                    .scale(i128::from(uncached), TOKENS_PER_MTOK)
                    .saturating_add(cached_price.scale(i128::from(cached), TOKENS_PER_MTOK))
                    .saturating_add(write_price.scale(i128::from(written), TOKENS_PER_MTOK))
                    .saturating_add(output_per_mtok.scale(i128::from(usage.completion_tokens), TOKENS_PER_MTOK))
            }
            Self::PerHour { .. } => Usd::ZERO,
        }
    }

    /// The estimated cost of a request before it runs: per token, its price at the estimated
    /// sizes; per hour, the backend's whole hourly cost for the time the completion should
    /// take at `tokens_per_s` (as if alone on it: an upper bound, sharing only lowers it).
    pub fn estimate(&self, prompt_tokens: u64, completion_tokens: u64, tokens_per_s: u32) -> Usd {
        match *self {
            Self::PerToken { .. } => self.price_tokens(&Usage::new(prompt_tokens, completion_tokens)),
            Self::PerHour { hourly_usd } => {
                let per_s = i128::from(tokens_per_s.max(1));
                // hourly * (completion / tps) / 3600, with the division done last.
                hourly_usd.scale(i128::from(completion_tokens.max(1)), per_s * 3600)
            }
        }
    }

    /// The most completion tokens whose estimate (with `prompt_tokens`) fits `budget`.
    pub fn affordable_completion(&self, prompt_tokens: u64, budget: Usd, tokens_per_s: u32) -> u64 {
        let fits = |completion: u64| self.estimate(prompt_tokens, completion, tokens_per_s) <= budget;
        if !fits(0) {
            return 0;
        }
        // The estimate grows with the completion: binary search for the last size that fits.
        let (mut low, mut high) = (0u64, 1u64 << 40);
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            if fits(mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }

    pub fn is_per_hour(&self) -> bool {
        matches!(self, Self::PerHour { .. })
    }
}

/// What the "always premium" baseline (the route's most expensive candidate) would charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Baseline {
    pub pricing: Pricing,
    pub tokens_per_s: u32,
}

impl Baseline {
    /// The baseline's price for `usage`: per token, the exact price; per hour, the exclusive
    /// time the completion takes at the backend's expected speed (its occupancy is unknowable
    /// for a request it did not serve).
    pub fn price(&self, usage: &Usage) -> Usd {
        match self.pricing {
            Pricing::PerToken { .. } => self.pricing.price_tokens(usage),
            Pricing::PerHour { .. } => {
                self.pricing.estimate(usage.prompt_tokens, usage.completion_tokens, self.tokens_per_s)
            }
        }
    }

    /// What serving `usage` at `cost` saved against the baseline; never negative (a request
    /// that happened to cost more than the baseline saved nothing, it did not lose savings).
    pub fn savings(&self, usage: &Usage, cost: Usd) -> Usd {
        self.price(usage).saturating_sub(cost).max(Usd::ZERO)
    }
}

#[cfg(test)]
mod tests;
