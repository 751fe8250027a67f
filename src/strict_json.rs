//! JSON parsing for client bodies that refuses what a lenient parser would let through: a key
//! repeated in one object (the validated value and the one an upstream reads could differ), and
//! numbers that are not finite. Nesting depth is bounded by serde_json's recursion limit (128).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `bytes` as strict JSON (see the module doc).
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|s| s.0)
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("numbers must be finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // serde_json gives these keys a meaning of its own when serialising (raw values,
            // arbitrary-precision numbers): such an object would not be forwarded as validated.
            if key.starts_with("$serde_json::private::") {
                return Err(de::Error::custom(format_args!("the key `{key}` is reserved")));
            }
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("the key `{key}` appears twice in one object")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(parse(br#"{"model":"a","model":"b"}"#).unwrap_err().to_string().contains("`model` appears twice"));
        assert!(parse(br#"{"messages":[{"role":"user","role":"system"}]}"#).is_err());
        assert_eq!(parse(br#"{"a":{"b":1},"c":[1,2.5,"x",null,true]}"#).unwrap()["c"][1], 2.5);
    }

    #[test]
    fn serde_json_internal_keys_are_refused() {
        let body = br#"{"messages":[{"role":"user","$serde_json::private::RawValue":"hi"}]}"#;
        assert!(parse(body).unwrap_err().to_string().contains("is reserved"));
    }

    #[test]
    fn out_of_range_numbers_deep_nesting_and_bad_utf8_are_refused() {
        assert!(parse(b"[1e400]").is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"\"\xff\xfe\"").is_err());
    }
}
