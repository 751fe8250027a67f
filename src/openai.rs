//! OpenAI wire types the gateway reads or writes; everything else passes through untouched.

use serde::{Deserialize, Serialize};

/// Token usage as an upstream reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: u64,
    /// Prompt tokens written to the upstream's prompt cache: our own member, set when an
    /// Anthropic answer is translated (its `cache_creation_input_tokens`), priced at
    /// `cache_write_per_mtok`.
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self { prompt_tokens, completion_tokens, prompt_tokens_details: None }
    }

    /// Prompt tokens the upstream served from its cache (a subset of `prompt_tokens`).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens.min(self.prompt_tokens))
    }

    /// Prompt tokens written to the upstream's cache (a subset of `prompt_tokens`, disjoint
    /// from the cached ones).
    pub fn cache_write_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cache_write_tokens.min(self.prompt_tokens - self.cached_tokens()))
    }
}

/// The `usage` member of a response or a stream chunk; `null` and absent are both `None`.
#[derive(Debug, Deserialize)]
pub struct UsageCarrier {
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// `{"error": {...}}`, the shape every OpenAI client parses.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelEntry<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelEntry<'a>>,
}
