//! `[[backends]]`: where answers come from and what they cost.

use std::time::Duration;

use super::{amount, check_label, positive, secret};
use crate::config::document::{Fields, Problems};
use crate::config::{Api, Backend, Env, NativeApis, Pricing, Simulate, Target, Usd};

const DEFAULT_TIMEOUT_S: u64 = 120;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// A small model on a CPU core: what hourly estimates assume unless told otherwise.
const DEFAULT_EXPECTED_TOKENS_PER_S: u32 = 20;
const DEFAULT_SIMULATED_TEXT: &str = "This answer comes from a simulated Tollgate backend.";

pub(super) fn backend(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Backend {
    let name = f.required::<String>(p, "name").unwrap_or_default();
    check_label(f, p, "name", &name);
    let tier = f.optional::<String>(p, "tier").unwrap_or_else(|| "default".to_owned());
    check_label(f, p, "tier", &tier);
    let model = f.required::<String>(p, "model").unwrap_or_default();
    let quality = f.required::<f64>(p, "quality").unwrap_or(0.0);
    if !(0.0..=1.0).contains(&quality) {
        p.at_line(f.line_of(p, "quality"), &f.path_of("quality"), format!("must be between 0 and 1, got {quality}"));
    }
    let context_window = positive(f, p, "context_window").map_or(8192, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let max_concurrency = positive(f, p, "max_concurrency").map_or(64, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let timeout_s = positive(f, p, "timeout_s").unwrap_or(DEFAULT_TIMEOUT_S);
    let connect_ms = positive(f, p, "connect_timeout_ms").unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
    let first_byte_s = positive(f, p, "first_byte_timeout_s").unwrap_or(timeout_s);
    let target = target(f, p, env);
    let api = match f.optional::<String>(p, "api").as_deref() {
        None | Some("openai") => Api::OpenAi,
        Some("anthropic") => {
            if matches!(target, Target::Simulated(_)) {
                p.at_line(f.line_of(p, "api"), &f.path_of("api"), "a simulated backend speaks the OpenAI API only");
            }
            Api::Anthropic
        }
        Some(other) => {
            p.at_line(
                f.line_of(p, "api"),
                &f.path_of("api"),
                format!("must be \"openai\" or \"anthropic\", got {other:?}"),
            );
            Api::OpenAi
        }
    };
    let native = native_apis(f, p, api, &target);
    let pricing = pricing(f, p);
    let expected_tokens_per_s = positive(f, p, "expected_tokens_per_s").map_or_else(
        || match &target {
            // A simulated backend's speed is known exactly.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "speed rounded to whole tokens"
            )]
            Target::Simulated(sim) => (sim.tokens_per_s.round() as u32).max(1),
            Target::Http { .. } => DEFAULT_EXPECTED_TOKENS_PER_S,
        },
        |v| u32::try_from(v).unwrap_or(u32::MAX),
    );
    Backend {
        name,
        tier,
        target,
        api,
        native,
        model,
        quality,
        context_window,
        max_concurrency,
        timeout: Duration::from_secs(timeout_s),
        connect_timeout: Duration::from_millis(connect_ms),
        first_byte_timeout: Duration::from_secs(first_byte_s.min(timeout_s)),
        pricing,
        expected_tokens_per_s,
    }
}

/// The client APIs the backend serves itself (`native_apis`): an Anthropic backend serves
/// Messages, always.
fn native_apis(f: &mut Fields<'_>, p: &mut Problems<'_>, api: Api, target: &Target) -> NativeApis {
    let mut native = NativeApis { responses: false, messages: api == Api::Anthropic };
    for name in f.optional::<Vec<String>>(p, "native_apis").unwrap_or_default() {
        let problem = match (name.as_str(), api) {
            ("messages", _) => {
                native.messages = true;
                None
            }
            ("responses", Api::OpenAi) => {
                native.responses = true;
                None
            }
            ("responses", Api::Anthropic) => Some("an Anthropic backend does not serve the Responses API".to_owned()),
            (other, _) => {
                Some(format!("holds {other:?}: the APIs a backend may serve itself are \"responses\" and \"messages\""))
            }
        };
        let problem = problem.or_else(|| {
            matches!(target, Target::Simulated(_))
                .then(|| "a simulated backend serves chat completions only".to_owned())
        });
        if let Some(problem) = problem {
            p.at_line(f.line_of(p, "native_apis"), &f.path_of("native_apis"), problem);
        }
    }
    native
}

fn target(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Target {
    let base_url = f.optional::<String>(p, "base_url");
    let api_key = secret(f, p, env, "api_key_env");
    let simulate = f.table(p, "simulate").map(|mut s| {
        let ttft_ms = s.optional::<u64>(p, "ttft_ms").unwrap_or(200);
        let tokens_per_s = s.optional::<f64>(p, "tokens_per_s").unwrap_or(50.0);
        if tokens_per_s <= 0.0 {
            p.at_line(s.line_of(p, "tokens_per_s"), &s.path_of("tokens_per_s"), "must be above 0");
        }
        let quality_text = s.optional::<String>(p, "quality_text").unwrap_or_else(|| DEFAULT_SIMULATED_TEXT.to_owned());
        if quality_text.split_whitespace().next().is_none() {
            p.at_line(s.line_of(p, "quality_text"), &s.path_of("quality_text"), "must hold at least one word");
        }
        s.finish(p);
        Simulate {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_s: tokens_per_s.max(f64::MIN_POSITIVE),
            quality_text,
        }
    });
    match (base_url, simulate) {
        (Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<http::Uri>().is_err() {
                // The URL itself is not echoed: it may carry credentials.
                p.at_line(f.line_of(p, "base_url"), &f.path_of("base_url"), "is not an http:// or https:// URL");
            } else if url.parse::<http::Uri>().ok().and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
                == Some(true)
            {
                // It would travel in every request's Host header and in logs of either side.
                p.at_line(
                    f.line_of(p, "base_url"),
                    &f.path_of("base_url"),
                    "must not carry credentials (user:password@); give the backend's key with `api_key_env`",
                );
            }
            Target::Http { base_url: url.trim_end_matches('/').to_owned(), api_key }
        }
        (None, Some(sim)) => Target::Simulated(sim),
        (Some(_), Some(sim)) => {
            p.at_line(
                f.line_of(p, "simulate"),
                &f.path_of("simulate"),
                "set either `base_url` or `simulate`, not both",
            );
            Target::Simulated(sim)
        }
        (None, None) => {
            p.at_line(f.line(), &f.path_of("base_url"), "set `base_url` (a real upstream) or `simulate`");
            Target::Http { base_url: String::new(), api_key }
        }
    }
}

fn pricing(f: &mut Fields<'_>, p: &mut Problems<'_>) -> Pricing {
    let free = Pricing::PerToken {
        input_per_mtok: Usd::ZERO,
        output_per_mtok: Usd::ZERO,
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
    };
    let Some(mut t) = f.table(p, "pricing") else {
        p.at_line(f.line(), &f.path_of("pricing"), "missing required field `pricing` (per token or per hour)");
        return free;
    };
    let input = amount(&mut t, p, "input_per_mtok");
    let output = amount(&mut t, p, "output_per_mtok");
    let cached = amount(&mut t, p, "cached_input_per_mtok");
    let cache_write = amount(&mut t, p, "cache_write_per_mtok");
    let hourly = amount(&mut t, p, "hourly_usd");
    let per_token = input.is_some() || output.is_some() || cached.is_some() || cache_write.is_some();
    let pricing = match (per_token, hourly) {
        (true, None) => {
            if input.is_none() || output.is_none() {
                p.at_line(
                    t.line(),
                    &t.path_of("input_per_mtok"),
                    "per-token pricing needs both `input_per_mtok` and `output_per_mtok`",
                );
            }
            Pricing::PerToken {
                input_per_mtok: input.unwrap_or(Usd::ZERO),
                output_per_mtok: output.unwrap_or(Usd::ZERO),
                cached_input_per_mtok: cached,
                cache_write_per_mtok: cache_write,
            }
        }
        (false, Some(hourly_usd)) => Pricing::PerHour { hourly_usd },
        (true, Some(_)) => {
            p.at_line(t.line(), t.path(), "set per-token prices or `hourly_usd`, not both");
            free
        }
        (false, None) => {
            p.at_line(t.line(), t.path(), "set per-token prices (`input_per_mtok`, `output_per_mtok`) or `hourly_usd`");
            free
        }
    };
    t.finish(p);
    pricing
}
