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

    assert_secrets_from_files(binary);
    assert_require_tls(binary);
    assert_refuses_to_serve_without_authentication(binary);
    // Every relay signs: serving (which runs the relay) and `relay` refuse
    // to start without the producer's key, in one line naming the setting
    // (who may call is settled, GRPC_AUTH=none, so that the key is what is
    // missing).
    for args in [&[][..], &["relay"]] {
        assert_refused(binary, args, &[("GRPC_AUTH", "none")], "EVENT_SIGNING_KEY_FILE");
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
        &[
            ("GRPC_AUTH", "none"),
            ("EVENT_SIGNING_KEY_FILE", &bad.to_string_lossy()),
        ],
        "EVENT_SIGNING_KEY_FILE",
    );
    assert!(!refused.contains("secret-material"), "{refused}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One line on stderr and exit code 2, naming every one of `names` and
/// showing no `secret`.
fn assert_refused_output(output: &Output, names: &[&str], secret: &str, what: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{what}: {output:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: not one line:\n{stderr}"
    );
    for name in names {
        assert!(
            stderr.contains(name),
            "{what}: the line does not name {name}: {stderr}"
        );
    }
    assert!(
        !stderr.contains(secret),
        "{what}: the line shows a secret: {stderr}"
    );
}

/// `*_FILE` settings: read, shown as read from their file and never
/// printed; a variable and its file both set is refused naming both; query
/// string passwords are hidden too.
fn assert_secrets_from_files(binary: &str) {
    let dir = std::env::temp_dir().join(format!("shop-command-line-{}", crate::short_id()));
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let database = dir.join("database-url");
    let broker = dir.join("amqp-url");
    #[allow(clippy::expect_used)]
    {
        std::fs::write(&database, "postgres://app:file-secret-1@db:5432/app\n").expect("written");
        std::fs::write(&broker, "amqps://app:file-secret-2@mq:5671/%2f\n").expect("written");
    }
    let (database, broker) = (
        database.to_string_lossy().into_owned(),
        broker.to_string_lossy().into_owned(),
    );

    let printed = run(
        binary,
        &["--print-config"],
        &[
            ("DATABASE_URL_FILE", database.as_str()),
            ("AMQP_URL_FILE", broker.as_str()),
            (
                "DATABASE_MIGRATION_URL",
                "postgres://owner@db:5432/app?sslmode=require&password=query-secret-3",
            ),
        ],
    );
    let config = text(&printed.stdout);
    assert!(printed.status.success(), "--print-config with files: {printed:?}");
    for secret in ["file-secret-1", "file-secret-2", "query-secret-3"] {
        assert!(!config.contains(secret), "{secret} printed:\n{config}");
    }
    for line in [
        "DATABASE_URL=(read from DATABASE_URL_FILE)",
        "AMQP_URL=(read from AMQP_URL_FILE)",
        "DATABASE_MIGRATION_URL=postgres://owner@db:5432/app?sslmode=require&password=***",
    ] {
        assert!(config.contains(line), "no {line}:\n{config}");
    }

    let both = run(
        binary,
        &[],
        &[
            ("AMQP_URL", "amqp://app:env-secret-4@mq:5672/%2f"),
            ("AMQP_URL_FILE", broker.as_str()),
        ],
    );
    assert_refused_output(
        &both,
        &["AMQP_URL_FILE", "AMQP_URL "],
        "secret",
        "AMQP_URL and AMQP_URL_FILE",
    );
    let missing = run(
        binary,
        &[],
        &[("DATABASE_URL_FILE", "/nonexistent/shop-database-url")],
    );
    assert_refused_output(
        &missing,
        &["DATABASE_URL_FILE", "/nonexistent/shop-database-url"],
        "secret",
        "a missing file",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `REQUIRE_TLS=true`: each plaintext connection stops the start, in one
/// line naming its setting and never its value.
fn assert_require_tls(binary: &str) {
    let tls_database = "postgres://app:tls-secret-5@db:5432/app?sslmode=require";
    let tls_broker = "amqps://app:tls-secret-6@mq:5671/%2f";
    // Who may call is settled (GRPC_AUTH=none), so what is refused is the
    // plaintext connection.
    let cases: [(&str, [(&str, &str); 4]); 3] = [
        (
            "DATABASE_URL",
            [
                (
                    "DATABASE_URL",
                    "postgres://app:tls-secret-5@db:5432/app?sslmode=prefer",
                ),
                ("AMQP_URL", tls_broker),
                ("REQUIRE_TLS", "true"),
                ("GRPC_AUTH", "none"),
            ],
        ),
        (
            "AMQP_URL",
            [
                ("DATABASE_URL", tls_database),
                ("AMQP_URL", "amqp://app:tls-secret-6@mq:5672/%2f"),
                ("REQUIRE_TLS", "true"),
                ("GRPC_AUTH", "none"),
            ],
        ),
        (
            "GRPC_TLS_CERT",
            [
                ("DATABASE_URL", tls_database),
                ("AMQP_URL", tls_broker),
                ("REQUIRE_TLS", "true"),
                ("GRPC_AUTH", "none"),
            ],
        ),
    ];
    for (setting, envs) in cases {
        let refused = run(binary, &[], &envs);
        assert_refused_output(
            &refused,
            &["REQUIRE_TLS", setting],
            "tls-secret",
            &format!("REQUIRE_TLS with {setting}"),
        );
    }
}

/// Asserts that `binary` refuses to serve, exit 2 and one line naming the
/// setting, when nothing says who may call it (`GRPC_AUTH` unset), when
/// `GRPC_AUTH` is not a mechanism, and when a mechanism lacks what it needs;
/// and that the probe and the relay, which serve no calls, need none of it.
///
/// # Panics
///
/// When any of that does not hold.
pub fn assert_refuses_to_serve_without_authentication(binary: &str) {
    for (envs, named) in [
        (&[][..], "GRPC_AUTH"),
        (&[("GRPC_AUTH", "")][..], "GRPC_AUTH"),
        (&[("GRPC_AUTH", "basic")][..], "GRPC_AUTH"),
        (&[("GRPC_AUTH", "jwt")][..], "GRPC_JWT_KEYS"),
        (&[("GRPC_AUTH", "mtls")][..], "GRPC_TLS_CLIENT_CA"),
        (
            &[("GRPC_AUTH", "mtls"), ("GRPC_TLS_CLIENT_CA", "/tmp/ca.pem")][..],
            "GRPC_TLS_CERT",
        ),
        (
            &[("GRPC_AUTH", "none"), ("GRPC_JWT_KEYS", "/tmp/keys.json")][..],
            "GRPC_JWT_KEYS",
        ),
        (
            &[
                ("GRPC_AUTH", "jwt"),
                ("GRPC_JWT_KEYS", "/tmp/keys.json"),
                ("GRPC_JWT_LEEWAY", "10m"),
            ][..],
            "GRPC_JWT_LEEWAY",
        ),
        (
            &[
                ("GRPC_AUTH", "mtls"),
                ("GRPC_TLS_CLIENT_PERMISSIONS", "ops=users:admin"),
            ][..],
            "GRPC_TLS_CLIENT_PERMISSIONS",
        ),
    ] {
        for args in [&[][..], &["serve"][..]] {
            let refused = run(binary, args, envs);
            let stderr = text(&refused.stderr);
            assert_eq!(refused.status.code(), Some(2), "{envs:?} {args:?}: {refused:?}");
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{envs:?}: not one line:\n{stderr}"
            );
            assert!(
                stderr.contains(named),
                "{envs:?}: the line does not name {named}: {stderr}"
            );
        }
    }
    // No GRPC_AUTH: the probe runs (and fails to reach a server: exit 1,
    // not a refused setting).
    let probe = run(binary, &["healthcheck"], &[("GRPC_ADDR", "127.0.0.1:1")]);
    assert_eq!(probe.status.code(), Some(1), "{probe:?}");
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
