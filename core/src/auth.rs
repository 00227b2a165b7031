//! Consumer authentication: which credential header a client used, the SHA-256 of the key, and
//! the lookup of the consumer it belongs to. Keys are only ever held as hashes.

use sha2::{Digest, Sha256};

use crate::http::HeaderLookup;

/// SHA-256 of a consumer key. The config stores these, never the keys.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex digits, either case.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let &[hi, lo] = pair else { return None };
            *slot = (hex_digit(hi)? << 4) | hex_digit(lo)?;
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The first eight bytes, used to index stored hashes without comparing them whole.
    pub fn prefix(&self) -> u64 {
        let mut p = [0u8; 8];
        p.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(p)
    }

    /// Equality whose running time does not depend on where the hashes differ.
    pub fn ct_eq(&self, other: &Self) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not a secret, but printing a prefix is enough to tell keys apart.
        write!(f, "KeyHash({:08x}…)", self.prefix() >> 32)
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The consumer key a request presents: `Authorization: Bearer K`, else `x-api-key`, else
/// `api-key` (the Azure OpenAI convention), so OpenAI, Anthropic and Azure SDKs all work.
pub fn presented_key<H: HeaderLookup + ?Sized>(headers: &H) -> Option<&str> {
    if let Some((scheme, key)) = headers
        .header("authorization")
        .and_then(|v| v.trim().split_once(' '))
    {
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(key.trim()).filter(|k| !k.is_empty());
        }
    }
    headers
        .header("x-api-key")
        .or_else(|| headers.header("api-key"))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http::test_headers as h;

    #[test]
    fn hash_round_trips_through_hex() {
        let k = KeyHash::of("tg-demo-key");
        assert_eq!(KeyHash::from_hex(&k.to_hex()), Some(k));
        assert_eq!(KeyHash::from_hex(&k.to_hex().to_uppercase()), Some(k));
        assert_eq!(KeyHash::from_hex("abc"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
        // Known vector: sha256("abc").
        assert_eq!(
            KeyHash::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ct_eq_matches_eq() {
        let a = KeyHash::of("a");
        let b = KeyHash::of("b");
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn credential_headers_in_order() {
        assert_eq!(
            presented_key(&h(&[("Authorization", "Bearer k1")])),
            Some("k1")
        );
        assert_eq!(
            presented_key(&h(&[("authorization", "bearer  k1 ")])),
            Some("k1")
        );
        assert_eq!(presented_key(&h(&[("x-api-key", "k2")])), Some("k2"));
        assert_eq!(presented_key(&h(&[("api-key", "k3")])), Some("k3"));
        assert_eq!(
            presented_key(&h(&[("authorization", "Basic abc"), ("x-api-key", "k2")])),
            Some("k2")
        );
        assert_eq!(presented_key(&h(&[("authorization", "Bearer ")])), None);
        // A multi-byte character where "Bearer " would end must not split a char.
        assert_eq!(presented_key(&h(&[("authorization", "Beareré x")])), None);
        assert_eq!(presented_key(&h(&[("authorization", "ééééé")])), None);
        assert_eq!(presented_key(&h(&[("authorization", "Bearer")])), None);
        assert_eq!(presented_key(&h(&[])), None);
    }
}
