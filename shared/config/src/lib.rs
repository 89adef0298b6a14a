//! Typed settings for every part of the system, read from environment
//! variables (and the same names as command-line flags) through `clap`.
//!
//! Each library declares the settings it needs as a struct deriving
//! [`clap::Args`], each field with its variable, its default and its
//! parser written once, on the field. The service host flattens those
//! structs into one command line per binary, so `--help` lists every
//! variable with its default, a bad value stops start-up with one line that
//! names the variable ([`one_line_error`]), and `--print-config` shows every
//! setting with where its value came from ([`describe`]). Libraries never
//! read the environment themselves: they take the parsed structs as
//! arguments, and tests build them with [`defaults`] and change fields.
//!
//! `clap` was chosen over `figment` and `config`: it is already the
//! workspace's command-line parser, reads environment variables per field,
//! knows where every value came from (default, environment, flag), and gives
//! flags for free (`shop up` runs two services in one process by passing
//! each its own `--grpc-addr`). The file-based layering the other two offer
//! is not needed by twelve-factor services.
//!
//! # Conventions
//!
//! - Durations are written with a unit: `250ms`, `10s`, `5m`, `24h`
//!   ([`duration`]); variables holding one have no unit in their name.
//! - Sizes and counts are plain whole numbers with a range.
//! - Secrets ([`SecretString`]) never print: their arguments are marked
//!   `hide_env_values`, and [`describe`] shows URLs with the password
//!   replaced, in the user part and in the query string alike
//!   ([`redact_url`]).
//! - A secret can also be read from a file: `DATABASE_URL_FILE=/run/secrets/x`
//!   instead of `DATABASE_URL=…`, so that neither compose nor Kubernetes
//!   has to put it in a plain environment variable ([`secret_file`]). The
//!   file wins over the variable's default; giving both the variable and its
//!   `_FILE` is an error that names both ([`one_line_error`]), as neither
//!   can be said to be meant. The file is read once, at start-up: a rotated
//!   secret takes effect at the next start.
#![forbid(unsafe_code)]

use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};
pub use secrecy::{ExposeSecret, SecretString};

/// Parses a duration with a unit (`500ms`, `10s`, `5m`, `24h`, `1h 30m`).
/// Zero and plain numbers are refused, so a forgotten unit is not read as
/// seconds or milliseconds by surprise.
pub fn duration(value: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a duration with a unit, such as 250ms, 10s, 5m or 24h";
    let value = value.trim();
    if value.parse::<f64>().is_ok() {
        return Err(format!("{value:?} has no unit: {EXPECTED}"));
    }
    let parsed = humantime::parse_duration(value).map_err(|_| EXPECTED.to_owned())?;
    if parsed.is_zero() {
        return Err(format!("must be longer than zero: {EXPECTED}"));
    }
    // Far beyond any sensible setting, and far below what makes deadline
    // arithmetic overflow.
    if parsed > Duration::from_secs(10 * 365 * 24 * 3600) {
        return Err("must be at most ten years".to_owned());
    }
    Ok(parsed)
}

/// Parses a comma-separated list of durations (`1s,10s,60s`); an empty
/// value is an empty list.
pub fn durations(value: &str) -> Result<Vec<Duration>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value.split(',').map(duration).collect()
}

/// Parses a secret (a URL with a password): kept out of logs and `Debug`.
pub fn secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

/// Reads a secret from the file at `path` (a `*_FILE` setting): its content
/// without the trailing line break, refused when empty. The error names the
/// path, never the content.
pub fn secret_file(path: &str) -> Result<SecretString, String> {
    read_secret_file(path).and_then(|text| secret(&text))
}

