//! Identifiers and positions: tenant, branch and device names, SKUs, the log epoch, and the
//! `(epoch, seq)` position that every resume and cursor is made of.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest tenant, branch or device name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest SKU, in bytes.
pub const MAX_SKU_LEN: usize = 64;

/// Why a name, SKU or epoch was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value was empty.
    #[error("{what} must not be empty")]
    Empty {
        /// Which kind of identifier.
        what: &'static str,
    },
    /// The value was longer than its limit.
    #[error("{what} is {len} bytes, longer than {max}")]
    TooLong {
        /// Which kind of identifier.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value held a character its kind does not allow.
    #[error("{what} contains {ch:?}; {allowed}")]
    BadChar {
        /// Which kind of identifier.
        what: &'static str,
        /// The first offending character.
        ch: char,
        /// What is allowed, in words.
        allowed: &'static str,
    },
    /// An epoch that is not 1 to 16 hex digits.
    #[error("epoch must be 1 to 16 hexadecimal digits")]
    BadEpoch,
}

/// A tenant, branch or device name: 1 to 64 ASCII letters, digits, `_`, `-` or `.`.
///
/// Names appear in URL paths and storage keys, so the alphabet is deliberately small. They are
/// shared, not copied: every event carries its branch and device, so a clone is a reference
/// count, not an allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    /// Checks `s` and wraps it.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_len("name", &s, MAX_NAME_LEN)?;
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(IdError::BadChar {
                what: "name",
                ch,
                allowed: "names allow ASCII letters, digits, '_', '-' and '.'",
            });
        }
        Ok(Self(Arc::from(s)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A branch of a tenant: the unit of sequencing, storage and fan-out, written `tenant/branch`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    /// The tenant.
    pub tenant: Name,
    /// The branch.
    pub branch: Name,
}

impl BranchKey {
    /// The branch `branch` of `tenant`.
    pub fn new(tenant: Name, branch: Name) -> Self {
        Self { tenant, branch }
    }

    /// Parses `tenant/branch`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (tenant, branch) = s.split_once('/').ok_or(IdError::Empty { what: "branch" })?;
        Ok(Self::new(Name::new(tenant)?, Name::new(branch)?))
    }
}

impl fmt::Display for BranchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.branch)
    }
}

impl fmt::Debug for BranchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BranchKey({self})")
    }
}

/// A stock-keeping unit code: 1 to 64 bytes of UTF-8 without control characters. Shared like
/// [`Name`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sku(Arc<str>);

impl Sku {
    /// Checks `s` and wraps it.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_len("sku", &s, MAX_SKU_LEN)?;
        if let Some(ch) = s.chars().find(|c| c.is_control()) {
            return Err(IdError::BadChar {
                what: "sku",
                ch,
                allowed: "SKUs allow any character but control characters",
            });
        }
        Ok(Self(Arc::from(s)))
    }

    /// The SKU as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(Name);
string_id!(Sku);

/// The identity of one branch log: a random 64-bit id made when the log is created.
///
/// A position is only meaningful together with its epoch: a log that is reset or restored
/// elsewhere gets a new epoch, and a client holding a position of another epoch must resync.
/// On the wire it is a string of 16 lowercase hexadecimal digits (so that JavaScript clients,
/// whose numbers stop being exact at 2^53, can hold it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({self})")
    }
}

impl FromStr for Epoch {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::BadEpoch);
        }
        u64::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|_| IdError::BadEpoch)
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A place in a branch log: the last event a reader has, as `(epoch, seq)`.
///
/// `seq` 0 means "before the first event". Resuming from a position delivers every event with
/// a greater `seq`, in order, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The log this position belongs to.
    pub epoch: Epoch,
    /// The last sequence number the reader has (0 for none).
    pub seq: u64,
}

impl Position {
    /// A position in `epoch` after event `seq`.
    pub fn new(epoch: Epoch, seq: u64) -> Self {
        Self { epoch, seq }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Unix time in milliseconds, as every timestamp on the wire is.
pub type UnixMillis = i64;

/// The current Unix time in milliseconds.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_documented_alphabet_only() {
        assert!(Name::new("branch-01.north_A").is_ok());
        assert_eq!(Name::new(""), Err(IdError::Empty { what: "name" }));
        assert!(matches!(
            Name::new("a/b"),
            Err(IdError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(
            Name::new("a".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
        assert!(Name::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn skus_allow_unicode_but_not_control_characters() {
        assert!(Sku::new("CAFÉ-250g").is_ok());
        assert!(matches!(
            Sku::new("a\nb"),
            Err(IdError::BadChar { ch: '\n', .. })
        ));
    }

    #[test]
    fn epoch_is_sixteen_hex_digits_on_the_wire() {
        let e = Epoch(0x00ab_cdef_0123_4567);
        assert_eq!(e.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<Epoch>(), Ok(e));
        assert_eq!("ABCDEF".parse::<Epoch>(), Ok(Epoch(0xabcdef)));
        assert_eq!("".parse::<Epoch>(), Err(IdError::BadEpoch));
        assert_eq!("0x12".parse::<Epoch>(), Err(IdError::BadEpoch));
        assert_eq!("1".repeat(17).parse::<Epoch>(), Err(IdError::BadEpoch));
    }
}
