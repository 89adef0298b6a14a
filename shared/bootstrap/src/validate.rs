//! Checks shared by every service's request validation.
//!
//! Each check records a field violation in a [`FieldViolations`] instead of
//! stopping at the first problem, so a caller learns everything wrong with a
//! request at once, and returns the value it read; a value is only used once
//! [`FieldViolations::check`] passed.

use base64::Engine as _;
use uuid::Uuid;

use crate::grpc::FieldViolations;

/// Page size when the request sets none.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// Checks a required UUID.
pub fn uuid(field: &str, value: &str, violations: &mut FieldViolations) -> Uuid {
    if value.is_empty() {
        violations.add(field, "is required");
        return Uuid::nil();
    }
    Uuid::try_parse(value).unwrap_or_else(|_| {
        violations.add(field, "must be a UUID");
        Uuid::nil()
    })
}

/// Checks an optional UUID: empty means absent.
pub fn optional_uuid(field: &str, value: &str, violations: &mut FieldViolations) -> Option<Uuid> {
    (!value.is_empty()).then(|| uuid(field, value, violations))
}

/// Checks an expected version: a version the caller has seen, so at least 1.
pub fn expected_version(field: &str, value: i64, violations: &mut FieldViolations) -> i64 {
    if value < 1 {
        violations.add(field, "must be the version last read (1 or more)");
    }
    value
}

/// Checks a page size: 1 to 1000 when set, the default when unset.
pub fn page_size(field: &str, value: Option<i32>, violations: &mut FieldViolations) -> i64 {
    match value {
        None => DEFAULT_PAGE_SIZE,
        Some(size) if (1..=MAX_PAGE_SIZE).contains(&size) => i64::from(size),
        Some(_) => {
            violations.add(field, format!("must be between 1 and {MAX_PAGE_SIZE}"));
            DEFAULT_PAGE_SIZE
        }
    }
}

/// The opaque token of the page after `last_id`.
pub fn page_token(last_id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id.as_bytes())
}

/// Checks a page token from [`page_token`]; empty means the first page.
pub fn page_after(field: &str, token: &str, violations: &mut FieldViolations) -> Option<Uuid> {
    if token.is_empty() {
        return None;
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok());
    if decoded.is_none() {
        violations.add(field, "is not a token from a previous response");
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        let mut v = FieldViolations::new();
        assert_eq!(page_after("page_token", &page_token(id), &mut v), Some(id));
        assert!(v.is_empty());
        assert_eq!(page_after("page_token", "not-a-token!", &mut v), None);
        assert_eq!(v.fields().collect::<Vec<_>>(), ["page_token"]);
    }

    #[test]
    fn page_size_defaults_when_unset_and_is_bounded_when_set() {
        let mut v = FieldViolations::new();
        assert_eq!(page_size("page_size", None, &mut v), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size("page_size", Some(1000), &mut v), 1000);
        assert!(v.is_empty());
        page_size("page_size", Some(0), &mut v);
        page_size("page_size", Some(1001), &mut v);
        page_size("page_size", Some(-5), &mut v);
        assert_eq!(v.fields().count(), 3);
    }
}
