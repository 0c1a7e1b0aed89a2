//! `Deserialize` for [`Objective`] that names the field in every error.
//!
//! serde's derived internally tagged enums buffer the table before dispatching on `type`, and a
//! type error inside the buffered table (`beta = "two"`) then reaches the user without the
//! field's name. Objective parameters are all scalars, so this buffers `key = scalar` entries
//! itself, hands them to the objective the `type` names (the dispatch is generated with the
//! enum), and prefixes each value's error with its key.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

use crate::Objective;

/// One buffered scalar.
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, boolean or string")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v).map(Scalar::Int).map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Error type of the buffered deserializer.
#[derive(Debug)]
struct FieldError(String);

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FieldError {}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// A buffered value that knows its key, so errors can name it.
struct KeyedScalar {
    key: String,
    value: Scalar,
}

impl<'de> Deserializer<'de> for KeyedScalar {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        let result: Result<V::Value, FieldError> = match self.value {
            Scalar::Bool(v) => visitor.visit_bool(v),
            Scalar::Int(v) => visitor.visit_i64(v),
            Scalar::Float(v) => visitor.visit_f64(v),
            Scalar::Str(v) => visitor.visit_str(&v),
        };
        result.map_err(|e| FieldError(format!("field `{}`: {e}", self.key)))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        let key = self.key;
        match self.value {
            Scalar::Str(s) => visitor
                .visit_enum(s.into_deserializer())
                .map_err(|e: FieldError| FieldError(format!("field `{key}`: {e}"))),
            _ => Err(FieldError(format!("field `{key}`: expected a string naming a variant"))),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl IntoDeserializer<'_, FieldError> for KeyedScalar {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// The buffered table as a map for the parameter struct's derived `Deserialize`.
struct Entries(std::vec::IntoIter<(String, Scalar)>, Option<KeyedScalar>);

impl<'de> MapAccess<'de> for Entries {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, FieldError> {
        match self.0.next() {
            Some((key, value)) => {
                let k = seed.deserialize(key.as_str().into_deserializer())?;
                self.1 = Some(KeyedScalar { key, value });
                Ok(Some(k))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, FieldError> {
        let value = self.1.take().ok_or_else(|| FieldError("value requested before key".into()))?;
        seed.deserialize(value)
    }
}

struct EntriesDeserializer(Vec<(String, Scalar)>);

impl<'de> Deserializer<'de> for EntriesDeserializer {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(Entries(self.0.into_iter(), None))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Objective;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an objective table with a `type` field")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Objective, A::Error> {
                let mut kind = None;
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: Scalar = map.next_value()?;
                    if key == "type" {
                        match value {
                            Scalar::Str(s) => kind = Some(s),
                            _ => return Err(de::Error::custom("field `type`: expected a string")),
                        }
                    } else {
                        entries.push((key, value));
                    }
                }
                let kind = kind.ok_or_else(|| {
                    de::Error::custom(format!("missing field `type` (one of {})", Objective::NAMES.join(", ")))
                })?;
                let parsed = Objective::deserialize_params(&kind, EntriesDeserializer(entries)).ok_or_else(|| {
                    de::Error::custom(format!(
                        "unknown objective type `{kind}`, expected one of {}",
                        Objective::NAMES.join(", ")
                    ))
                })?;
                parsed.map_err(|e| de::Error::custom(format!("objective `{kind}`: {e}")))
            }
        }
        d.deserialize_map(V)
    }
}
