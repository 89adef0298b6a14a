//! Reading settings from environment variables.
//!
//! Each service owns one typed settings struct; these helpers read and check
//! its fields so a bad value fails at start-up with the variable's name in the
//! message.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
pub use secrecy::{ExposeSecret, SecretString};

/// The value of `name`, or `default` when it is unset or empty.
pub fn string(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Like [`string`], for a value that must never be printed (a URL with a
/// password).
pub fn secret(name: &str, default: &str) -> SecretString {
    SecretString::from(string(name, default))
}

/// The value of `name` parsed as `T`, or `default` when it is unset or empty.
pub fn parse<T>(name: &str, default: T) -> anyhow::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .with_context(|| format!("invalid value {value:?} for {name}")),
        _ => Ok(default),
    }
}

/// A duration in milliseconds from `name`, or `default`.
pub fn millis(name: &str, default: Duration) -> anyhow::Result<Duration> {
    let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    parse(name, default).map(Duration::from_millis)
}

/// A boolean from `name` (`true`/`false`, `1`/`0`), or `default`.
pub fn flag(name: &str, default: bool) -> anyhow::Result<bool> {
    match string(name, "").to_ascii_lowercase().as_str() {
        "" => Ok(default),
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => anyhow::bail!("invalid value {other:?} for {name}: expected true or false"),
    }
}

/// A URL with its password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// A comma-separated list of durations in milliseconds from `name`
/// (`1000,10000,60000`), or `default`.
pub fn millis_list(name: &str, default: &[Duration]) -> anyhow::Result<Vec<Duration>> {
    let value = string(name, "");
    if value.is_empty() {
        return Ok(default.to_vec());
    }
    value
        .split(',')
        .map(|part| {
            part.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .with_context(|| {
                    format!("invalid value {value:?} for {name}: expected milliseconds like 1000,10000")
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_url_hides_the_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/users"),
            "postgres://app:***@db:5432/users"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://localhost/users"),
            "postgres://localhost/users"
        );
        assert_eq!(redact_url("not a url"), "***");
    }
}
