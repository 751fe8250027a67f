//! A user's overrides of its plan as JSON: the admin API's `overrides` object, and how the
//! stores keep it. Field names and values are those of `[[plans]]` in the config file.

use serde_json::{Map, Value};

use crate::config::{BudgetPeriod, LimitOverrides, Policy};
use crate::cost::Usd;

/// `overrides` as the admin API shows it: only the fields set.
pub fn to_json(o: &LimitOverrides) -> Value {
    let mut map = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            map.insert(key.to_owned(), value);
        }
    };
    put("policy", o.policy.map(|p| p.as_str().into()));
    put("budget_usd", o.budget_usd.map(|u| u.as_f64().into()));
    put("budget_period", o.budget_period.map(|p| crate::ledger::period::name(p).into()));
    put("max_request_usd", o.max_request_usd.map(|u| u.as_f64().into()));
    put("min_quality", o.min_quality.map(Into::into));
    put("rpm", o.rpm.map(Into::into));
    put("tpm", o.tpm.map(Into::into));
    put("pacing", o.pacing.map(Into::into));
    put("pacing_slack", o.pacing_slack.map(Into::into));
    put("clamp_max_tokens", o.clamp_max_tokens.map(Into::into));
    Value::Object(map)
}

/// Reads `overrides`; an error names the field (`overrides.<field>`) and what is wrong.
pub fn from_json(value: &Value) -> Result<LimitOverrides, (String, String)> {
    let Value::Object(map) = value else {
        return Err(("overrides".into(), "must be an object".into()));
    };
    let mut o = LimitOverrides::default();
    for (key, v) in map {
        let field = format!("overrides.{key}");
        let bad = |what: &str| Err((field.clone(), what.to_owned()));
        match key.as_str() {
            "policy" => match v.as_str().and_then(Policy::parse) {
                Some(p) => o.policy = Some(p),
                None => return bad("must be \"quality-first\" or \"cost-first\""),
            },
            "budget_period" => match v.as_str().and_then(BudgetPeriod::parse) {
                Some(p) => o.budget_period = Some(p),
                None => return bad("must be \"day\", \"month\" or \"total\""),
            },
            "budget_usd" | "max_request_usd" => match usd(v) {
                Some(u) if key == "budget_usd" => o.budget_usd = Some(u),
                Some(u) => o.max_request_usd = Some(u),
                None => return bad("must be a number of USD from 0 to 1000000"),
            },
            "min_quality" | "pacing_slack" => match v.as_f64().filter(|q| (0.0..=1.0).contains(q)) {
                Some(q) if key == "min_quality" => o.min_quality = Some(q),
                Some(q) => o.pacing_slack = Some(q),
                None => return bad("must be a number between 0 and 1"),
            },
            "rpm" => match v.as_u64().filter(|n| *n > 0).and_then(|n| u32::try_from(n).ok()) {
                Some(n) => o.rpm = Some(n),
                None => return bad("must be a whole number above 0"),
            },
            "tpm" => match v.as_u64().filter(|n| *n > 0) {
                Some(n) => o.tpm = Some(n),
                None => return bad("must be a whole number above 0"),
            },
            "pacing" | "clamp_max_tokens" => match v.as_bool() {
                Some(b) if key == "pacing" => o.pacing = Some(b),
                Some(b) => o.clamp_max_tokens = Some(b),
                None => return bad("must be true or false"),
            },
            _ => return bad("is not a plan field"),
        }
    }
    Ok(o)
}

/// A USD amount from JSON: non-negative and at most the config's maximum.
pub fn usd(value: &Value) -> Option<Usd> {
    value.as_f64().filter(|v| *v >= 0.0).and_then(Usd::from_config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_round_trip_and_bad_fields_are_named() {
        let json = serde_json::json!({"policy": "cost-first", "budget_usd": 2.5, "rpm": 30, "pacing": true});
        let o = from_json(&json).unwrap();
        assert_eq!(o.policy, Some(Policy::CostFirst));
        assert_eq!(o.budget_usd, Usd::from_config(2.5));
        assert_eq!(to_json(&o), json);
        let (field, _) = from_json(&serde_json::json!({"rpm": 0})).unwrap_err();
        assert_eq!(field, "overrides.rpm");
        let (field, message) = from_json(&serde_json::json!({"budgett_usd": 1})).unwrap_err();
        assert_eq!((field.as_str(), message.as_str()), ("overrides.budgett_usd", "is not a plan field"));
    }
}