/// The text of the secret file at `path`, for a setting whose parser checks
/// more than [`secret`] does: parse it with that parser.
pub fn read_secret_file(path: &str) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path.trim()).map_err(|error| format!("cannot read {path}: {error}"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Query parameters whose values are secrets wherever they appear in a URL
/// (libpq's `password` and `sslpassword`, and the usual names of tokens and
/// keys); compared case-insensitively, as substrings.
const SECRET_PARAMETERS: [&str; 6] = ["password", "passwd", "pwd", "secret", "token", "credential"];

/// A URL with its password replaced by `***`, in the user part and in every
/// query parameter that holds one (`?password=`, `?sslpassword=`, …), for
/// logs and `--print-config`; a value that does not parse as a URL (a
/// `key=value` connection string, say) is hidden whole.
/// A comma-separated list of URLs (`AMQP_URL` naming several brokers) is
/// redacted entry by entry: parsed whole, every password after the first
/// would be read as part of the first URL's path and shown.
pub fn redact_url(value: &str) -> String {
    value.split(',').map(redact_one_url).collect::<Vec<_>>().join(",")
}

fn redact_one_url(value: &str) -> String {
    match url::Url::parse(value.trim()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Only fails for URLs that cannot have a password at all.
                let _ = parsed.set_password(Some("***"));
            }
            if parsed.query().is_some() {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(key, value)| {
                        let lower = key.to_ascii_lowercase();
                        let hidden = SECRET_PARAMETERS.iter().any(|secret| lower.contains(secret));
                        let value = if hidden {
                            "***".to_owned()
                        } else {
                            value.into_owned()
                        };
                        (key.into_owned(), value)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "***".to_owned(),
    }
}

/// `T` with every field at its declared default, ignoring the environment:
/// what a library's tests and tools start from.
///
/// # Panics
///
/// When a field of `T` has no default and is not optional: a mistake in the
/// declaration, caught by every crate's `defaults_parse` test.
#[allow(clippy::expect_used)]
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = without_environment(T::augment_args(Command::new("defaults")));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting declares a default");
    T::from_arg_matches(&matches).expect("defaults fit their fields")
}

/// `command` with every argument's environment variable removed.
pub fn without_environment(command: Command) -> Command {
    command.mut_args(|arg| arg.env(None::<&'static str>))
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The declared default.
    Default,
    /// Its environment variable.
    Environment,
    /// A command-line flag.
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Environment => "environment",
            Self::Flag => "flag",
        })
    }
}

/// One setting as parsed: its variable, its value as text (secrets
/// redacted) and where the value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The environment variable.
    pub variable: String,
    /// The value as given (`(unset)` for an optional setting without one).
    pub value: String,
    /// Where it came from; `None` when unset.
    pub source: Option<Source>,
}

/// Every setting of `command` (arguments with an environment variable) as
/// parsed into `matches`, in declaration order. A secret read from its
/// `*_FILE` shows as `(read from X_FILE)`, with the file's source.
pub fn describe(command: &Command, matches: &ArgMatches) -> Vec<Setting> {
    let mut settings = describe_each(command, matches);
    let from_files: Vec<(String, Option<Source>)> = settings
        .iter()
        .filter(|setting| setting.source.is_some())
        .filter_map(|setting| {
            let base = setting.variable.strip_suffix("_FILE")?;
            Some((base.to_owned(), setting.source))
        })
        .collect();
    for (base, source) in from_files {
        if let Some(setting) = settings.iter_mut().find(|setting| setting.variable == base) {
            setting.value = format!("(read from {base}_FILE)");
            setting.source = source;
        }
    }
    settings
}

fn describe_each(command: &Command, matches: &ArgMatches) -> Vec<Setting> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let variable = arg.get_env()?.to_string_lossy().into_owned();
            let id = arg.get_id().as_str();
            let raw = matches.get_raw(id).map(|values| {
                values
                    .map(|value| value.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let source = matches.value_source(id).map(|source| match source {
                ValueSource::DefaultValue => Source::Default,
                ValueSource::EnvVariable => Source::Environment,
                _ => Source::Flag,
            });
            let value = match raw {
                None => "(unset)".to_owned(),
                Some(value) if arg.is_hide_env_values_set() => redact_url(&value),
                Some(value) => value,
            };
            Some(Setting {
                variable,
                value,
                source,
            })
        })
        .collect()
}

