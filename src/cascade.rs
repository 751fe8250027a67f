//! The confidence cascade: a non-streamed request goes first to the cheapest candidate with
//! log-probabilities requested; an answer whose confidence is under the route's threshold (or
//! that was cut off by length) is asked again one tier up. Both calls are metered.
//!
//! The confidence is the mean token log-probability of the first choice. With
//! `target_premium_share`, the threshold follows the recent confidences so that about that
//! share escalates: it is their `share`-quantile over a sliding window (RouteLLM calibrates such
//! a threshold offline; here it adapts online, per route).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::Value;

/// Confidences kept per route for calibration.
const WINDOW: usize = 200;
/// Below this many samples the configured threshold applies.
const MIN_SAMPLES: usize = 20;

/// The mean log-probability of the first choice's tokens, from a chat (`logprobs.content[]`)
/// or completions (`logprobs.token_logprobs[]`) answer. `NEG_INFINITY` when the answer was cut
/// by `max_tokens` (never confident); `None` when the backend sent no log-probabilities.
pub fn confidence(answer: &Value) -> Option<f64> {
    let choice = answer.get("choices")?.get(0)?;
    if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
        return Some(f64::NEG_INFINITY);
    }
    let logprobs = choice.get("logprobs")?;
    let values: Vec<f64> = match logprobs.get("content").and_then(Value::as_array) {
        Some(tokens) => tokens.iter().filter_map(|t| t.get("logprob")?.as_f64()).collect(),
        None => logprobs.get("token_logprobs")?.as_array()?.iter().filter_map(Value::as_f64).collect(),
    };
    if values.is_empty() {
        return None;
    }
    #[expect(clippy::cast_precision_loss, reason = "a token count")]
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

/// Removes the log-probabilities the gateway asked for and the client did not.
pub fn strip_logprobs(answer: &mut Value) {
    if let Some(choices) = answer.get_mut("choices").and_then(Value::as_array_mut) {
        for choice in choices {
            if let Some(choice) = choice.as_object_mut() {
                choice.remove("logprobs");
            }
        }
    }
}

/// One route's threshold, fixed or calibrated online.
#[derive(Debug)]
pub struct Calibrator {
    recent: Mutex<VecDeque<f64>>,
}

impl Default for Calibrator {
    fn default() -> Self {
        Self { recent: Mutex::new(VecDeque::with_capacity(WINDOW)) }
    }
}

impl Calibrator {
    /// Records `confidence` and says whether it is under the current threshold.
    pub fn observe(&self, confidence: f64, configured: f64, target_share: Option<f64>) -> (bool, f64) {
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let threshold = match target_share {
            Some(share) if recent.len() >= MIN_SAMPLES => quantile(recent.make_contiguous(), share),
            _ => configured,
        };
        if confidence.is_finite() {
            if recent.len() == WINDOW {
                recent.pop_front();
            }
            recent.push_back(confidence);
        }
        (confidence < threshold, threshold)
    }
}

/// The value under which a `share` of `values` lies.
fn quantile(values: &[f64], share: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index"
    )]
    let index = ((share.clamp(0.0, 1.0) * sorted.len() as f64).floor() as usize).min(sorted.len() - 1);
    sorted[index]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn confidence_is_the_mean_logprob_and_a_length_cut_is_never_confident() {
        let chat = json!({"choices": [{"finish_reason": "stop", "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]}}]});
        assert_eq!(confidence(&chat), Some(-1.0));
        let completion = json!({"choices": [{"finish_reason": "stop", "logprobs": {"token_logprobs": [-0.2, -0.4]}}]});
        assert!((confidence(&completion).unwrap() + 0.3).abs() < 1e-12);
        let cut = json!({"choices": [{"finish_reason": "length", "logprobs": {"content": [{"logprob": -0.1}]}}]});
        assert_eq!(confidence(&cut), Some(f64::NEG_INFINITY));
        assert_eq!(confidence(&json!({"choices": [{"finish_reason": "stop"}]})), None);
    }

    #[test]
    fn logprobs_are_stripped_from_every_choice() {
        let mut answer = json!({"choices": [{"message": {}, "logprobs": {}}, {"logprobs": null}]});
        strip_logprobs(&mut answer);
        assert_eq!(answer, json!({"choices": [{"message": {}}, {}]}));
    }

    #[test]
    fn calibration_converges_to_the_target_share_on_a_synthetic_stream() {
        let calibrator = Calibrator::default();
        // A deterministic spread of confidences in [-3, 0).
        let mut seed: u64 = 7;
        let mut escalated = 0;
        let total = 2000;
        for i in 0..total {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let confidence = -3.0 * ((seed >> 11) as f64 / (1u64 << 53) as f64);
            let (escalate, _) = calibrator.observe(confidence, -1.0, Some(0.2));
            if i >= 200 && escalate {
                escalated += 1;
            }
        }
        let share = f64::from(escalated) / f64::from(total - 200);
        assert!((share - 0.2).abs() < 0.05, "escalated share {share}");
    }

    #[test]
    fn without_a_target_the_configured_threshold_applies() {
        let calibrator = Calibrator::default();
        assert_eq!(calibrator.observe(-0.5, -1.0, None), (false, -1.0));
        assert_eq!(calibrator.observe(-1.5, -1.0, None), (true, -1.0));
    }
}
