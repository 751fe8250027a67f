//! `Reason`: why a backend was chosen, as the `x-tollgate-reason` header and metric label say it.

/// Why the first backend of a decision was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The request named a backend.
    Pinned,
    /// Quality-first: the best candidate.
    QualityFirst,
    /// Quality-first, but the budget (or the per-request cap) cannot pay the best candidate.
    BudgetDowngrade,
    /// Quality-first, but the best candidate is at capacity.
    Spill,
    /// Quality-first with pacing, ahead of the pace line: a cheaper candidate meets the floor.
    Paced,
    /// Cost-first: the cheapest candidate.
    CostFirst,
    /// Cost-first, escalated: the cheapest candidate is below the quality floor.
    EscalatedQuality,
    /// Cost-first, escalated: the cheapest candidate cannot hold the prompt and completion.
    EscalatedContext,
    /// Cost-first, escalated: the cheapest candidate is at capacity.
    EscalatedCapacity,
    /// Cascade: the cheaper backend's answer was not confident enough; asked again one up.
    EscalatedConfidence,
    /// The named backend failed (now or recently: its circuit is open).
    Fallback(String),
}

impl Reason {
    pub fn label(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Pinned => "pinned".into(),
            Self::QualityFirst => "quality-first".into(),
            Self::BudgetDowngrade => "budget-downgrade".into(),
            Self::Spill => "spill".into(),
            Self::Paced => "paced".into(),
            Self::CostFirst => "cost-first".into(),
            Self::EscalatedQuality => "escalated:quality".into(),
            Self::EscalatedContext => "escalated:context".into(),
            Self::EscalatedCapacity => "escalated:capacity".into(),
            Self::EscalatedConfidence => "escalated:confidence".into(),
            Self::Fallback(backend) => format!("fallback:{backend}").into(),
        }
    }
}
