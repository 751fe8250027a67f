//! Checks that a client body is strict JSON, refusing what a lenient parser would let through:
//! a key repeated in one object (the value Tollgate reads and the one a backend reads could
//! differ), numbers that are not finite, and keys serde_json reserves for itself
//! (`$serde_json::private::...`: an object holding one reads as something else, so a body the
//! check let through could fail to parse later, in the cache key or a translation). Nesting depth is bounded by serde_json's recursion
//! limit (128). Nothing is built: the body is forwarded as the client's bytes.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// What serde_json's own markers start with (raw values, arbitrary-precision numbers).
const RESERVED_KEY_PREFIX: &str = "$serde_json::private::";

/// Objects with more keys than this look repeats up in a hash set rather than by a scan.
const SCAN_KEYS: usize = 32;

/// Checks that `bytes` is one strict JSON value (see the module doc).
pub fn check(text: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    // One buffer of keys for the whole body: each object pushes its keys and pops them. On the
    // stack for a usual request's few levels of a few keys.
    let mut keys = Keys::new();
    Strict { keys: &mut keys }.deserialize(&mut de)?;
    de.end()
}

/// An object key: borrowed from the body unless it had escapes.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

type Keys<'de> = smallvec::SmallVec<[Cow<'de, str>; 16]>;

struct Strict<'a, 'de> {
    keys: &'a mut Keys<'de>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("numbers must be finite"))
        }
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Strict { keys: &mut *self.keys })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let base = self.keys.len();
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key.starts_with(RESERVED_KEY_PREFIX) {
                return Err(de::Error::custom(format_args!("the key `{key}` is reserved")));
            }
            let repeated = match &many {
                Some(set) => set.contains(&key),
                None => self.keys[base..].contains(&key),
            };
            if repeated {
                return Err(de::Error::custom(format_args!("the key `{key}` appears twice in one object")));
            }
            match &mut many {
                Some(set) => {
                    set.insert(key);
                }
                None if self.keys.len() - base < SCAN_KEYS => self.keys.push(key),
                None => {
                    let mut set: HashSet<_> = self.keys.drain(base..).collect();
                    set.insert(key);
                    many = Some(set);
                }
            }
            map.next_value_seed(Strict { keys: &mut *self.keys })?;
        }
        self.keys.truncate(base);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(check(r#"{"model":"a","model":"b"}"#).unwrap_err().to_string().contains("`model` appears twice"));
        assert!(check(r#"{"messages":[{"role":"user","role":"system"}]}"#).is_err());
        assert!(check(r#"{"a":{"b":1},"c":[1,2.5,"x",null,true],"b":{"b":2}}"#).is_ok());
        // The same key spelled with an escape is the same key.
        assert!(check(r#"{"model":"a","mod\u0065l":"b"}"#).is_err());
    }

    #[test]
    fn repeats_are_found_in_objects_with_many_keys() {
        let keys: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
        let unique = format!("{{{}}}", keys.join(","));
        assert!(check(&unique).is_ok());
        let repeated = format!("{{{},\"k7\":0}}", keys.join(","));
        assert!(check(&repeated).unwrap_err().to_string().contains("`k7` appears twice"));
        let nested = format!("{{\"outer\":{unique},\"k7\":{{\"k7\":1}}}}");
        assert!(check(&nested).is_ok(), "keys of an inner object do not leak into the outer one");
    }

    #[test]
    fn keys_serde_json_reserves_are_refused_however_spelled() {
        let raw = r#"{"messages":[{"$serde_json::private::RawValue":"hi"}]}"#;
        assert!(check(raw).unwrap_err().to_string().contains("is reserved"));
        assert!(check(r#"{"\u0024serde_json::private::Number":"1"}"#).is_err(), "an escaped spelling too");
        assert!(check(r#"{"$serde_json":1,"serde_json::private::RawValue":2}"#).is_ok(), "only the markers themselves");
    }

    #[test]
    fn out_of_range_numbers_deep_nesting_and_trailing_bytes_are_refused() {
        assert!(check("[1e400]").is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(check(&deep).is_err());
        assert!(check("{} {}").is_err());
    }
}