/// Every environment variable `command` reads, in declaration order.
pub fn variables(command: &Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

/// A parse failure of `command` as one line naming the variable, the value
/// and what is accepted, e.g. `DATABASE_POOL_SIZE="many" (--database-pool-size):
/// invalid digit found in string`. Help and version requests are not
/// failures and are not passed here.
pub fn one_line_error(command: &Command, error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};

    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(text)) => Some(text.clone()),
        Some(ContextValue::Strings(list)) => Some(list.join(", ")),
        _ => None,
    };
    let Some(flag) = context(ContextKind::InvalidArg) else {
        return first_line(error);
    };
    let name = named(command, &flag);
    match error.kind() {
        ErrorKind::ArgumentConflict => {
            let other = context(ContextKind::PriorArg)
                .map_or_else(|| "another setting".to_owned(), |prior| named(command, &prior));
            format!("{name} and {other} are both set: set only one of them")
        }
        ErrorKind::MissingRequiredArgument => {
            format!("{name} must be set as well: another setting that needs it is set")
        }
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let why = match (context(ContextKind::ValidValue), std::error::Error::source(error)) {
                (Some(valid), _) => format!("accepted values: {valid}"),
                (None, Some(source)) => source.to_string(),
                (None, None) if secret_setting(command, &flag) => "not accepted".to_owned(),
                (None, None) => first_line(error),
            };
            // A secret's value (a URL with its password) is never echoed:
            // the line goes to logs. Its parser names what is wrong without
            // the credentials.
            if secret_setting(command, &flag) {
                format!("invalid value for {name}: {why}")
            } else {
                let value = context(ContextKind::InvalidValue).unwrap_or_default();
                format!("invalid value {value:?} for {name}: {why}")
            }
        }
        _ => format!("{name}: {}", first_line(error)),
    }
}

/// Whether the argument clap names as `--flag <VALUE>` holds a secret (its
/// environment value is hidden from the help).
fn secret_setting(command: &Command, flag: &str) -> bool {
    let long = flag
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches('-');
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .is_some_and(clap::Arg::is_hide_env_values_set)
}

/// `VARIABLE (--flag)` for the argument clap names as `--flag <VALUE>`.
fn named(command: &Command, flag: &str) -> String {
    let long = flag
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches('-');
    let variable = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned());
    match variable {
        Some(variable) => format!("{variable} (--{long})"),
        None => format!("--{long}"),
    }
}

fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, clap::Args)]
    struct Example {
        /// A duration.
        #[arg(long = "example-wait", env = "EXAMPLE_WAIT", default_value = "10s", value_parser = duration)]
        wait: Duration,
        /// A count.
        #[arg(long = "example-count", env = "EXAMPLE_COUNT", default_value_t = 4,
              value_parser = clap::value_parser!(u16).range(1..=100))]
        count: u16,
        /// A secret.
        #[arg(long = "example-url", env = "EXAMPLE_URL", hide_env_values = true,
              default_value = "amqp://guest:guest@localhost:5672/%2f", value_parser = secret)]
        url: SecretString,
        /// A choice.
        #[arg(long = "example-format", env = "EXAMPLE_FORMAT", default_value = "text")]
        format: Format,
        /// A secret number.
        #[arg(
            long = "example-pin",
            env = "EXAMPLE_PIN",
            hide_env_values = true,
            default_value_t = 1
        )]
        pin: u16,
    }

    #[derive(Debug, Clone, Copy, clap::ValueEnum)]
    enum Format {
        Text,
        Json,
    }

    fn command() -> Command {
        // The EXAMPLE_* variables are set nowhere.
        Example::augment_args(Command::new("example"))
    }

    #[test]
    fn durations_need_a_unit_and_a_sensible_size() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration(" 24h "), Ok(Duration::from_secs(86400)));
        assert!(duration("10").unwrap_err().contains("no unit"));
        assert!(duration("-5s").is_err());
        assert!(duration("0s").is_err());
        assert!(duration("18446744073709551615s").is_err());
        assert_eq!(
            durations("1s,10s"),
            Ok(vec![Duration::from_secs(1), Duration::from_secs(10)])
        );
        assert_eq!(durations(""), Ok(Vec::new()));
    }

    #[test]
    fn defaults_ignore_the_environment() {
        let example: Example = defaults();
        assert_eq!(example.wait, Duration::from_secs(10));
        assert_eq!(example.count, 4);
    }

    #[test]
    fn describe_names_every_variable_with_its_source_and_hides_passwords() {
        let command = command();
        let matches = command
            .clone()
            .try_get_matches_from(["example", "--example-count", "7"])
            .unwrap();
        let settings = describe(&command, &matches);
        let get = |name: &str| settings.iter().find(|s| s.variable == name).unwrap().clone();
        assert_eq!(get("EXAMPLE_COUNT").value, "7");
        assert_eq!(get("EXAMPLE_COUNT").source, Some(Source::Flag));
        assert_eq!(get("EXAMPLE_WAIT").source, Some(Source::Default));
        assert_eq!(get("EXAMPLE_URL").value, "amqp://guest:***@localhost:5672/%2f");
        assert_eq!(
            variables(&command),
            [
                "EXAMPLE_WAIT",
                "EXAMPLE_COUNT",
                "EXAMPLE_URL",
                "EXAMPLE_FORMAT",
                "EXAMPLE_PIN"
            ]
        );
    }

    #[test]
    fn a_bad_value_is_one_line_naming_the_variable_and_what_is_accepted() {
        let command = command();
        let line = |args: &[&str]| {
            let error = command.clone().try_get_matches_from(args).unwrap_err();
            one_line_error(&command, &error)
        };
        let count = line(&["example", "--example-count", "many"]);
        assert!(
            count.starts_with("invalid value \"many\" for EXAMPLE_COUNT (--example-count)"),
            "{count}"
        );
        assert!(!count.contains('\n'));
        let wait = line(&["example", "--example-wait=-3s"]);
        assert!(
            wait.contains("EXAMPLE_WAIT") && wait.contains("such as 250ms"),
            "{wait}"
        );
        let pin = line(&["example", "--example-pin", "s3cret"]);
        assert!(
            pin.starts_with("invalid value for EXAMPLE_PIN (--example-pin):") && !pin.contains("s3cret"),
            "{pin}"
        );
        let format = line(&["example", "--example-format", "xml"]);
        assert!(
            format.contains("EXAMPLE_FORMAT") && format.contains("text, json"),
            "{format}"
        );
    }

    #[test]
    fn redact_url_hides_the_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/users"),
            "postgres://app:***@db:5432/users"
        );
        assert_eq!(
            redact_url("postgres://localhost/users"),
            "postgres://localhost/users"
        );
        assert_eq!(redact_url("not a url"), "***");
    }

    #[test]
    fn redact_url_hides_passwords_in_the_query_string_too() {
        assert_eq!(
            redact_url("postgres://app@db/users?sslmode=require&password=s3cret&sslpassword=k3y"),
            "postgres://app@db/users?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("amqps://u:p@mq/%2f?auth_token=abc&heartbeat=5"),
            "amqps://u:***@mq/%2f?auth_token=***&heartbeat=5"
        );
        assert_eq!(redact_url("host=db user=app password=s3cret"), "***");
    }

    #[test]
    fn a_secret_file_is_read_without_its_line_break_and_never_echoed() {
        let dir = std::env::temp_dir().join(format!("shop-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("url");
        std::fs::write(&path, "amqp://u:s3cret@mq/%2f\n").unwrap();
        let read = secret_file(path.to_str().unwrap()).unwrap();
        assert_eq!(read.expose_secret(), "amqp://u:s3cret@mq/%2f");
        std::fs::write(&path, "\n").unwrap();
        let empty = secret_file(path.to_str().unwrap()).unwrap_err();
        assert_eq!(empty, "must not be empty");
        let missing = secret_file("/nonexistent/shop-secret").unwrap_err();
        assert!(
            missing.starts_with("cannot read /nonexistent/shop-secret"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[derive(Debug, Clone, clap::Args)]
    struct WithFile {
        /// A secret.
        #[arg(long = "example-url", env = "EXAMPLE_URL", hide_env_values = true,
              default_value = "amqp://guest:guest@localhost:5672/%2f", value_parser = secret)]
        url: SecretString,
        /// The same secret, from a file.
        #[arg(long = "example-url-file", env = "EXAMPLE_URL_FILE", value_name = "PATH",
              conflicts_with = "url", value_parser = secret_file)]
        url_from_file: Option<SecretString>,
    }

    #[test]
    fn a_secret_and_its_file_both_set_is_one_line_naming_both() {
        let dir = std::env::temp_dir().join(format!("shop-config-both-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("url");
        std::fs::write(&path, "amqp://u:s3cret@mq/%2f").unwrap();
        let command = WithFile::augment_args(Command::new("example"));
        let error = command
            .clone()
            .try_get_matches_from([
                "example",
                "--example-url",
                "amqp://x:s3cret@h/",
                "--example-url-file",
                path.to_str().unwrap(),
            ])
            .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let line = one_line_error(&command, &error);
        assert!(line.contains("EXAMPLE_URL_FILE (--example-url-file)"), "{line}");
        assert!(line.contains("EXAMPLE_URL (--example-url)"), "{line}");
        assert!(!line.contains("s3cret") && !line.contains('\n'), "{line}");
    }

    #[test]
    fn describe_shows_a_secret_read_from_its_file_as_such() {
        let dir = std::env::temp_dir().join(format!("shop-config-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("url");
        std::fs::write(&path, "amqp://u:s3cret@mq/%2f").unwrap();
        let command = WithFile::augment_args(Command::new("example"));
        let matches = command
            .clone()
            .try_get_matches_from(["example", "--example-url-file", path.to_str().unwrap()])
            .unwrap();
        let settings = describe(&command, &matches);
        let url = settings.iter().find(|s| s.variable == "EXAMPLE_URL").unwrap();
        assert_eq!(url.value, "(read from EXAMPLE_URL_FILE)");
        assert_eq!(url.source, Some(Source::Flag));
        assert!(settings.iter().all(|s| !s.value.contains("s3cret")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn redact_url_hides_every_password_of_a_list() {
        assert_eq!(
            redact_url("amqp://u:first@rabbit-1:5672/%2f,amqp://u:second@rabbit-2:5672/%2f"),
            "amqp://u:***@rabbit-1:5672/%2f,amqp://u:***@rabbit-2:5672/%2f"
        );
    }

    proptest::proptest! {
        #[test]
        fn redacted_urls_never_contain_the_password(password in "[a-zA-Z0-9]{6,20}") {
            let url = format!("amqp://user:{password}@host:5672/%2f");
            proptest::prop_assert!(!redact_url(&url).contains(&password));
        }

        #[test]
        fn redacted_url_lists_never_contain_a_password(
            passwords in proptest::collection::vec("[a-zA-Z0-9]{6,20}", 1..4),
        ) {
            let list = passwords
                .iter()
                .enumerate()
                .map(|(i, password)| format!("amqp://user:{password}@rabbit-{i}:5672/%2f"))
                .collect::<Vec<_>>()
                .join(",");
            let redacted = redact_url(&list);
            for password in &passwords {
                proptest::prop_assert!(!redacted.contains(password.as_str()), "{}", redacted);
            }
        }
    }
}
