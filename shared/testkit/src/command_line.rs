//! Checks of a service binary's command line, as an operator meets it
//! before anything runs: help, version, the configuration it would use, and
//! what a bad setting does.

use std::process::{Command, Output};

fn run(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary);
    command.args(args).env_clear();
    // Only what the binary needs to start at all; none of the caller's
    // settings leak in.
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (key, value) in envs {
        command.env(key, value);
    }
    #[allow(clippy::expect_used)]
    command.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `binary` answers `--help` (exit 0, every variable of
/// `variables` listed), `--version`, and `--print-config` (every setting
/// with its source, the database password hidden); and that each bad
/// setting stops it before it starts, exit 2, with one line naming the
/// variable (and never a secret's value).
///
/// # Panics
///
/// When any of that does not hold.
pub fn assert_command_line(binary: &str, variables: &[&str]) {
    let help = run(binary, &["--help"], &[]);
    assert!(help.status.success(), "--help failed: {help:?}");
    let help_text = text(&help.stdout);
    assert!(help_text.contains("Usage:"), "{help_text}");
    for variable in variables {
        assert!(
            help_text.contains(variable),
            "--help does not list {variable}:\n{help_text}"
        );
    }
    for subcommand in ["serve", "relay", "healthcheck"] {
        assert!(
            help_text.contains(subcommand),
            "--help does not list {subcommand}"
        );
    }

    let version = run(binary, &["--version"], &[]);
    assert!(version.status.success(), "--version failed: {version:?}");
    assert!(text(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    let printed = run(
        binary,
        &["--print-config"],
        &[
            ("DATABASE_URL", "postgres://app:hunter2-secret@db:5432/app"),
            ("RELAY_LANES", "4"),
        ],
    );
    assert!(printed.status.success(), "--print-config failed: {printed:?}");
    let config = text(&printed.stdout);
    assert!(
        !config.contains("hunter2-secret"),
        "the password printed:\n{config}"
    );
    assert!(
        config.contains("DATABASE_URL=postgres://app:***@db:5432/app"),
        "{config}"
    );
    assert!(
        config
            .lines()
            .any(|line| line.starts_with("RELAY_LANES=4") && line.ends_with("# environment")),
        "{config}"
    );
    assert!(
        config
            .lines()
            .any(|line| line.starts_with("DATABASE_POOL_SIZE=16") && line.ends_with("# default")),
        "{config}"
    );
    for variable in variables {
        assert!(
            config.contains(&format!("{variable}=")),
            "--print-config does not show {variable}:\n{config}"
        );
    }

    for (variable, value) in [
        ("DATABASE_POOL_SIZE", "many"),
        ("SHUTDOWN_GRACE", "-5s"),
        ("OUTBOX_RETENTION", "18446744073709551615s"),
        ("RELAY_POLL_INTERVAL", "1000"),
        ("LOG_FORMAT", "xml"),
        ("GRPC_ADDR", "not-an-address"),
        ("RELAY_ENABLED", "maybe"),
    ] {
        let refused = run(binary, &[], &[(variable, value)]);
        let stderr = text(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{variable}={value}: {refused:?}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{variable}={value}: not one line:\n{stderr}"
        );
        assert!(
            stderr.contains(variable),
            "{variable}={value}: the line does not name it: {stderr}"
        );
        assert!(
            stderr.contains(value),
            "{variable}={value}: the line does not show the value: {stderr}"
        );
    }
    // A secret's bad value is refused the same way, without being echoed:
    // the line goes to logs.
    let bad_url = run(
        binary,
        &[],
        &[("AMQP_URL", "amqp://app:hunter2-secret@broker:5672/%2f,not a url")],
    );
    let stderr = text(&bad_url.stderr);
    assert_eq!(bad_url.status.code(), Some(2), "bad AMQP_URL: {bad_url:?}");
    assert!(
        stderr.contains("AMQP_URL") && !stderr.contains("hunter2-secret"),
        "bad AMQP_URL: {stderr}"
    );
    let half_tls = run(binary, &[], &[("GRPC_TLS_CERT", "/tmp/cert.pem")]);
    assert_eq!(half_tls.status.code(), Some(2), "{half_tls:?}");
    assert!(text(&half_tls.stderr).contains("GRPC_TLS_KEY"), "{half_tls:?}");

    // Every relay signs: serving (which runs the relay) and `relay` refuse
    // to start without the producer's key, in one line naming the setting.
    for args in [&[][..], &["relay"]] {
        assert_refused(binary, args, &[], "EVENT_SIGNING_KEY_FILE");
    }
    // A key file that holds no key: refused, its contents never echoed.
    let dir = std::env::temp_dir().join(format!("shop-bad-key-{}", crate::short_id()));
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let bad = dir.join("bad.key");
    #[allow(clippy::expect_used)]
    std::fs::write(&bad, "secret-material-that-is-no-key").expect("a temporary file");
    let refused = assert_refused(
        binary,
        &[],
        &[("EVENT_SIGNING_KEY_FILE", &bad.to_string_lossy())],
        "EVENT_SIGNING_KEY_FILE",
    );
    assert!(!refused.contains("secret-material"), "{refused}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asserts that `binary` with `args` and `envs` stops before it starts,
/// exit 2, with one line naming `variable`; returns the line.
///
/// # Panics
///
/// When it does not.
pub fn assert_refused(binary: &str, args: &[&str], envs: &[(&str, &str)], variable: &str) -> String {
    let refused = run(binary, args, envs);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{args:?} {envs:?}: {refused:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line:\n{stderr}");
    assert!(
        stderr.contains(variable),
        "the line does not name {variable}: {stderr}"
    );
    stderr
}
