//! One pass over a request's input (`messages`, `prompt` or `input`) for what routing needs
//! before any token is counted: an estimate of its length, and for chat whether every message
//! has a role.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::strict::Key;

/// Characters per token for English text with BPE tokenizers: the usual rule of thumb. The
/// estimate only sizes reservations and fills in usage a backend did not report.
pub const CHARS_PER_TOKEN: u64 = 4;
/// Per-message overhead of chat templates (role markers, separators).
const TOKENS_PER_MESSAGE: u64 = 4;

/// What the input holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Characters of its text (object keys aside); a number (a token id) counts as one token.
    pub chars: u64,
    /// An array: its length. Anything else: `None`.
    pub elements: Option<usize>,
    /// An array: the first element that is not an object with a string `role`.
    pub first_without_role: Option<usize>,
    /// An array: some element is not an object.
    pub not_all_objects: bool,
}

impl Summary {
    /// Reads `raw`, a JSON value already checked by `strict::check`.
    pub fn of(raw: &str) -> Result<Self, serde_json::Error> {
        let mut summary = Self::default();
        let mut de = serde_json::Deserializer::from_str(raw);
        de.deserialize_any(Top(&mut summary))?;
        Ok(summary)
    }

    /// Prompt tokens: the text at [`CHARS_PER_TOKEN`], plus a template's overhead per message
    /// when the input is an array of objects.
    pub fn prompt_tokens(&self) -> u64 {
        let messages = match self.elements {
            Some(n) if !self.not_all_objects => n as u64,
            _ => 0,
        };
        self.chars.div_ceil(CHARS_PER_TOKEN) + messages * TOKENS_PER_MESSAGE
    }
}

/// The input itself: an array is walked element by element, anything else is counted.
struct Top<'a>(&'a mut Summary);

impl<'de> Visitor<'de> for Top<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(element) = seq.next_element_seed(Element(&mut self.0.chars))? {
            if element != Kind::Message && self.0.first_without_role.is_none() {
                self.0.first_without_role = Some(index);
            }
            self.0.not_all_objects |= !matches!(element, Kind::Message | Kind::Object);
            index += 1;
        }
        self.0.elements = Some(index);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        Chars(&mut self.0.chars).visit_map(map)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Chars(&mut self.0.chars).visit_str(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        Chars(&mut self.0.chars).visit_u64(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        Chars(&mut self.0.chars).visit_i64(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        Chars(&mut self.0.chars).visit_f64(v)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// What an element of an array input (or a message's `role`) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An object with a string `role`.
    Message,
    Object,
    String,
    Other,
}

/// An element of an array input, or a message's `role`: counted, and told apart.
struct Element<'a>(&'a mut u64);

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = Kind;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Kind, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut has_role = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "role" {
                has_role = map.next_value_seed(Element(&mut *self.0))? == Kind::String;
            } else {
                map.next_value_seed(Chars(&mut *self.0))?;
            }
        }
        Ok(if has_role { Kind::Message } else { Kind::Object })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Kind, A::Error> {
        Chars(self.0).visit_seq(seq).map(|()| Kind::Other)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Chars(self.0).visit_str(v).map(|()| Kind::String)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Kind, E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(Kind::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Kind, E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(Kind::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Kind, E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(Kind::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Kind, E> {
        Ok(Kind::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
}

/// Counts the text under a value.
struct Chars<'a>(&'a mut u64);

impl<'de> DeserializeSeed<'de> for Chars<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Chars<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        *self.0 += v.chars().count() as u64;
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        *self.0 += CHARS_PER_TOKEN;
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Chars(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Chars(&mut *self.0))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_text_and_messages_and_finds_a_message_without_a_role() {
        let s =
            Summary::of(r#"[{"role":"user","content":"hello there"},{"role":"assistant","content":"hi"}]"#).unwrap();
        // "user" + "hello there" + "assistant" + "hi" = 4 + 11 + 9 + 2 = 26 chars.
        assert_eq!(s, Summary { chars: 26, elements: Some(2), first_without_role: None, not_all_objects: false });
        assert_eq!(s.prompt_tokens(), 7 + 2 * TOKENS_PER_MESSAGE);
        let s = Summary::of(r#"[{"role":"user"},{"content":"x"},{"role":1}]"#).unwrap();
        assert_eq!(s.first_without_role, Some(1));
        assert_eq!(s.prompt_tokens(), 3 + 3 * TOKENS_PER_MESSAGE, "objects all: counted as messages");
        let s = Summary::of(r#"[{"role":"user","content":[{"type":"text","text":"héllo"}]}]"#).unwrap();
        assert_eq!(s.chars, 4 + 4 + 5, "nested content parts count, keys do not");
    }

    #[test]
    fn prompts_and_token_ids_count_too() {
        assert_eq!(Summary::of(r#""abcdefgh""#).unwrap().prompt_tokens(), 2);
        let ids = Summary::of("[1, 2, 3]").unwrap();
        assert_eq!(ids.prompt_tokens(), 3, "one token per id, no per-message overhead");
        assert_eq!(ids.first_without_role, Some(0), "a token id is not a message");
        assert_eq!(Summary::of("null").unwrap().prompt_tokens(), 0);
    }
}
